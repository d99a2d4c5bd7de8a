"""The machinery every adapter method shares: the adapted layer, placement, merge, enable/disable.

An adapted layer (`AdaptedLinear`) keeps the frozen base weight and bias under their original names (so
`model.state_dict()` still has every base key, and a merged model has exactly those) and holds one adapter per
*slice* of output rows: a whole layer is one slice (`full`); the fused QKV projection of a `lit_gpt.GPT` has three
(`query`, `key`, `value`) of which only the targeted ones carry an adapter.

A method is one file that registers a builder with `register_method`; the builder returns a `SliceAdapter`:
either a multiplicative one (a block-diagonal transform on the input side, the output side, or both) or an
additive one (LoRA). How the adapted layer computes its output:

* input side: the transform is applied to the activations (`x' = H x`, O(d) per token for the Householder
  family, a batched block matmul for OFT) and the GEMM runs on `x'`. On the fused QKV each adapted slice has its
  own `x'`, so the GEMM runs once per run of rows sharing an input (`[W_q H_q x | W_k x | W_v H_v x]`, the same
  multiply-adds as one fused GEMM); un-targeted rows are the base formula `W_s x + b_s`, their own GEMM.
  `AdaptedLinear.fused_low_rank` switches the Householder family to one fused GEMM plus the exact rank-`J*nb`
  identity `W_s H_s x = W_s x + sum_j s_j (W_s Û_j)(Û_jᵀ x)` instead;
* output side: each adapted slice's rows of the GEMM output go through its transform (`H (y_s - b_s) + b_s`), the
  un-targeted rows untouched. The Householder family does all of a layer's slices
  in one autograd node, in place on the GEMM output inside a `lit_gpt.GPT` (`AdaptedLinear.in_place_outputs`),
  keeping the result rather than the input for backward;
* LoRA: one fused GEMM, and `(alpha/r) B A x` added in place onto each adapted slice's rows.
"""

from __future__ import annotations

import abc
import fnmatch
import re
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import recompute
from lit_gpt.adapters.config import (
    ALL_LINEAR, GPT_TARGETS, GPT_TRAIN_MODULES, AdapterConfig, blocks_phrase, field_name, format_layers, setting,
)

FULL = "full"  # the slice name of a layer adapted as a whole
QKV_SLICES = ("query", "key", "value")
# set on each module `AdapterConfig.train_modules` selects (`install_adapters`), so `trained_modules` finds them under
# any wrapper's names (FSDP2 and torch.compile keep the module objects)
TRAINED_IN_FULL = "_trained_in_full"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Float64 stays float64 (tests against the formulas); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for `x`'s device type; False for types autocast does not know (the `meta` device of
    shape inference and FLOP counting), about which `torch.is_autocast_enabled` raises."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (weight stored `(in, out)`), detected by name so transformers is never imported."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.ndim == 2


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks a method provides
# ---------------------------------------------------------------------------------------------------------------
class BlockTransform(nn.Module, metaclass=abc.ABCMeta):
    """A block-diagonal operator `H = diag(H_1..H_nb)` on one side of size `size = nb * k`.

    Subclasses apply it to activations (`forward`, last dimension, never forming a block for the Householder family)
    and return its blocks (`blocks`, only for merging and tests). `block_dropout` replaces each block by `I` with
    that probability on every training forward.
    """

    def __init__(self, size: int, nb: int, block_dropout: float = 0.0) -> None:
        super().__init__()
        self.size, self.nb, self.k = size, nb, size // nb
        self.block_dropout = block_dropout

    def keep_mask(self, device: torch.device) -> Optional[torch.Tensor]:
        """`(nb,)` booleans, True where a block is kept; None when nothing is dropped (eval, or p == 0)."""
        if not (self.training and self.block_dropout > 0):
            return None
        return torch.rand(self.nb, device=device) >= self.block_dropout

    @abc.abstractmethod
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """`z` with every block applied to its chunk of the last dimension."""

    @abc.abstractmethod
    def blocks(self) -> torch.Tensor:
        """The `(nb, k, k)` blocks (no dropout) in float32, or float64 for float64 parameters."""

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """Initialise the parameters as docs/METHODS.md specifies for the method."""

    def extra_repr(self) -> str:
        return f"size={self.size}, nb={self.nb}, k={self.k}" + (
            f", block_dropout={self.block_dropout}" if self.block_dropout else ""
        )


class SliceAdapter(nn.Module):
    """The adapter of one slice of output rows."""

    additive = False


class MultiplicativeAdapter(SliceAdapter):
    """`y_s = H_out (W_s H_in x) + b_s`; either transform may be absent."""

    def __init__(self, input: Optional[BlockTransform] = None, output: Optional[BlockTransform] = None) -> None:
        super().__init__()
        self.input = input
        self.output = output

    def low_rank_input(self) -> bool:
        """Whether the input side can be written as `I + sum_j s_j Û_j Û_jᵀ` (the Householder family)."""
        return self.input is not None and hasattr(self.input, "rank_update")


# method name -> builder(config, layer_name, in_features, out_features, device, dtype) -> SliceAdapter
Builder = Callable[[AdapterConfig, str, int, int, torch.device, torch.dtype], SliceAdapter]
_BUILDERS: dict[str, Builder] = {}


def register_method(*names: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for name in names:
            _BUILDERS[name] = fn
        return fn

    return deco


def num_blocks(config: AdapterConfig, size: int, layer: str, side: str) -> int:
    """`nb` for the `side` ("input"/"output") of `layer`, with the error docs/METHODS.md asks for when it does not
    divide."""
    if config.block_size is not None:
        if size % config.block_size:
            raise ValueError(
                f"{setting('block_size', config.block_size)} does not divide the {size} {side} features of {layer}: "
                f"choose a {field_name('block_size')} that divides {size}."
            )
        return size // config.block_size
    if size % config.nb:
        raise ValueError(
            f"{setting('nb', config.nb)} does not divide the {size} {side} features of {layer}: choose an "
            f"{field_name('nb')} that divides {size}."
        )
    return config.nb


# ---------------------------------------------------------------------------------------------------------------
# Autograd helper: add per-slice low-rank products into column ranges of a fresh GEMM output, in place
# ---------------------------------------------------------------------------------------------------------------
class _AddSliceProducts(torch.autograd.Function):
    """`y[..., lo:hi] += C_s @ P_sᵀ` for each slice, in place on `y` (the output of the layer's GEMM, which that
    GEMM's backward does not need), so un-touched columns keep their exact values and nothing is copied."""

    @staticmethod
    def forward(ctx, y, ranges, *tensors):
        m = y.shape[-1]
        y2 = y.view(-1, m)
        ctx.dtypes = [t.dtype for t in tensors]
        # under autocast the GEMM output is half precision while adapter weights may be float32
        tensors = [t.to(y.dtype) for t in tensors]
        for (lo, hi), C, P in zip(ranges, tensors[0::2], tensors[1::2]):
            target = y2 if (lo, hi) == (0, m) else y2[:, lo:hi]
            target.addmm_(C.reshape(-1, C.shape[-1]), P.t())
        ctx.mark_dirty(y)
        ctx.ranges = ranges
        ctx.save_for_backward(*tensors)
        return y

    @staticmethod
    def backward(ctx, g):
        tensors = ctx.saved_tensors
        m = g.shape[-1]
        g2 = g.reshape(-1, m)
        grads = []
        for i, ((lo, hi), C, P) in enumerate(zip(ctx.ranges, tensors[0::2], tensors[1::2])):
            gs = g2 if (lo, hi) == (0, m) else g2[:, lo:hi]
            gC = gP = None
            # as (r x tokens) and (r x out) products: see `_LoRALinear.backward` for why
            if ctx.needs_input_grad[2 + 2 * i]:
                gC = (P.t() @ gs.t()).t().reshape(C.shape).to(ctx.dtypes[2 * i])
            if ctx.needs_input_grad[3 + 2 * i]:
                gP = (C.reshape(-1, C.shape[-1]).t() @ gs).t().to(ctx.dtypes[2 * i + 1])
            grads += [gC, gP]
        return (g, None, *grads)


def add_slice_products(y: torch.Tensor, ranges: list[tuple[int, int]], tensors: list[torch.Tensor]) -> torch.Tensor:
    return _AddSliceProducts.apply(y, tuple(ranges), *tensors)


def _rows(pieces: list[tuple[int, int, torch.Tensor]], width: int) -> torch.Tensor:
    """The `(lo, hi, tensor)` pieces (in order of `lo`) at their places along a last dimension of `width`, zeros
    elsewhere."""
    out, at = [], 0
    for lo, hi, t in pieces:
        if lo > at:
            out.append(t.new_zeros(*t.shape[:-1], lo - at))
        out.append(t)
        at = hi
    if at < width:
        out.append(t.new_zeros(*t.shape[:-1], width - at))
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]


# ---------------------------------------------------------------------------------------------------------------
# The adapted layer
# ---------------------------------------------------------------------------------------------------------------
class AdaptedLinear(nn.Module):
    """A frozen `nn.Linear` / `Conv1D` plus one adapter per targeted slice of its output rows."""

    # Input-side Householder adapters on a fused layer: False (default) transforms each adapted slice's input and
    # runs one GEMM per run of rows; True keeps ONE fused GEMM of the plain input and adds a rank-`J*nb`
    # correction per slice (un-targeted rows then come out of the very same GEMM as the base layer's, bit for
    # bit). On a 2-core CPU the skinny correction GEMMs cost about three times the activation transform, so the
    # split form is the default; set it per layer or on the class to compare on other hardware.
    fused_low_rank = False
    # Output-side Householder transforms update the GEMM output in place and keep their result (not their input)
    # for backward: free inside a `lit_gpt.GPT`, where the next operation keeps that result anyway, but wrong where
    # code after the layer modifies its output in place. So `apply_adapters` sets it for `lit_gpt.GPT` only; other
    # models get the out-of-place form (same values and gradients, one more activation kept per layer).
    in_place_outputs = False

    def __init__(
        self,
        base: nn.Module,
        slices: list[tuple[str, int, int]],
        adapters: dict[str, SliceAdapter],
        config: AdapterConfig,
    ) -> None:
        super().__init__()
        self.transposed = is_conv1d(base)
        # the base parameters are registered here under their original names; the base module is kept (without
        # them) only to be put back, with the merged weight, by `merge_adapters`
        self.weight = base.weight
        self.bias = base.bias if getattr(base, "bias", None) is not None else None
        base._parameters["weight"] = None
        if "bias" in base._parameters:
            base._parameters["bias"] = None
        self.__dict__["_base_module"] = base
        self.out_features, self.in_features = self.weight.shape[::-1] if self.transposed else self.weight.shape
        self.slices = [tuple(s) for s in slices]
        self.adapters = nn.ModuleDict(adapters)
        self.config = config
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.adapters_enabled = True
        self.quantized = None  # `quantize`: the frozen weight in 4 or 8 bits, in place of `weight`

    # ------------------------------------------------------------------ helpers
    def base_weight(self) -> torch.Tensor:
        """The weight as `(out, in)` (a view for `Conv1D`; dequantized, outside autograd's care, if quantized)."""
        W = self.weight if self.quantized is None else self.quantized.dequantize()
        return W.t() if self.transposed else W

    def stored_shape(self) -> tuple[int, ...]:
        """The base weight's shape as stored (`(in, out)` for `Conv1D`), quantized or not."""
        return tuple(self.weight.shape) if self.quantized is None else self.quantized.shape

    @contextmanager
    def _weight(self) -> Iterator[torch.Tensor]:
        """`base_weight()` for a pass autograd records: a quantized weight is not kept for backward
        (`lit_gpt.quantize.Quantized.unkept`)."""
        if self.quantized is None:
            yield self.base_weight()
            return
        with self.quantized.unkept() as W:
            yield W.t() if self.transposed else W

    @torch.no_grad()
    def quantize(self, kind: str, device: Optional[torch.device] = None) -> None:
        """Keep the frozen base weight in `kind`'s codes (`lit_gpt.quantize`), made on `device` (default: the
        weight's), in place of the `weight` parameter. DoRA's magnitudes are set again from the dequantized rows,
        which the layer computes with from now on, so that it still starts as the quantized base layer."""
        from lit_gpt.quantize import Quantized

        if self.quantized is not None:
            raise ValueError(f"this layer's weight is already quantized ({self.quantized.kind}).")
        if self.weight.requires_grad:
            raise ValueError("a weight that trains cannot be quantized: only frozen base weights are.")
        W = self.weight if device is None else self.weight.to(device)
        self.quantized = Quantized(W, kind)
        del self.weight
        dora = [(lo, hi, ad) for name, lo, hi in self.slices
                for ad in (self._adapter(name),) if getattr(ad, "magnitude", None) is not None]
        W = self.base_weight() if dora else None
        for lo, hi, ad in dora:
            ad.magnitude.copy_(torch.linalg.vector_norm(W[lo:hi], dim=1, dtype=compute_dtype(W)))

    def _adapter(self, name: str) -> Optional[SliceAdapter]:
        return self.adapters[name] if name in self.adapters else None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._weight() as W:
            if not self.adapters_enabled or len(self.adapters) == 0:
                return F.linear(x, W, self.bias)
            if next(iter(self.adapters.values())).additive:
                return self._forward_additive(x, W)
            return self._forward_multiplicative(x, W)

    def _forward_unkept(self, x: torch.Tensor, output_side: bool) -> torch.Tensor:
        with self._weight() as W:
            return self._forward_multiplicative(x, W, output_side=output_side)

    def _forward_additive(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        parts = [(lo, hi, self._adapter(name)) for name, lo, hi in self.slices if name in self.adapters]
        dora = getattr(parts[0][2], "magnitude", None) is not None  # one method and config per layer
        if self.dropout is None or not self.training:
            kind = type(parts[0][2])
            y = None
            if hasattr(kind, "linear_slices"):  # the method's own fused form of the products below, where it has one
                y = kind.linear_slices(x, W, self.bias, parts)
            if y is None:
                ranges, tensors = [], []
                for lo, hi, ad in parts:
                    ranges.append((lo, hi))
                    tensors += ad.factors(x)
                y = add_slice_products(F.linear(x, W, self.bias), ranges, tensors)
            return self._dora_rescale(y, W, parts) if dora else y
        y = F.linear(x, W, self.bias)
        xd = self.dropout(x)
        if dora:  # PEFT's form with dropout: y + (m/n - 1) (W_s x_d + s B A x_d) + s B A x_d on each slice
            deltas = []
            for lo, hi, ad in parts:
                C, P = ad.factors(xd)
                update = C @ P.t()
                t = ad.dora_scale(W[lo:hi]).to(y.dtype)
                deltas.append((lo, hi, update + t * (F.linear(xd, W[lo:hi]) + update)))
            return y + _rows(deltas, self.out_features)
        ranges, tensors = [], []
        for lo, hi, ad in parts:
            ranges.append((lo, hi))
            tensors += ad.factors(xd)
        return add_slice_products(y, ranges, tensors)

    def _dora_rescale(self, y: torch.Tensor, W: torch.Tensor, parts: list) -> torch.Tensor:
        """DoRA: `y + (m/n - 1) (y - b)` on every adapted slice of `y = W x + b + s B A x`, the other rows as they
        are (`lit_gpt.adapters.lora`)."""
        t = _rows([(lo, hi, ad.dora_scale(W[lo:hi])) for lo, hi, ad in parts], self.out_features)
        from lit_gpt.adapters.lora import dora_rescale

        return dora_rescale(y, t.to(y.dtype), None if self.bias is None else self.bias.to(y.dtype),
                            in_place=self.in_place_outputs)

    def _forward_multiplicative(self, x: torch.Tensor, W: torch.Tensor, output_side: bool = True) -> torch.Tensor:
        """`H_out W H_in x + b` per slice; without `output_side`, `W H_in x + b` (`swiglu` applies `H_out`)."""
        b = self.bias
        m = self.out_features
        dropping = self.dropout is not None and self.training
        xd = self.dropout(x) if dropping else x
        adapted = [(name, lo, hi, self._adapter(name)) for name, lo, hi in self.slices]
        adapted = [a for a in adapted if a[3] is not None]
        outputs = [(lo, hi, ad.output) for _, lo, hi, ad in adapted if ad.output is not None and output_side]
        if len(self.slices) == 1:
            ad = adapted[0][3]
            if not dropping and ad.input is not None and hasattr(type(ad.input), "linear_groups"):
                y = self._linear_groups(type(ad.input), x, W, b, [(0, m, ad.input)], outputs)
                if y is not None:
                    return y
            y = F.linear(ad.input(xd) if ad.input is not None else xd, W, b)
            if not outputs:
                return y
            # the GEMM's input, for an output side that keeps it in place of the output (ETHER's on the kernels), where
            # keeping it is free: what rebuilds it is kept anyway (the MLP product's factors). Nothing else need keep
            # an unmarked input (attention's output is a copy after some attention kernels)
            plain = ad.input is None and not dropping and not W.requires_grad and recompute.marked(x)
            source = (x, W, ((0, m, None),), []) if plain else None
            return self._output_side(y, b, outputs, source)

        inputs = [ad for *_, ad in adapted if ad.input is not None]
        if not dropping and (not inputs or (self.fused_low_rank and all(ad.low_rank_input() for ad in inputs))):
            # one fused GEMM of the plain input; input-side transforms (if any) as low-rank corrections
            y = F.linear(x, W, b)
            ranges, tensors = [], []
            for name, lo, hi, ad in adapted:
                if ad.input is not None:
                    C, P = ad.input.rank_update(x, W[lo:hi])
                    ranges.append((lo, hi))
                    tensors += [C, P]
            if ranges:
                y = add_slice_products(y, ranges, tensors)
            return self._output_side(y, b, outputs) if outputs else y

        if not dropping and inputs and hasattr(type(inputs[0].input), "linear_groups"):
            # the method's own fused form of the GEMM per span below, where it has one
            parts = [(lo, hi, ad.input if ad is not None else None) for name, lo, hi in self.slices
                     for ad in (self._adapter(name),)]
            y = self._linear_groups(type(inputs[0].input), x, W, b, parts, outputs)
            if y is not None:
                return y

        # one GEMM per run of rows sharing an input; un-adapted runs use the plain input
        groups: list[list] = []  # [lo, hi, input]
        for name, lo, hi in self.slices:
            ad = self._adapter(name)
            if ad is None or ad.input is None:
                inp = x if ad is None else xd
                if groups and groups[-1][2] is inp:
                    groups[-1][1] = hi
                    continue
                groups.append([lo, hi, inp])
            else:
                groups.append([lo, hi, ad.input(xd)])
        outs = []
        for lo, hi, inp in groups:
            Ws = W if (lo, hi) == (0, m) else W[lo:hi]
            outs.append(F.linear(inp, Ws, None if b is None else b[lo:hi]))
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return self._output_side(y, b, outputs) if outputs else y

    def swiglu(self, other: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """`silu(self(x)) * other(x)` (a SwiGLU MLP's gate and up projections), with both layers' output-side
        transforms and the SiLU and product in one fused node where the method has one (`swiglu_outputs`: the
        Householder family on the CPU kernel), so that the MLP's widest activations are visited once each way
        instead of once per transform and operation. None where it does not apply (no output-side transform,
        several slices, a bias, other methods or devices): the caller then runs the layers and the product."""
        if not isinstance(other, AdaptedLinear) or other.out_features != self.out_features:
            return None
        transforms = []
        for layer in (self, other):
            if (not layer.adapters_enabled or len(layer.slices) != 1 or layer.bias is not None
                    or not layer.in_place_outputs):
                return None
            ad = layer._adapter(layer.slices[0][0])
            if ad is None or ad.additive:
                return None
            transforms.append(ad.output)
        present = [t for t in transforms if t is not None]
        if not present or any(type(t) is not type(present[0]) for t in present):
            return None
        kind = type(present[0])
        if not hasattr(kind, "swiglu_outputs") or not kind.swiglu_runs(x, present):
            return None
        return kind.swiglu_outputs(
            lambda: self._forward_unkept(x, output_side=False),
            lambda: other._forward_unkept(x, output_side=False),
            *transforms,
        )

    def _linear_groups(self, kind, x, W, b, parts: list, outputs: list) -> Optional[torch.Tensor]:
        """The method's own fused form of the GEMM per span (`kind.linear_groups`), output side included (fused
        into it where it updates outputs in place), or None where it has none for these tensors."""
        fused_outputs = outputs if self.in_place_outputs else ()
        y = kind.linear_groups(x, W, b, parts, fused_outputs)
        if y is None or not outputs or fused_outputs:
            return y
        return self._output_side(y, b, outputs)

    def _output_side(
        self, y: torch.Tensor, b: Optional[torch.Tensor], outputs: list, source: Optional[tuple] = None
    ) -> torch.Tensor:
        """`H_s (y_s - b_s) + b_s` on the rows `(lo, hi)` of the fresh GEMM output `y = W x' + b` for every
        `(lo, hi, transform)` of `outputs`; the other rows are `y`'s. `source`: `(x, W, spans, inputs)` of a GEMM
        of the plain input (one span, no input transform), for methods whose output side can keep the input."""
        kind = type(outputs[0][2])  # one method per layer: every slice's transform is of this type
        if hasattr(kind, "apply_output_rows"):
            return kind.apply_output_rows(y, b, outputs, self.in_place_outputs, source=source)
        pieces, at = [], 0
        for lo, hi, t in outputs:
            if lo > at:
                pieces.append(y[..., at:lo])
            if b is None:
                pieces.append(t(y[..., lo:hi]))
            else:
                bs = b[lo:hi].to(y.dtype)
                pieces.append(t(y[..., lo:hi] - bs) + bs)
            at = hi
        if at < y.shape[-1]:
            pieces.append(y[..., at:])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """`W'_s = H_out W_s H_in` (or `W_s + (alpha/r) B A`, its rows rescaled to DoRA's `m`) for every slice,
        computed in float32, in the base weight's dtype and storage layout."""
        W = self.base_weight()
        Wm = W.to(compute_dtype(W)).clone()
        for name, lo, hi in self.slices:
            ad = self._adapter(name)
            if ad is None:
                continue
            if ad.additive:
                Wm[lo:hi] = ad.merged_rows(Wm[lo:hi])
                continue
            Ws = Wm[lo:hi]
            if ad.input is not None:
                H = ad.input.blocks().to(Wm.dtype)
                Ws = torch.einsum("mik,ikl->mil", Ws.reshape(hi - lo, H.shape[0], H.shape[1]), H).reshape(Ws.shape)
            if ad.output is not None:
                H = ad.output.blocks().to(Wm.dtype)
                Ws = torch.einsum("ijk,ikn->ijn", H, Ws.reshape(H.shape[0], H.shape[1], -1)).reshape(Ws.shape)
            Wm[lo:hi] = Ws
        Wm = Wm.to(W.dtype)
        return Wm.t().contiguous() if self.transposed else Wm

    def to_base(self) -> nn.Module:
        """The base module with the adapters folded into its weight."""
        base = self.__dict__["_base_module"]
        frozen = self.quantized is not None or not self.weight.requires_grad
        base.weight = nn.Parameter(self.merged_weight(), requires_grad=not frozen)
        if self.bias is not None:
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        slices = ", ".join(f"{n}[{lo}:{hi}]" for n, lo, hi in self.slices if n in self.adapters)
        return f"{kind}(in={self.in_features}, out={self.out_features}), adapted: {slices}, method={self.config.method}"


# ---------------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------------
def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of `model`, by the parameter's `id`: two for a weight tied to another module."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _plan_gpt(model: nn.Module, named: set[str]) -> dict[str, list[str]]:
    """module name -> adapted slice names, for the named targets of a `lit_gpt.GPT`."""
    plan: dict[str, list[str]] = {}
    qkv = [s for s in QKV_SLICES if s in named]
    for i, block in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}"
        if qkv:
            plan[f"{prefix}.attn.qkv"] = qkv
        if "projection" in named:
            plan[f"{prefix}.attn.proj"] = [FULL]
        if "mlp" in named:
            for child in mlp_target_layers(block.mlp):
                plan[f"{prefix}.mlp.{child}"] = [FULL]
    if "head" in named:
        plan["lm_head"] = [FULL]
    return plan


def mlp_target_layers(mlp: nn.Module) -> list[str]:
    """The layers of a `lit_gpt.GPT` block's MLP that the `mlp` target adapts, by their names in it: its linear
    layers, and in a mixture of experts every expert's (a shared expert's too), not the routers (`gate`,
    `shared_expert_gate`, which a target names alone)."""
    moe = getattr(mlp, "experts", None) is not None
    return [child for child, module in (mlp.named_modules() if moe else mlp.named_children())
            if is_adaptable(module) and not (moe and child in ("gate", "shared_expert_gate"))]


def _slice_layout(model: nn.Module, name: str, module: nn.Module) -> list[tuple[str, int, int]]:
    if name.endswith("attn.qkv") and _is_gpt(model):
        c = model.config
        q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
        return [("query", 0, q), ("key", q, q + kv), ("value", q + kv, q + 2 * kv)]
    out_features = module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]
    return [(FULL, 0, out_features)]


def _is_gpt(model: nn.Module) -> bool:
    from lit_gpt.model import GPT

    return isinstance(model, GPT)


def _output_head(model: nn.Module) -> Optional[str]:
    """The name of the output head that ``all-linear`` leaves out, as PEFT does: the module
    `get_output_embeddings()` returns where the model has that method (HF transformers), else a top-level
    `lm_head`."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        head = get()
        return None if head is None else next((n for n, m in model.named_modules() if m is head), None)
    return "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Module) else None


def _linear_children(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if n and is_adaptable(m)]


def _resolve_targets(model: nn.Module, config: AdapterConfig) -> tuple[dict[str, list[str]], set[str]]:
    """module name -> adapted slice names, and the names that only ``all-linear`` selected."""
    modules = dict(model.named_modules())
    gpt = _is_gpt(model)
    named = set()
    patterns = []
    for t in config.targets:
        if gpt and t == ALL_LINEAR:
            named.update(("query", "key", "value", "projection", "mlp"))
        elif gpt and t in GPT_TARGETS:
            named.add(t)
        else:
            patterns.append(t)
    plan = _plan_gpt(model, named) if named else {}

    candidates = [n for n, m in modules.items() if n and is_adaptable(m)]
    all_linear: set[str] = set()
    selected: dict[str, list[str]] = {}  # pattern -> its layers (which `layers` may leave empty)
    exact = {"lm_head"} if "head" in named else set()  # layers a target names exactly: kept whatever the blocks
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            head = _output_head(model)
            hits = [n for n in candidates if n != head]
            all_linear.update(hits)
        else:
            hits = [n for n in candidates if _match(pattern, n)]
        if not hits:
            raise ValueError(_no_match(model, modules, pattern, gpt))
        selected[pattern] = hits
        exact.update(n for n in hits if n == pattern)
        for n in hits:
            if n in plan:
                raise ValueError(f"Layer {n!r} is matched by more than one adapter target: list it once.")
            # a GPT's fused QKV by name: its three slices, as the named targets query, key and value adapt it
            plan[n] = ([sname for sname, _, _ in _slice_layout(model, n, modules[n])]
                       if gpt and n.endswith("attn.qkv") else [FULL])
    if config.layers is not None:
        plan = _in_layers(plan, candidates, config.layers, selected, exact)
        all_linear &= set(plan)
    return plan, all_linear  # (a layer two targets select is refused above)


def block_index(name: str) -> Optional[int]:
    """The transformer block a module is in, as PEFT's `layers_to_transform` reads it (no `layers_pattern`): the
    first number between dots after the first name (`model.layers.3.mlp.experts.0.up_proj` is in block 3)."""
    found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _layers_setting(layers: list[int]) -> str:
    """`--lora_layers 0-3` inside `named_by_flags`, else `layers 0-3`."""
    return f"{field_name('layers')} {format_layers(layers)}"


def _in_layers(plan: dict[str, list[str]], candidates: list[str], layers: list[int],
               selected: dict[str, list[str]], exact: set[str]) -> dict[str, list[str]]:
    """`plan` without the layers outside the blocks `layers`, as PEFT's `layers_to_transform` leaves them out (what
    is in no block too), but for those a target names `exact`ly (the head; a module's full name), which PEFT adapts
    whatever the blocks. Refuses a block the model does not have and a target (`selected`: its layers) left empty."""
    blocks = {i for i in map(block_index, candidates) if i is not None}
    missing = [i for i in layers if i not in blocks]
    if not blocks:
        raise ValueError(f"{_layers_setting(layers)}: the model has no numbered blocks (a block is the first number "
                         "between dots after the first name, as in 'model.layers.3.mlp', as PEFT reads it), so there "
                         f"is nothing to choose from: leave {field_name('layers')} unset.")
    if missing:
        raise ValueError(f"{_layers_setting(layers)}: the model has blocks {format_layers(sorted(blocks))}, so "
                         f"{blocks_phrase(missing)} {'do' if len(missing) > 1 else 'does'} not exist: pass indices "
                         f"from 0 to {max(blocks)}.")
    kept = {n: s for n, s in plan.items() if block_index(n) in layers or n in exact}
    for target, hits in selected.items():
        if not any(n in kept for n in hits):
            where = sorted({i for i in map(block_index, hits) if i is not None})
            why = f"selects layers only in {blocks_phrase(where)}" if where else "selects layers in no numbered block"
            raise ValueError(f"The adapter target {target!r} {why}, so {_layers_setting(layers)} leaves none of "
                             f"them: drop it from the {field_name('targets')}, or change {field_name('layers')}.")
    return kept


# transformers' layer names (PEFT's target_modules) and the lit_gpt.GPT target that adapts the same layer
HF_TARGET_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "projection",
                   "dense": "projection", "gate_proj": "mlp", "up_proj": "mlp",
                   "down_proj": "mlp", "fc1": "mlp", "fc2": "mlp", "c_fc": "mlp", "dense_h_to_4h": "mlp",
                   "dense_4h_to_h": "mlp", "w1": "mlp", "w2": "mlp", "w3": "mlp", "lm_head": "head",
                   "query_key_value": "query, key and value",
                   "c_attn": "query, key and value", "qkv_proj": "query, key and value"}


def _no_match(model: nn.Module, modules: dict[str, nn.Module], pattern: str, gpt: bool) -> str:
    """Why `pattern` adapts nothing, and what to write instead."""
    what = type(model).__name__
    if pattern == ALL_LINEAR:
        return f"Adapter target {ALL_LINEAR!r} finds no nn.Linear or Conv1D module in {what} besides its output head."
    others = [n for n, m in modules.items() if n and _match(pattern, n)]
    if others:
        first = modules[others[0]]
        children = _linear_children(first)
        example = f"{pattern}.{children[0]}" if children else None
        hint = (f"name its linear layers (e.g. {example!r}) or use a pattern (e.g. {'*' + pattern + '.*'!r})"
                if example and not pattern.startswith("re:") and not any(c in pattern for c in "*?[")
                else "name its nn.Linear or Conv1D layers")
        return (
            f"Adapter target {pattern!r} matches only modules that are not linear layers in {what} (such as "
            f"{others[0]!r}, a {type(first).__name__}): {hint} in the {field_name('targets')}."
        )
    if gpt:
        ours = HF_TARGET_NAMES.get(pattern.rsplit(".", 1)[-1])
        instead = f" ({pattern!r} is {ours!r} here)" if ours else ""
        return (f"Adapter target {pattern!r} matches no nn.Linear or Conv1D module of {what}; the named targets of a "
                f"lit_gpt.GPT are {', '.join(GPT_TARGETS)} or {ALL_LINEAR}{instead}, and its layers are named as in "
                "'transformer.h.0.attn.qkv' (attn.qkv, attn.proj, mlp.fc_1, mlp.fc_2, mlp.proj, mlp.fc, lm_head; a "
                "mixture of experts' mlp.gate and mlp.experts.0.fc_1).")
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and is_adaptable(m)})
    layers = ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")
    if pattern in GPT_TARGETS:  # e.g. AdapterConfig's default targets, which name a lit_gpt.GPT's layers
        why = f" (a named target of a lit_gpt.GPT only, as are the default targets {list(AdapterConfig().targets)})"
    elif not pattern.startswith("re:") and (".*" in pattern or any(c in pattern for c in "\\^$|+(")):
        why = f" (a regular expression is written 're:{pattern}'; a pattern with * is matched as a shell glob)"
    else:
        why = ""
    return (f"Adapter target {pattern!r}{why} matches no nn.Linear or Conv1D module of {what}: set "
            f"{field_name('targets')} to names of its linear layers ({layers}), {ALL_LINEAR!r}, or a regular "
            "expression written 're:<regex>'.")


def _refusal(model: nn.Module, name: str, module: nn.Module, owners: dict[int, list[str]], all_linear: bool
             ) -> Optional[str]:
    """Why the layer `name` cannot take an adapter, or None when it can."""
    fix = f"leave it out of the {field_name('targets')}" + (
        f" (name the layers to adapt instead of {ALL_LINEAR!r})" if all_linear else ""
    )
    if nn.parameter.is_lazy(module.weight):
        return (f"Layer {name!r} ({type(module).__name__}) is not initialized yet: run a forward pass through the "
                "model first, then apply the adapters.")
    # the adapted layer computes `F.linear` on the base weight: a subclass's own computation would be dropped, and a
    # layer whose owner reads its weight directly would never call the adapter
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return (f"Layer {name!r} is a {type(module).__name__}, whose own forward replaces nn.Linear's, so an adapter "
                f"(which computes nn.Linear's formula) would change what it computes: {fix}.")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return (f"Layer {name!r} is the {child} of an nn.MultiheadAttention, which reads its weight directly "
                f"instead of calling it, so an adapter there would never run: {fix}.")
    shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
    if shared:
        return (f"{name}.weight is tied to {shared[0]}; an adapter on {name!r} could not be merged back into the "
                f"base architecture: {fix}.")
    return None


# transformers' names of modules PEFT's modules_to_save lists, and the same modules of a lit_gpt.GPT
HF_TRAIN_MODULE_NAMES = {"embed_tokens": "transformer.wte", "embed_in": "transformer.wte", "lm_head": "lm_head",
                         "embed_out": "lm_head", "input_layernorm": "norm_1", "norm": "transformer.ln_f",
                         "final_layer_norm": "transformer.ln_f", "final_layernorm": "transformer.ln_f",
                         "q_norm": "attn.norm_q", "k_norm": "attn.norm_k"}
# ... and those whose module depends on the family (`hf_train_module`): Gemma 2/3's post_attention_layernorm follows
# the attention (lit's post_attention_norm), its pre_feedforward_layernorm is the pre-MLP norm every other family
# calls post_attention_layernorm (lit's norm_2)
_HF_NORMS = {"post_attention_layernorm": "norm_2"}
_HF_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "norm_2",
                   "post_feedforward_layernorm": "post_mlp_norm"}


def hf_train_module(name: str, model: Optional[nn.Module] = None) -> Optional[str]:
    """The lit_gpt.GPT module (a suffix of its names) that transformers' module name `name` is in `model`'s family,
    or None for a name that is not one of theirs. Without `model`, only the names that mean one module in every
    family (the family-dependent ones, e.g. post_attention_layernorm, give None)."""
    if name in HF_TRAIN_MODULE_NAMES:
        return HF_TRAIN_MODULE_NAMES[name]
    config = getattr(model, "config", None)
    if config is None:
        return None
    gemma = getattr(config, "post_attention_norm", False) or getattr(config, "post_mlp_norm", False)
    return (_HF_GEMMA_NORMS if gemma else _HF_NORMS).get(name)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _gpt_train_modules(model: nn.Module, name: str) -> list[str]:
    modules = dict(model.named_modules())
    if name == "head":
        return ["lm_head"]
    if name == "embeddings":
        return [n for n in ("transformer.wte", "transformer.wpe") if n in modules]
    from lit_gpt.model import RMSNorm

    return [n for n, m in modules.items() if isinstance(m, (RMSNorm, nn.LayerNorm))]


def train_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The modules `config.train_modules` selects in `model` (the outermost of nested ones), in model order."""
    if not config.train_modules:
        return []
    modules = dict(model.named_modules())
    gpt = _is_gpt(model)
    chosen: set[str] = set()
    for pattern in config.train_modules:
        if gpt and pattern in GPT_TRAIN_MODULES:
            hits = _gpt_train_modules(model, pattern)
        elif gpt and pattern not in HF_TRAIN_MODULE_NAMES and hf_train_module(pattern, model):
            ours = hf_train_module(pattern, model)  # (a family-dependent transformers name, e.g. Gemma 2's norms)
            hits = [n for n in modules if n and _match(ours, n)]
        else:
            hits = [n for n in modules if n and _match(pattern, n)]
        hits = [n for n in hits if _has_parameters(modules[n])]
        if not hits:
            raise ValueError(_no_train_match(model, modules, pattern, gpt))
        chosen.update(hits)
    return [n for n in modules if n in chosen and not any(n.startswith(o + ".") for o in chosen)]


def _no_train_match(model: nn.Module, modules: dict[str, nn.Module], pattern: str, gpt: bool) -> str:
    what = type(model).__name__
    flag = field_name("train_modules")
    if any(n and _match(pattern, n) for n in modules):
        return (f"The {flag} entry {pattern!r} matches only modules without parameters in {what}: name modules that "
                "have some.")
    if gpt:
        ours = hf_train_module(pattern.rsplit(".", 1)[-1], model)
        instead = f" ({pattern!r} is {ours!r} here)" if ours else ""
        if pattern == "norm":  # (as a suffix, PEFT's modules_to_save selects every norm with it)
            instead = " ('norm' is 'transformer.ln_f' here; 'norms' is every norm, which PEFT's modules_to_save " \
                      "'norm' selects)"
        return (f"The {flag} entry {pattern!r} matches no module of {what}; the named train modules of a lit_gpt.GPT "
                f"are {', '.join(GPT_TRAIN_MODULES)}{instead}, or write module names such as 'transformer.ln_f'.")
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if n and any(True for _ in m.parameters(recurse=False))})
    names = ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")
    return (f"The {flag} entry {pattern!r} matches no module of {what}: name modules that have parameters ({names}) "
            "or write a regular expression 're:<regex>'.")


def _check_trained_not_adapted(trained: list[str], adapted: Iterator[str]) -> None:
    for a in adapted:
        for t in trained:
            if a == t or a.startswith(t + ".") or t.startswith(a + "."):
                holds = "is" if a == t else ("holds" if a.startswith(t + ".") else "is inside")
                raise ValueError(
                    f"{t!r} would be both trained in full ({field_name('train_modules')}) and adapted "
                    f"({field_name('targets')}): it {holds} the adapted layer {a!r}; leave it out of one of the two."
                )


def trained_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules trained in full beside the adapters (`AdapterConfig.train_modules`), by name in `model`."""
    for name, module in model.named_modules():
        if getattr(module, TRAINED_IN_FULL, False):
            yield name, module


def trained_module_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `trained_modules`, under their names in `model.state_dict()`."""
    return {f"{name}.{k}": p for name, module in trained_modules(model) for k, p in module.named_parameters()}


# a layer to adapt, before the model is touched: (module name, base module, slice layout, adapters by slice name)
Built = tuple[str, nn.Module, list[tuple[str, int, int]], dict[str, SliceAdapter]]


def build_adapters(model: nn.Module, config: AdapterConfig) -> list[Built]:
    """Check every layer `config` targets in `model` and build its adapters, leaving the model untouched: every
    refusal (a width `nb` does not divide, a tied weight, a layer whose own forward would be bypassed) comes
    before anything changes."""
    plan, all_linear = _resolve_targets(model, config)
    _check_trained_not_adapted(train_module_names(model, config), iter(plan))
    builder = _BUILDERS[config.method]
    # a weight shared with another module (tied embeddings) cannot take a merged W' without changing the other
    owners = parameter_names(model)
    built = []
    for name, slice_names in plan.items():
        module = model.get_submodule(name)
        refusal = _refusal(model, name, module, owners, name in all_linear)
        if refusal is not None:
            raise ValueError(refusal)
        layout = _slice_layout(model, name, module)
        W = module.weight
        n = W.shape[0] if is_conv1d(module) else W.shape[1]
        adapters = {}
        for sname, lo, hi in layout:
            if sname in slice_names:
                where = name if sname == FULL else f"{name} ({sname} rows)"
                adapters[sname] = builder(config, where, n, hi - lo, W.device, W.dtype)
                if hasattr(adapters[sname], "init_from_base"):  # (DoRA's magnitudes: the base rows' norms)
                    adapters[sname].init_from_base((W.t() if is_conv1d(module) else W)[lo:hi].detach())
        built.append((name, module, layout, adapters))
    return built


def install_adapters(model: nn.Module, config: AdapterConfig, built: list[Built]) -> nn.Module:
    """Swap in the layers `build_adapters` made and freeze every parameter but the adapters' and those of the
    `train_modules`."""
    in_place = _is_gpt(model)  # see AdaptedLinear.in_place_outputs
    trained = train_module_names(model, config)  # (no adapted layer is among or inside them: build_adapters)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, layout, adapters in built:
        new = AdaptedLinear(module, layout, adapters, config)
        new.in_place_outputs = in_place
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for _, layer in adapted_layers(model):
        for p in layer.adapters.parameters():
            p.requires_grad_(True)
    for name in trained:
        module = model.get_submodule(name)
        setattr(module, TRAINED_IN_FULL, True)
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace the targeted layers by `AdaptedLinear` modules, freeze every other parameter, return `model`.

    Every target is checked and every adapter built before the model is touched, so a refused call changes
    nothing. The model keeps its own copy of `config`."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"apply_adapters needs an AdapterConfig, got {type(config).__name__}.")
    config.validate()
    config = AdapterConfig.from_dict(config.to_dict())  # later edits of the caller's object change nothing here
    if any(True for _ in adapted_layers(model)):
        raise ValueError("The model already has adapters: merge them (merge_adapters) or start from a fresh model.")
    return install_adapters(model, config, build_adapters(model, config))


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into plain weights (`W' = H_out W H_in`, bias untouched) and put the base modules back,
    so `model.state_dict()` has exactly the base model's keys. Computed in float32 (float64 stays), cast back to the
    weight's dtype; adapters switched off with `set_adapters_enabled` are folded in all the same. The modules trained
    in full (`AdapterConfig.train_modules`) keep their trained weights and become plain modules of the model."""
    for _, module in list(trained_modules(model)):
        module.__dict__.pop(TRAINED_IN_FULL, None)
    for name, layer in list(adapted_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_base())
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """A disabled adapter makes its layer compute exactly the base layer (PEFT's `disable_adapter`). Refused when
    the model trains modules in full (`AdapterConfig.train_modules`): their original weights are not kept."""
    trained = [name for name, _ in trained_modules(model)]
    if not enabled and trained:
        raise ValueError(
            f"The model trains {trained[0]!r}{' and more' if len(trained) > 1 else ''} in full (train_modules), whose "
            "original weights are not kept, so disabling the adapters would not give the base model: load the base "
            "checkpoint for that."
        )
    for _, layer in adapted_layers(model):
        layer.adapters_enabled = bool(enabled)
    return model


def adapter_config_of(model: nn.Module) -> Optional[AdapterConfig]:
    for _, layer in adapted_layers(model):
        return layer.config
    return None
