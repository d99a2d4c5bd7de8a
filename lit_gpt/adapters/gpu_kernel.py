"""Fused GPU kernels (Triton) for the Householder-family update `z_i + sum_j s_j (ŵ_jᵀ z_i) ŵ_j`.

The GPU twin of `cpu_kernel.py`, with the same calls (`usable`, `forward`, `backward`): one launch reads the
activations once and writes the result once in forward; one launch reads the gradient and the kept input once each
in backward, writes the input gradient, and leaves per-program partial sums of the vector gradient (and of the small
gram the output side needs) that one reduction adds up. `forward_raw`/`backward_raw` take the raw parameters `u`, `v`
instead of unit vectors and normalise them inside the kernels; their reduction is a second small kernel that also
takes the gradient back through the normalisation. Eager PyTorch needs about a dozen launches and as many passes
over the activations for the same work (measured on an H100: `docs/benchmarks.md`).

A program owns one block `i` and a tile of tokens: it loads the `(tokens, k)` tile, forms the `J <= 2` dot
products in float32, applies the update and stores it in the activations' dtype. Triton is imported, and the
kernels compiled, on first use only: CUDA builds of PyTorch ship it, CPU installs need not have it. The first use
on a device also runs a tiny forward and backward against the formula; if Triton cannot build or run the kernels
there, a warning says so and the eager path takes over (speed is lost, never the run). Set `LIT_GPT_GPU_KERNEL=0`
to use the eager path. With `TRITON_INTERPRET=1` set before Triton is first imported, the kernels run on CPU tensors
in Triton's interpreter, which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lit_gpt import recompute
from lit_gpt.adapters.cpu_kernel import ProductRows, ScaledRows, row_stride

MAX_VECTORS = 2  # ETHER uses 1 vector per block, ETHER+ 2
# Tile and grid sizes, from `python bench/householder_kernel.py --device cuda --dtype bfloat16 --sweep true` on an
# H100 (widths 4096 and 11008, 4096 tokens, ETHER+): the fastest forward at both widths, and the backward with the
# least time over the two (docs/benchmarks.md has the table).
TILE_ELEMENTS = 4096  # a forward program's tile: tokens x padded block size
FINISH_ELEMENTS = 4096  # partial sums the finishing kernel loads at once: partials x padded block size
# Backward, for blocks whose size is a power of two ("exact") and for padded ones (width 11008 / 32 blocks = 344,
# padded to 512): `tile`, tokens x padded block size per loop step; `waves`, programs per block, up to this many per
# multiprocessor over all blocks; `acc2d`, sum the vector gradient element-wise over the tiles and across rows once
# at the end (else across rows on every step); `warps` per program.
BACKWARD = {
    "exact": dict(tile=2048, waves=4, acc2d=True, warps=4),
    "padded": dict(tile=4096, waves=16, acc2d=False, warps=4),
}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the forms of `lit_gpt.recompute` whose parts the backward kernel reads (`cpu_kernel.kernel_rows`); () rebuilds them
# before the kernel reads them (the A/B of `bench/ab_step.py`)
FORMS = recompute.FORMS
# OFT's exact Cayley blocks (`oft._ExactCayley`) come from the `cayley` kernel up to this block size (a block lives in
# one program's registers) and from `torch.linalg.inv_ex` above it; 0 leaves them all to `inv_ex`. On an H100
# (`bench/oft_blocks.py --device cuda`) the kernel took 0.08 us a block of 32 x 32 where `inv_ex` took 0.37, and 3.7
# us a block of 128 x 128 where `inv_ex` took 6.9
CAYLEY_MAX_BLOCK = 128
# OFT's Cayley-Neumann blocks come from the `neumann_fwd` / `neumann_bwd` kernels (the series' powers and the
# gradient's sums in a program's registers) up to this block size, else from PyTorch's batched matmuls and autograd
# (about a dozen launches forward and two dozen backward per adapted layer); 0 switches the kernels off
NEUMANN_MAX_BLOCK = 64

log = logging.getLogger(__name__)

_switched_off = 0
# (forward, backward, finish, cayley, neumann_fwd, neumann_bwd) once compiled; False when Triton cannot be imported
_kernels = None
_device_ok: dict = {}  # device -> whether the kernels passed their first-use check there


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load():
    """Define (and cache) the Triton kernels; None without Triton."""
    global _kernels
    if _kernels is None:
        try:
            from lit_gpt.adapters import _triton_kernels
        except ImportError:
            _kernels = False
        else:
            _kernels = (_triton_kernels.fwd, _triton_kernels.bwd, _triton_kernels.finish, _triton_kernels.cayley,
                        _triton_kernels.neumann_fwd, _triton_kernels.neumann_bwd)
    return _kernels or None


def available() -> bool:
    """Whether the Triton kernels can be used in this process (Triton importable, not switched off)."""
    return os.environ.get("LIT_GPT_GPU_KERNEL", "1") != "0" and _load() is not None


@contextmanager
def disabled():
    """Run the eager path inside this block (tests and benchmarks compare the two)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def _ready(device: torch.device) -> bool:
    """Not switched off, a CUDA device (the CPU under `TRITON_INTERPRET=1`), Triton there and the kernels working.
    Never while `torch.compile` traces: the kernels write into buffers in place, inside autograd Functions, and check
    themselves on first use, which the compiler cannot follow, so compiled code takes the eager path (same results),
    as on the CPU (`cpu_kernel.runs`)."""
    return (
        not _switched_off
        and device.type == ("cpu" if _interpreted() else "cuda")
        and not torch.compiler.is_compiling()
        and available()
        and _works_on(device)
    )


def usable(vecs: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Contiguous `(J <= 2, nb, k)` vectors and CUDA tensors (any tensors under `TRITON_INTERPRET=1`) of the same
    float32/bfloat16/float16 dtype, contiguous or 2-D with rows of unit stride (`cpu_kernel.row_stride`)."""
    return (
        vecs.ndim == 3
        and vecs.shape[0] <= MAX_VECTORS
        and vecs.dtype in _DTYPES
        and vecs.is_contiguous()
        and all(t.device == vecs.device and t.dtype == vecs.dtype and row_stride(t) is not None for t in tensors)
        and _ready(vecs.device)
    )


def _works_on(device: torch.device) -> bool:
    """Whether the kernels build and compute the formula on `device`, checked once per device."""
    ok = _device_ok.get(device)
    if ok is None:
        try:
            ok = _selftest(device)
            why = "gave results that differ from the formula"
        except Exception as e:  # a Triton or driver that cannot build or run the kernels costs speed, not the run
            ok, why = False, f"failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e})"
        if not ok:
            log.warning(f"The Triton kernels of the Householder adapters {why} on {device}; the eager path is used "
                        f"instead (set LIT_GPT_GPU_KERNEL=0 to skip the kernels and this check).")
        _device_ok[device] = ok
    return ok


def _selftest(device: torch.device) -> bool:
    """A tiny ETHER+ forward and backward through the raw-parameter kernels against the formula in float32."""
    gen = torch.Generator().manual_seed(0)
    T, nb, k, coefs = 5, 2, 16, (-1.0, 1.0)
    z = torch.randn(T, nb * k, generator=gen).to(device)
    params = [torch.randn(nb, k, generator=gen).to(device) for _ in coefs]
    out, c = forward_raw(z, params, None, coefs, 1e-12)
    gz = torch.empty_like(z)
    gw = backward_raw(z, z, params, None, coefs, 1e-12, c, gz, True)  # g = z: the input gradient is H z again
    vecs = [F.normalize(p, dim=-1) for p in params]
    zr = z.view(T, nb, k)
    ref = zr + sum(s * (zr * w).sum(-1, keepdim=True) * w for s, w in zip(coefs, vecs))
    close = lambda a: bool(torch.allclose(a.view(T, nb, k), ref, rtol=1e-4, atol=1e-4))  # noqa: E731
    return close(out) and close(gz) and bool(torch.isfinite(gw).all())


def _pow2(n: int) -> int:
    """The smallest power of two >= n (Triton's block shapes are powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def _tiles(k: int, elements: int) -> tuple[int, int]:
    """(tokens per tile, padded block size) for a tile of about `elements` numbers."""
    bk = _pow2(k)
    return max(1, min(128, elements // bk)), bk


def _coefs(coefs: tuple[float, ...]) -> tuple[float, float]:
    return float(coefs[0]), float(coefs[1]) if len(coefs) > 1 else 0.0


def _vectors(vecs) -> tuple[torch.Tensor, torch.Tensor]:
    """The two vector pointers of the kernels: rows of a `(J, nb, k)` tensor, or a list of `(nb, k)` parameters."""
    return vecs[0], vecs[1] if len(vecs) > 1 else vecs[0]


def _forward(z, vecs, coefs, out, beta, keep, normalize: bool, eps: float, bias=None):
    fwd = _load()[0]
    J, (nb, k) = len(vecs), vecs[0].shape
    assert J <= MAX_VECTORS and z.shape[-1] == nb * k
    ntok = z.numel() // (nb * k)
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device) if out is None else out
    c = torch.empty(J, ntok, nb, dtype=torch.float32, device=z.device)
    if ntok == 0:
        return out, c
    bt, bk = _tiles(k, TILE_ELEMENTS)
    s0, s1 = _coefs(coefs)
    w0, w1 = _vectors(vecs)
    b = bias if bias is not None else beta
    fwd[(-(-ntok // bt), nb)](
        z, row_stride(z), w0, w1, keep if keep is not None else c, b if b is not None else c, out,
        row_stride(out), c, ntok, nb, k, eps,
        S0=s0, S1=s1, J=J, NORMALIZE=normalize, HAS_KEEP=keep is not None,
        BETA=2 if bias is not None else 1 if beta is not None else 0, BT=bt, BK=bk,
    )
    return out, c


def _backward(g, z, vecs, coefs, c, gz, want_vecs, want_gram, keep, normalize: bool, eps: float, accumulate=False,
              d=None):
    """Launches the backward kernel; returns the partial sums `(pv, pg)` (P leading) and P. `z` None (with `d`, a
    `(J, tokens, nb)` float32 buffer for the projections `ŵ_jᵀ g_t`): the partial sums leave out `sum_t d_tj z_t`."""
    bwd = _load()[1]
    J, (nb, k) = len(vecs), vecs[0].shape
    ntok = g.numel() // (nb * k)
    cfg = BACKWARD[backward_kind(k)]
    bt, bk = _tiles(k, cfg["tile"])
    tiles = -(-ntok // bt)
    P = _programs(tiles, nb, g.device, cfg["waves"])
    f32 = dict(dtype=torch.float32, device=g.device)
    pv = (torch.empty if ntok else torch.zeros)(P, J, nb, k, **f32) if want_vecs else None
    pg = (torch.empty if ntok else torch.zeros)(P, J, J + 1, nb, **f32) if want_gram else None
    if ntok == 0:
        return pv, pg, P
    s0, s1 = _coefs(coefs)
    w0, w1 = _vectors(vecs)
    zform, (za, sza, zb, szb, zc) = _input_args(z if want_vecs and z is not None else g)
    bwd[(P, nb)](
        g, row_stride(g), za, sza, zb, szb, zc, w0, w1,
        keep if keep is not None else c, c, d if d is not None else c, gz if gz is not None else g,
        row_stride(gz) if gz is not None else 0,
        pv if pv is not None else c, pg if pg is not None else c, ntok, nb, k, P, tiles, eps,
        S0=s0, S1=s1, J=J, NORMALIZE=normalize, HAS_KEEP=keep is not None, WANT_GZ=gz is not None,
        ACCUMULATE=accumulate and gz is not None, WANT_V=want_vecs, WANT_GRAM=want_gram, ACC2D=cfg["acc2d"],
        ZFORM=3 if z is None else zform, STORE_D=d is not None, BT=bt, BK=bk, num_warps=cfg["warps"],
    )
    return pv, pg, P


def _input_args(z) -> tuple[int, tuple]:
    """The backward kernel's `ZFORM` and `(z, its row stride, z2, its row stride, z3)` for the transform's input
    given as rows or as the parts of `cpu_kernel.kernel_rows`."""
    if isinstance(z, ScaledRows):
        return 1, (z.x, row_stride(z.x), z.r, 0, z.w)
    if isinstance(z, ProductRows):
        return 2, (z.x, row_stride(z.x), z.y, row_stride(z.y), z.x)
    return 0, (z, row_stride(z), z, 0, z)


def backward_kind(k: int) -> str:
    """The `BACKWARD` setting for blocks of `k` numbers: "exact" for a power of two, else "padded"."""
    return "exact" if _pow2(k) == k else "padded"


def _programs(tiles: int, nb: int, device: torch.device, waves: int) -> int:
    """Token-tile programs per block in backward: one per tile up to several waves over the GPU, beyond that each
    program walks several tiles, so that the partial sums stay small for long inputs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(tiles, -(-waves * sms // nb)))


def forward(
    z: torch.Tensor,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    out: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, c)` as `cpu_kernel.forward`: the updated activations and the float32 `(J, tokens, nb)` projections.
    `out` may be `z` itself (in place); `beta` (contiguous `(J, nb)`) makes it `H (z - b) + b`."""
    beta = beta.to(torch.float32).contiguous() if beta is not None else None
    return _forward(z, vecs, coefs, out, beta, None, False, 0.0)


def backward(
    g: torch.Tensor,
    z: torch.Tensor,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    c: torch.Tensor,
    gz: Optional[torch.Tensor],
    want_vecs: bool,
    want_gram: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`(gz, gvecs, gram)` as `cpu_kernel.backward`: `H g` written into `gz` (None skips it), the float32
    `(J, nb, k)` vector gradient `s_j sum_t (c_tj g_t + d_tj z_t)` and the float32 `(J, J + 1, nb)` sums
    `[sum_t d_tj c_tl for l < J, sum_t d_tj]` (only with `want_gram`)."""
    pv, pg, P = _backward(g, z, vecs, coefs, c, gz, want_vecs, want_gram, None, False, 0.0)
    gv = (pv[0] if P == 1 else pv.sum(0)) if want_vecs else None
    gram = (pg[0] if P == 1 else pg.sum(0)) if want_gram else None
    return gz, gv, gram


def usable_raw(z: torch.Tensor, params: list[torch.Tensor], *tensors: torch.Tensor) -> bool:
    """Whether `forward_raw` can run: as `usable`, with the raw `(nb, k)` parameters (contiguous, one dtype of their
    own) in place of unit vectors; `tensors` (activations given as they are, not made contiguous) must be of `z`'s
    device and dtype with rows of unit stride."""
    return (
        len(params) <= MAX_VECTORS
        and z.dtype in _DTYPES
        and all(t.device == z.device and t.dtype == z.dtype and row_stride(t) is not None for t in tensors)
        and params[0].dtype in _DTYPES
        and all(p.device == z.device and p.dtype == params[0].dtype and p.is_contiguous() for p in params)
        and _ready(z.device)
    )


def forward_raw(
    z: torch.Tensor,
    params: list[torch.Tensor],
    keep: Optional[torch.Tensor],
    coefs: tuple[float, ...],
    eps: float,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` with the vectors given as raw parameters, normalised (and multiplied by the float32 `(nb,)` keep
    factors of block dropout, if any) inside the kernel. `z` is `(tokens, nb * k)` with rows of unit stride; `out`
    may be `z` (in place); with the contiguous `(nb * k,)` `bias` it is `H (z - b) + b`."""
    return _forward(z, params, coefs, out, None, keep, True, eps, bias=bias)


def backward_raw(
    g: torch.Tensor,
    z: torch.Tensor,
    params: list[torch.Tensor],
    keep: Optional[torch.Tensor],
    coefs: tuple[float, ...],
    eps: float,
    c: torch.Tensor,
    gz: Optional[torch.Tensor],
    want_params: bool,
    kept_output: bool = False,
    bias: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    z_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Optional[torch.Tensor]:
    """`H g` into `gz` (None skips it) and, with `want_params`, the gradients of the raw parameters as one
    `(J, nb, k)` tensor in their dtype: the vector gradient's partial sums are added up and taken through the
    normalisation by a second small kernel. The output side keeps a tensor other than the transform's input `z`
    and passes that as `z`: the kept output `H z + b` (`kept_output`) or `z + b` (`bias` alone, contiguous
    `(nb * k,)`); the second kernel then makes the gradient the one with `z` (as `ether._rebuild_z`). Or it keeps
    what makes `z` another way (a GEMM's input) and passes `z=None` and `z_sums`: a function of the float32
    `(J, tokens, nb)` projections `d_tj = ŵ_jᵀ g_t` that returns the float32 `(J, nb, k)` sums `sum_t d_tj z_t`.
    `accumulate` adds `H g` to `gz` instead of overwriting it; `gz` may be `g` itself (in place)."""
    assert (z is None) == (z_sums is not None)
    rebuild = want_params and z is not None and (kept_output or bias is not None)
    nb, k = params[0].shape
    d = None
    if want_params and z is None:
        d = torch.empty(len(params), g.numel() // (nb * k), nb, dtype=torch.float32, device=g.device)
    pv, pg, P = _backward(g, z, params, coefs, c, gz, want_params, rebuild, keep, True, eps, accumulate, d=d)
    if not want_params:
        return None
    if d is not None:  # the partial sums lack sum_t s_j d_tj z_t: added to the first
        for j, (s_j, zs) in enumerate(zip(coefs, z_sums(d))):
            pv[0, j].add_(zs, alpha=s_j)
    gw = torch.empty(len(params), nb, k, dtype=params[0].dtype, device=g.device)
    bk = _pow2(k)
    bp = max(1, min(_pow2(P), FINISH_ELEMENTS // bk))
    s0, s1 = _coefs(coefs)
    _load()[2][(nb, len(params))](
        pv, pg if rebuild else pv, *_vectors(params), keep if keep is not None else pv,
        bias if bias is not None else pv, gw, P, nb, k, eps,
        S0=s0, S1=s1, J=len(params), HAS_KEEP=keep is not None, KEPT_OUTPUT=rebuild and kept_output,
        HAS_BIAS=rebuild and bias is not None, BP=bp, BK=bk,
    )
    return gw


def cayley_usable(S: torch.Tensor) -> bool:
    """Whether `cayley` can build these blocks: a `(n, k, k)` float32/float64 batch with `k <= CAYLEY_MAX_BLOCK`
    where the kernels run."""
    return S.ndim == 3 and S.dtype in (torch.float32, torch.float64) and 0 < S.shape[-1] <= CAYLEY_MAX_BLOCK and (
        _ready(S.device)
    )


def cayley(S: torch.Tensor) -> torch.Tensor:
    """OFT's exact blocks `H = (I + S)(I - S)^-1 = 2 (I - S)^-1 - I` for a batch of skew-symmetric `S` (`(n, k, k)`),
    one program per block: the GPU twin of `cpu_kernel.cayley`, one launch where `torch.linalg.inv_ex` takes a
    batched factorisation and inversion."""
    return _per_block(3, (S.contiguous(),))


def neumann_usable(S: torch.Tensor) -> bool:
    """Whether `neumann_forward` / `neumann_backward` can run on these blocks: a `(n, k, k)` float32 batch with
    `k <= NEUMANN_MAX_BLOCK` where the kernels run."""
    return S.ndim == 3 and S.dtype == torch.float32 and 0 < S.shape[-1] <= NEUMANN_MAX_BLOCK and _ready(S.device)


def _per_block(kernel: int, tensors: tuple, *scalars, min_tile: int = 1) -> torch.Tensor:
    """Runs `_load()[kernel]`, one program per `k x k` block of the contiguous `(n, k, k)` batches `tensors`, on
    `(*tensors, out, k, *scalars)` with tiles of at least `min_tile`; returns the new batch `out`."""
    out = torch.empty_like(tensors[0])
    n, k = tensors[0].shape[0], tensors[0].shape[-1]
    if n:
        bk = max(min_tile, _pow2(k))
        _load()[kernel][(n,)](*tensors, out, k, *scalars, BK=bk, num_warps=max(4, min(16, bk * bk // 1024)))
    return out


def neumann_forward(S: torch.Tensor, terms: int) -> torch.Tensor:
    """OFT's Cayley-Neumann blocks `H = (I + S) sum_{j <= terms} S^j` for a contiguous `(n, k, k)` batch, one
    program per block (`terms >= 1`)."""
    return _per_block(4, (S,), terms, min_tile=16)  # 16: the smallest tile of Triton's matrix products


def neumann_backward(S: torch.Tensor, gH: torch.Tensor, terms: int) -> torch.Tensor:
    """The gradient of `neumann_forward(S, terms)` for the contiguous upstream gradient `gH`."""
    return _per_block(5, (S, gH), terms, min_tile=16)
