"""Fused GPU kernels (Triton) for the Householder-family update `z_i + sum_j s_j (ŵ_jᵀ z_i) ŵ_j`.

The GPU twin of `cpu_kernel.py`, with the same calls (`usable`, `forward`, `backward`): one launch reads the
activations once and writes the result once in forward; one launch reads the gradient and the kept input once each
in backward, writes the input gradient, and leaves per-program partial sums of the vector gradient (and of the small
gram the output side needs) that one reduction adds up. Eager PyTorch needs about a dozen launches and as many
passes over the activations for the same work (measured on an H100: `docs/benchmarks.md`).

A program owns one block `i` and a tile of tokens: it loads the `(tokens, k)` tile, forms the `J <= 2` dot
products in float32, applies the update and stores it in the activations' dtype. Triton is imported, and the
kernels compiled, on first use only: CUDA builds of PyTorch ship it, CPU installs need not have it. Set
`LIT_GPT_GPU_KERNEL=0` to use the eager path instead. With `TRITON_INTERPRET=1` (set before first use) the kernels
run on CPU tensors in Triton's interpreter, which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

import torch

from lit_gpt.adapters.cpu_kernel import row_stride

MAX_VECTORS = 2  # ETHER uses 1 vector per block, ETHER+ 2
TILE_ELEMENTS = 8192  # a forward program's tile: tokens x padded block size
TILE_ELEMENTS_BACKWARD = 4096  # backward holds two tiles (gradient and input): half as many tokens
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_switched_off = 0
_kernels = None  # (forward, backward, finish) once compiled; False when Triton cannot be imported


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
            _kernels = (_triton_kernels.fwd, _triton_kernels.bwd, _triton_kernels.finish)
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


def usable(vecs: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Contiguous `(J <= 2, nb, k)` vectors and CUDA tensors (any tensors under `TRITON_INTERPRET=1`) of the same
    float32/bfloat16/float16 dtype, contiguous or 2-D with rows of unit stride (`cpu_kernel.row_stride`)."""
    device = "cpu" if _interpreted() else "cuda"
    return (
        not _switched_off
        and vecs.ndim == 3
        and vecs.shape[0] <= MAX_VECTORS
        and vecs.dtype in _DTYPES
        and vecs.device.type == device
        and vecs.is_contiguous()
        and all(t.device == vecs.device and t.dtype == vecs.dtype and row_stride(t) is not None for t in tensors)
        and available()
    )


def _tiles(k: int, elements: int) -> tuple[int, int]:
    bk = 1 << max(0, (k - 1).bit_length())
    return max(1, min(128, elements // bk)), bk


def _coefs(coefs: tuple[float, ...]) -> tuple[float, float]:
    return float(coefs[0]), float(coefs[1]) if len(coefs) > 1 else 0.0


def _vectors(vecs) -> tuple[torch.Tensor, torch.Tensor]:
    """The two vector pointers of the kernels: rows of a `(J, nb, k)` tensor, or a list of `(nb, k)` parameters."""
    return vecs[0], vecs[1] if len(vecs) > 1 else vecs[0]


def _forward(z, vecs, coefs, out, beta, keep, normalize: bool, eps: float):
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
    fwd[(-(-ntok // bt), nb)](
        z, row_stride(z), w0, w1, keep if keep is not None else c, beta if beta is not None else c, out,
        row_stride(out), c, ntok, nb, k, eps,
        S0=s0, S1=s1, J=J, NORMALIZE=normalize, HAS_KEEP=keep is not None, HAS_BETA=beta is not None, BT=bt, BK=bk,
    )
    return out, c


def _backward(g, z, vecs, coefs, c, gz, want_vecs, want_gram, keep, normalize: bool, eps: float):
    """Launches the backward kernel; returns the partial sums `(pv, pg)` (P leading) and P."""
    bwd = _load()[1]
    J, (nb, k) = len(vecs), vecs[0].shape
    ntok = g.numel() // (nb * k)
    bt, bk = _tiles(k, TILE_ELEMENTS_BACKWARD)
    tiles = -(-ntok // bt)
    P = _programs(tiles, nb, g.device)
    f32 = dict(dtype=torch.float32, device=g.device)
    pv = (torch.empty if ntok else torch.zeros)(P, J, nb, k, **f32) if want_vecs else None
    pg = (torch.empty if ntok else torch.zeros)(P, J, J + 1, nb, **f32) if want_gram else None
    if ntok == 0:
        return pv, pg, P
    s0, s1 = _coefs(coefs)
    w0, w1 = _vectors(vecs)
    bwd[(P, nb)](
        g, row_stride(g), z if want_vecs else g, row_stride(z) if want_vecs else 0, w0, w1,
        keep if keep is not None else c, c, gz if gz is not None else g, row_stride(gz) if gz is not None else 0,
        pv if pv is not None else c, pg if pg is not None else c, ntok, nb, k, P, tiles, eps,
        S0=s0, S1=s1, J=J, NORMALIZE=normalize, HAS_KEEP=keep is not None, WANT_GZ=gz is not None,
        WANT_V=want_vecs, WANT_GRAM=want_gram, BT=bt, BK=bk,
    )
    return pv, pg, P


def _programs(tiles: int, nb: int, device: torch.device) -> int:
    """Token-tile programs per block in backward: one per tile up to several waves over the GPU, beyond that each
    program walks several tiles, so that the partial sums stay small for long inputs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(tiles, -(-64 * sms // nb)))


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


def usable_raw(z: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether `forward_raw` can run: as `usable`, with the raw `(nb, k)` parameters (contiguous, one dtype of their
    own) in place of unit vectors."""
    return (
        not _switched_off
        and len(params) <= MAX_VECTORS
        and z.device.type == ("cpu" if _interpreted() else "cuda")
        and z.dtype in _DTYPES
        and all(p.device == z.device and p.dtype == params[0].dtype and p.is_contiguous() for p in params)
        and params[0].dtype in _DTYPES
        and available()
    )


def forward_raw(
    z: torch.Tensor, params: list[torch.Tensor], keep: Optional[torch.Tensor], coefs: tuple[float, ...], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` with the vectors given as raw parameters, normalised (and multiplied by the float32 `(nb,)` keep
    factors of block dropout, if any) inside the kernel. `z` is contiguous `(tokens, nb * k)`."""
    return _forward(z, params, coefs, None, None, keep, True, eps)


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
) -> Optional[torch.Tensor]:
    """`H g` into `gz` (None skips it) and, with `want_params`, the gradients of the raw parameters as one
    `(J, nb, k)` tensor in their dtype: the vector gradient's partial sums are added up and taken through the
    normalisation by a second small kernel."""
    pv, _, P = _backward(g, z, params, coefs, c, gz, want_params, False, keep, True, eps)
    if not want_params:
        return None
    nb, k = params[0].shape
    gw = torch.empty(len(params), nb, k, dtype=params[0].dtype, device=g.device)
    _load()[2][(nb,)](
        pv, *_vectors(params), keep if keep is not None else pv, gw, P, nb, k, eps,
        J=len(params), HAS_KEEP=keep is not None, BK=_tiles(k, TILE_ELEMENTS)[1],
    )
    return gw
