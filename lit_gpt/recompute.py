"""Activations that backward can rebuild from tensors autograd keeps anyway, instead of keeping them too.

A frozen linear layer keeps nothing for backward, but an adapter that transforms its input (ETHER's vector
gradient needs the input) must keep that input: a norm's output or the MLP's `silu(a) * b`, one activation per
adapted layer input that the base model never stores. Their producers already keep what makes them: RMSNorm keeps
its float32 input and `1/rms` for its own backward, the MLP's product keeps `silu(a)` and `b`. So the producer
marks its output with that recipe (`mark`), and a consumer's autograd Function saves the recipe's inputs (the same
storages, no new memory) instead of the output (`pack`) and rebuilds it, bit for bit, in backward (`unpack`):
one element-wise pass per adapted input and step, for one activation fewer kept per adapted input.

Producers mark only when autograd keeps the recipe's inputs anyway (they require grad), and only with
deterministic element-wise recipes. Consumers go through `ctx.save_for_backward`, so saved-tensor hooks
(activation checkpointing, offloading, memory accounting) see the recipe's inputs like any other saved tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, Sequence

import torch

_ATTR = "_lit_gpt_recipe"
_marking: ContextVar[bool] = ContextVar("lit_gpt_recompute_marking", default=True)  # False inside `disabled()`


class Recipe:
    """`fn(*inputs)` rebuilds a marked tensor. Consumers that rebuild it in the same backward share one rebuild:
    it is cached while some consumer that packed it has not unpacked it yet."""

    __slots__ = ("fn", "form", "pending", "cache")

    def __init__(self, fn: Callable[..., torch.Tensor], form: Optional[str] = None) -> None:
        self.fn = fn
        self.form = form
        self.pending = 0
        self.cache: Optional[torch.Tensor] = None

    def rebuild(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.cache if self.cache is not None else self.fn(*inputs)
        self.pending -= 1
        self.cache = out if self.pending > 0 else None
        return out


# Forms a recipe may declare, for consumers that make the tensor from its parts themselves (a fused kernel reading
# them where it would read the tensor) instead of rebuilding it:
#   "scale": inputs (x, r, w), `out = w * (x * r).to(out.dtype)` with `x` shaped like `out`, `r` one number per row,
#            `w` per column: `x` and `r` float32, `w` of `out`'s dtype (an RMSNorm's output)
#   "mul":   inputs (x, y), `out = x * y`, both shaped like `out` and of its dtype
FORMS = ("scale", "mul")


def mark(
    out: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, form: Optional[str] = None
) -> torch.Tensor:
    """Record that `fn(*inputs)` rebuilds `out` bit for bit; returns `out`. Call it only when autograd keeps every
    input for backward anyway (else a consumer keeping them would cost memory instead of saving it). `form` (one of
    `FORMS`) says that `fn` is that product, exactly."""
    assert form is None or form in FORMS, form
    # under torch.compile the compiler plans what backward keeps; the adapters run plain operations there
    if not torch.compiler.is_compiling() and _marking.get():
        setattr(out, _ATTR, (Recipe(fn, form), inputs))
    return out


@contextmanager
def disabled() -> Iterator[None]:
    """Mark nothing inside: consumers keep their inputs (more memory, no rebuild), e.g. to measure what this saves."""
    token = _marking.set(False)
    try:
        yield
    finally:
        _marking.reset(token)


def pack(x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Optional[Recipe]]:
    """What a consumer saves for backward in place of `x`: its recipe's inputs and the recipe if `x` is marked, else
    `x` itself; give both back to `unpack`."""
    marked = getattr(x, _ATTR, None)
    if marked is None:
        return (x,), None
    recipe, inputs = marked
    recipe.pending += 1
    return inputs, recipe


def unpack(saved: Sequence[torch.Tensor], recipe: Optional[Recipe]) -> torch.Tensor:
    """The tensor that `pack` stood in for (rebuilt if it was marked)."""
    return saved[0] if recipe is None else recipe.rebuild(saved)


def keep_rows(ctx, z: torch.Tensor, z2: torch.Tensor, wanted: bool = True) -> tuple[torch.Tensor, ...]:
    """For an autograd Function that works on the rows `z2 = z.reshape(-1, d)` of its input `z`: what to save for
    them (the recipe's inputs when `z2` is a view of a marked `z`, else `z2`; nothing unless `wanted`, e.g. when
    only a frozen parameter's gradient would read them); `rows` gives `z2` back in backward."""
    if not wanted:
        ctx.n_kept, ctx.recipe = 0, None
        return ()
    keep, ctx.recipe = pack(z) if z2.data_ptr() == z.data_ptr() and z.is_contiguous() else ((z2,), None)
    ctx.n_kept = len(keep)
    return keep


def rows(ctx, saved: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """The rows `keep_rows` stood in for (rebuilt if marked) and the saved tensors after them."""
    n = ctx.n_kept
    z = unpack(saved[:n], ctx.recipe)
    return z.view(-1, z.shape[-1]), saved[n:]


def rows_or_parts(
    ctx, saved: Sequence[torch.Tensor], forms: Sequence[str]
) -> tuple[Optional[torch.Tensor], Optional[Recipe], Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    """`rows`, except where the recipe has one of `forms` and no other consumer's rebuild is cached: then
    `(None, recipe, its inputs, rest)`, nothing rebuilt, for a consumer that makes the rows from their parts (and
    calls `recipe.fn(*inputs)` where it cannot). Else `(rows, None, (), rest)`; `(None, None, (), saved)` where
    `keep_rows` kept nothing."""
    n, recipe = ctx.n_kept, ctx.recipe
    if n == 0:
        return None, None, (), saved
    if recipe is not None and recipe.form in forms and recipe.cache is None:
        recipe.pending -= 1
        return None, recipe, saved[:n], saved[n:]
    z, rest = rows(ctx, saved)
    return z, None, (), rest


def marked(t: torch.Tensor) -> bool:
    """Whether `t` carries a recipe: what rebuilds it is kept by autograd anyway."""
    return getattr(t, _ATTR, None) is not None


def keeps(t: torch.Tensor) -> bool:
    """Whether autograd keeps what an operation on `t` saves: grad mode is on and `t` requires grad."""
    return torch.is_grad_enabled() and t.requires_grad
