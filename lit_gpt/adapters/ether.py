"""ETHER, ETHER+ and ETHER+HH (Bini et al., ICML 2024, arXiv 2405.20271), applied to activations.

Every block of this family is `H_i = I + sum_j s_j ŵ_ij ŵ_ijᵀ` with unit vectors `ŵ = w / ‖w‖`:

* ``ether``:     one vector ``u``, ``s = -2``: a Householder reflection `I - 2 ûûᵀ`;
* ``etherplus``: vectors ``u, v``, ``s = (-1, +1)``: `I - ûûᵀ + v̂v̂ᵀ`, the identity at init (``v = -u``);
* ``etherplusHH``: an ``etherplus`` transform on both sides of the weight.

So `H z` is `z_i + sum_j s_j (ŵ_ijᵀ z_i) ŵ_ij` per block: O(d) per token, no `k × k` block and no transformed
weight is ever formed during training (`blocks()` exists for merging only).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import recompute
from lit_gpt.adapters import cpu_kernel, gpu_kernel
from lit_gpt.adapters.base import (
    BlockTransform,
    MultiplicativeAdapter,
    autocast_on,
    compute_dtype,
    num_blocks,
    register_method,
)
from lit_gpt.adapters.config import AdapterConfig

NORM_EPS = 1e-12  # guards ‖w‖ of an all-zero vector; far below any norm a trained vector has


# On the CPU the update streams token chunks of about this many bytes, so the temporaries of its several
# element-wise steps stay in cache instead of going to memory once per step (about 1.6x faster per update on a
# width-1024 layer, measured); on GPUs one kernel per step over all tokens is better (and `gpu_kernel.py`'s fused
# Triton kernels better still).
CPU_CHUNK_BYTES = 1 << 20


def _chunks(z: torch.Tensor) -> int:
    if z.device.type != "cpu":
        return max(1, z.shape[0])
    return max(1, CPU_CHUNK_BYTES // max(1, math.prod(z.shape[1:]) * z.element_size()))  # (z may have no rows)


def _kernel(vecs: torch.Tensor, *tensors: torch.Tensor):
    """The fused kernel module (`cpu_kernel` or `gpu_kernel`) that can run this update, or None (eager path)."""
    for kernel in (cpu_kernel, gpu_kernel):
        if kernel.usable(vecs, *tensors):
            return kernel
    return None


def _dots(x: torch.Tensor, vecs: torch.Tensor, tmp: torch.Tensor, dots: torch.Tensor) -> None:
    """`dots[j] = ŵ_jᵀ x` per block, for a `(n, nb, k)` chunk `x`; `tmp` is scratch shaped like `x`."""
    for j in range(vecs.shape[0]):
        torch.sum(torch.mul(x, vecs[j], out=tmp), -1, keepdim=True, out=dots[j])


def _update(x: torch.Tensor, dots: torch.Tensor, vecs: torch.Tensor, coefs, out: torch.Tensor) -> None:
    """`out = x + sum_j s_j dots_j ŵ_j` for a `(n, nb, k)` chunk; `out` may be `x` (in place)."""
    torch.addcmul(x, dots[0], vecs[0], value=coefs[0], out=out)
    for j in range(1, vecs.shape[0]):
        out.addcmul_(dots[j], vecs[j], value=coefs[j])


def _eager_update(
    z: torch.Tensor,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    out: torch.Tensor,
    beta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`out = H z` on `(T, nb * k)` rows of unit stride (`out` may be `z`: in place); returns `c`, `(J, T, nb, 1)`.
    With `beta` (`(J, nb)`, the vectors' products with a bias `b` that `z` holds), `out = H (z - b) + b`."""
    J, nb, k = vecs.shape
    T = z.shape[0]
    zr, outr = z.view(T, nb, k), out.view(T, nb, k)
    cs = torch.empty(J, T, nb, 1, dtype=z.dtype, device=z.device)
    step = _chunks(zr)
    tmp = torch.empty((min(step, T), nb, k), dtype=z.dtype, device=z.device)  # reused: fresh ones cost page faults
    for a in range(0, T, step):
        zc, c = zr[a:a + step], cs[:, a:a + step]
        _dots(zc, vecs, tmp[: zc.shape[0]], c)
        if beta is not None:
            c -= beta[:, None, :, None]
        _update(zc, c, vecs, coefs, outr[a:a + step])
    return cs


def _traced_update(z: torch.Tensor, vecs: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """`H z` over the last dimension as plain differentiable operations: what `torch.compile` traces in place of the
    kernels and the hand-written autograd nodes, whose in-place writes it cannot follow (`cpu_kernel.runs`)."""
    J, nb, k = vecs.shape
    zr = z.reshape(*z.shape[:-1], nb, k)
    out = zr
    for s, w in zip(coefs, vecs):
        out = out + s * (zr * w).sum(-1, keepdim=True) * w
    return out.reshape(z.shape)


def _eager_backward(
    g: torch.Tensor,
    z: torch.Tensor,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    cs: torch.Tensor,
    gz: Optional[torch.Tensor],
    want_vecs: bool,
    want_gram: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The eager twin of `cpu_kernel.backward` on `(T, nb * k)` rows: writes `H g` into `gz` (if given) and returns
    the vector gradient `(J, nb, k)` and the gram sums `(J, J + 1, nb)`, both accumulated in float32 (float64
    stays) whatever the activation dtype."""
    J, nb, k = vecs.shape
    T = g.shape[0]
    gr, zr = g.view(T, nb, k), z.view(T, nb, k)
    acc = compute_dtype(vecs)
    gvecs = torch.zeros(J, nb, 1, k, dtype=acc, device=vecs.device) if want_vecs else None
    gram = torch.zeros(J, J + 1, nb, 1, dtype=acc, device=vecs.device) if want_gram else None
    step = _chunks(gr)
    tmp = torch.empty((min(step, T), nb, k), dtype=g.dtype, device=g.device)
    ds = torch.empty(J, tmp.shape[0], nb, 1, dtype=g.dtype, device=g.device)
    for a in range(0, T, step):
        gc = gr[a:a + step]
        d = ds[:, : gc.shape[0]]
        _dots(gc, vecs, tmp[: gc.shape[0]], d)
        if gz is not None:
            _update(gc, d, vecs, coefs, gz.view(T, nb, k)[a:a + step])
        if want_vecs:
            # per block i: sum_t c_ti g_ti + d_ti z_ti, as (1 x T) @ (T x k) products batched over the blocks
            gb, zb = gc.transpose(0, 1), zr[a:a + step].transpose(0, 1)
            for j in range(J):
                part = torch.bmm(cs[j, a:a + step].permute(1, 2, 0), gb)
                part.baddbmm_(d[j].permute(1, 2, 0), zb)
                gvecs[j] += part
        if want_gram:
            for j in range(J):
                for l in range(J):
                    gram[j, l] += torch.sum(d[j] * cs[l, a:a + step], 0, dtype=acc)
                gram[j, J] += torch.sum(d[j], 0, dtype=acc)
    if want_vecs:
        gvecs = gvecs.squeeze(2)
        for j, s_j in enumerate(coefs):  # Python numbers: no host-to-device copy (see `_rebuild_z`)
            gvecs[j].mul_(s_j)
    return gvecs, (gram.squeeze(-1) if want_gram else None)


class _BlockRankUpdate(torch.autograd.Function):
    """`z_i + sum_j s_j (ŵ_jiᵀ z_i) ŵ_ji` for every block `i`, with a hand-written backward.

    The operator is symmetric, so the input gradient is the same update applied to the output gradient; the
    vector gradient is `s_j sum_t (c_tj g_t + d_tj z_t)` per block, a `(1 x T) @ (T x k)` product batched over the
    blocks. Only `z` (or what rebuilds it: `lit_gpt.recompute`) and the `J` projections `c` are kept for backward.
    float32/float64 on the CPU run the fused kernel of `cpu_kernel.py` (one pass over the activations each way)
    when it could be built, CUDA tensors the Triton kernels of `gpu_kernel.py`; everything else runs the eager code
    above.
    """

    @staticmethod
    def forward(ctx, z, vecs, coefs):
        ctx.coefs = coefs
        d = z.shape[-1]
        z2 = z.reshape(-1, d).contiguous()
        ctx.kernel = _kernel(vecs, z2)
        if ctx.kernel is not None:
            out, cs = ctx.kernel.forward(z2, vecs, coefs)
        else:
            out = torch.empty_like(z2)
            cs = _eager_update(z2, vecs, coefs, out)
        ctx.save_for_backward(*recompute.keep_rows(ctx, z, z2), vecs, cs)
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, g):
        z, (vecs, cs) = recompute.rows(ctx, ctx.saved_tensors)
        want_z, want_vecs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g2 = cpu_kernel.as_rows(g, z.shape[-1])
        gz = torch.empty(g2.shape, dtype=g.dtype, device=g.device) if want_z else None
        if ctx.kernel is not None:
            _, gvecs, _ = ctx.kernel.backward(g2, z, vecs, ctx.coefs, cs, gz, want_vecs)
        else:
            gvecs, _ = _eager_backward(g2, z, vecs, ctx.coefs, cs, gz, want_vecs)
        return (
            gz.view(g.shape) if want_z else None,
            gvecs.to(vecs.dtype) if want_vecs else None,
            None,
        )


class _RawVectorUpdate(torch.autograd.Function):
    """`_BlockRankUpdate` for the GPU kernels, taking the raw parameters `u` (and `v`) instead of unit vectors: the
    kernels normalise them (and apply block dropout's keep factors) themselves and return the raw parameters'
    gradients, so a step launches one kernel forward and two backward per transform instead of also a dozen small
    operations to normalise, stack and cast the vectors and to take their gradients back through that."""

    @staticmethod
    def forward(ctx, z, keep, coefs, *params):
        d = z.shape[-1]
        z2 = z.reshape(-1, d).contiguous()
        out, cs = gpu_kernel.forward_raw(z2, params, keep, coefs, NORM_EPS)
        ctx.coefs = coefs
        ctx.save_for_backward(*recompute.keep_rows(ctx, z, z2), keep, cs, *params)
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, g):
        z, recipe, parts, (keep, cs, *params) = recompute.rows_or_parts(ctx, ctx.saved_tensors, gpu_kernel.FORMS)
        d = g.shape[-1]
        if recipe is not None:  # the kernel makes z's rows from the tensors that made them
            z = cpu_kernel.kernel_rows(recipe, parts, d, g.dtype)
        want_z, want_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
        g2 = cpu_kernel.as_rows(g, d)
        gz = torch.empty(g2.shape, dtype=g.dtype, device=g.device) if want_z else None
        gw = gpu_kernel.backward_raw(g2, z, params, keep, ctx.coefs, NORM_EPS, cs, gz, want_params)
        return (gz.view(g.shape) if want_z else None, None, None, *_param_grads(gw, len(params)))


def _output_span_forward(kernel, zs, os_, vecs, coefs, bias_s) -> torch.Tensor:
    """One output-side span, `os_ = H (zs - b) + b` (`os_` may be `zs`), on `kernel` (None: eager); returns `c`."""
    beta = None if bias_s is None else (vecs * bias_s.to(vecs.dtype).view(vecs.shape[1:])).sum(-1).contiguous()
    if kernel is not None:
        return kernel.forward(zs, vecs, coefs, out=os_, beta=beta)[1]
    return _eager_update(zs, vecs, coefs, os_, beta)


def _output_span_backward(kernel, gs, kept, vecs, coefs, c, gzs, want_v, bias_s, output_kept):
    """One output-side span's backward from the kept tensor (`H z + b` with `output_kept`, else `z + b`): writes
    `H g` into `gzs` (if given); returns the vector gradient taken with `z` (None unless `want_v`). The CPU kernel
    makes `z` from a kept output block by block (`cpu_kernel.OutputRows`); elsewhere the gradient taken with the
    kept tensor is corrected afterwards (`_rebuild_z`)."""
    if kernel is cpu_kernel and output_kept:
        _, gv, _ = kernel.backward(gs, cpu_kernel.OutputRows(kept, bias_s), vecs, coefs, c, gzs, want_v)
        return gv.to(vecs.dtype) if want_v else None
    rebuild = want_v and (output_kept or bias_s is not None)
    if kernel is not None:
        _, gv, gram = kernel.backward(gs, kept, vecs, coefs, c, gzs, want_v, rebuild)
    else:
        gv, gram = _eager_backward(gs, kept, vecs, coefs, c, gzs, want_v, want_gram=rebuild)
    if rebuild:
        gv = _rebuild_z(gv, vecs, coefs, gram, bias_s, output_kept=output_kept)
    return gv.to(vecs.dtype) if want_v else None


def _output_span_backward_from_input(gs, vecs, coefs, c, gzs, want_v, x2, Ws, icoefs, ivecs):
    """One output-side span's backward on the CPU kernel for `z = W_s x'` where the node kept `x` (rows `x2`) in
    place of the output: `H g` into `gzs`, and the vector gradient (None unless `want_v`), its `sum_t d_tj z_t`
    taken from `x` (`_gemm_input_sums`; `x' = H_in x` with the input span's unit vectors `ivecs`, or `x`)."""
    if not want_v:
        if gzs is not None:
            cpu_kernel.backward(gs, gs, vecs, coefs, c, gzs, False)  # z is not read without the vector gradient
        return None
    J, nb, _ = vecs.shape
    d = torch.empty(J, gs.shape[0], nb, dtype=gs.dtype)
    gv = cpu_kernel.backward(gs, None, vecs, coefs, c, gzs, True, d=d)[1]
    in_transform = None if icoefs is None else lambda M: cpu_kernel.forward(M, ivecs, icoefs, out=M)[0]
    for j, (s_j, zs) in enumerate(zip(coefs, _gemm_input_sums(d, x2, Ws, in_transform, batched=True))):
        gv[j].add_(zs, alpha=s_j)
    return gv.to(vecs.dtype)


def _input_span(lo: int, hi: int, spans, groups) -> tuple:
    """`(coefs, inputs)` of the input span (of a node's `spans`, with its `groups` of inputs) holding rows lo:hi."""
    return next((sp[2], v) for sp, v in zip(spans, groups) if sp[0] <= lo and hi <= sp[1])


def _inside(outs, spans) -> bool:
    """Whether each output span `(lo, hi, ...)` of `outs` lies inside one input span of `spans`."""
    return all(any(ilo <= lo and hi <= ihi for ilo, ihi, _ in spans) for lo, hi, _ in outs)


def _rows_in_workspace(recipe: recompute.Recipe, parts, d: int, dtype: torch.dtype) -> torch.Tensor:
    """A marked input's rows rebuilt from its recipe's inputs: the MLP's product into a reused workspace (a fresh
    tensor of that size costs page faults every step), other recipes by their own function."""
    if recipe.form == "mul" and all(t.dtype == dtype and t.is_contiguous() for t in parts):
        x, y = parts
        return torch.mul(x, y, out=cpu_kernel.workspace(x.shape, dtype, slot=2)).view(-1, d)
    return cpu_kernel.as_rows(recipe.fn(*parts), d)


class _GroupedLinear(torch.autograd.Function):
    """`y[:, lo:hi] = W_s H_s x + b_s` for the row spans of a layer (one span, or those of a fused QKV projection),
    `H_s = I` where a span has no input transform, as one autograd node on the fused kernels: each span's GEMM
    writes its columns of one output (no concatenation), and backward adds every span's input gradient into one
    buffer (the kernel adds `H_s (g_s W_s)` into it, the plain spans' GEMMs accumulate into it) instead of autograd
    summing a gradient per span. The transformed inputs are temporaries (a reused workspace on the CPU): only `x`
    (or what rebuilds it: `lit_gpt.recompute`) is kept. `W` and `b` must be frozen.

    Each span's vectors come as one `(J, nb, k)` tensor of unit vectors (the CPU kernel) or, with `raw` (the GPU
    kernels), as its float32 keep factors (or None) and raw parameters, as for `_OutputRowsUpdate`.

    On the CPU kernel the node also takes the layer's output-side transforms (`outs`, row spans with their unit
    vectors after the input spans' ones), applied as `_OutputRowsUpdate` does with `in_place=True`: on the fresh
    output, which is kept for backward (the next operation of a `lit_gpt.GPT` keeps it anyway). Their input
    gradient is then a temporary too, read only by the GEMMs' backward. With `keep_input` (each output span inside
    one input span; `HouseholderTransform.cpu_output_side_keeps_input`) the node keeps nothing of the output: the
    vector gradient's `sum_t d_t z_t` is taken from `x`, which it keeps anyway, as `_OutputRowsUpdate` does with
    its `source` (`_gemm_input_sums`)."""

    @staticmethod
    def forward(ctx, x, W, b, spans, outs, raw, keep_input, *inputs):
        d = x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        m = W.shape[0]
        out = torch.empty(*x.shape[:-1], m, dtype=x.dtype, device=x.device)  # returned whole: code after may
        y = out.view(-1, m)  # modify it in place, which a view made here would forbid
        groups, cs, buf = _span_inputs(spans, raw, inputs), [], None
        n_in = sum(len(v) for v in groups)
        for (lo, hi, coefs), vecs in zip(spans, groups):
            xs = x2
            if coefs is not None:
                if raw:
                    buf, c = gpu_kernel.forward_raw(x2, vecs[1:], vecs[0], coefs, NORM_EPS, out=buf)
                else:
                    buf = cpu_kernel.workspace(x2.shape, x2.dtype) if buf is None else buf
                    c = cpu_kernel.forward(x2, vecs[0], coefs, out=buf)[1]
                xs = buf
                cs.append(c)
            Ws = W if (lo, hi) == (0, m) else W[lo:hi]
            ys = y if (lo, hi) == (0, m) else y[:, lo:hi]
            if b is None:
                torch.mm(xs, Ws.t(), out=ys)
            else:
                torch.addmm(b if (lo, hi) == (0, m) else b[lo:hi], xs, Ws.t(), out=ys)
        for (lo, hi, coefs), vecs in zip(outs, inputs[n_in:]):  # output side: the CPU kernel, in place
            ys = y if (lo, hi) == (0, m) else y[:, lo:hi]
            cs.append(_output_span_forward(cpu_kernel, ys, ys, vecs, coefs, None if b is None else b[lo:hi]))
        ctx.spans, ctx.outs, ctx.raw, ctx.keep_input = spans, outs, raw, keep_input
        kept_out = (out,) if outs and not keep_input else ()
        ctx.save_for_backward(*recompute.keep_rows(ctx, x, x2), W, b, *kept_out, *inputs, *cs)
        return out

    @staticmethod
    def backward(ctx, g):
        spans, outs, raw = ctx.spans, ctx.outs, ctx.raw
        forms = gpu_kernel.FORMS if raw else cpu_kernel.KERNEL_FORMS
        x2, recipe, parts, (W, b, *rest) = recompute.rows_or_parts(ctx, ctx.saved_tensors, forms)
        d = W.shape[1]
        if recipe is not None and ctx.keep_input:  # the output side's sums need x's rows: made once, for both
            x2 = _rows_in_workspace(recipe, parts, d, g.dtype)
        elif recipe is not None:  # the kernels make x's rows from the tensors that made them
            x2 = cpu_kernel.kernel_rows(recipe, parts, d, g.dtype)
        kept, rest = (rest[0], rest[1:]) if outs and not ctx.keep_input else (None, rest)
        groups = _span_inputs(spans, raw, rest)  # the input spans' vectors, then the output spans', then the c's
        n_in = sum(len(v) for v in groups)
        out_vecs, cs = rest[n_in: n_in + len(outs)], rest[n_in + len(outs):]
        n_transformed = sum(coefs is not None for _, _, coefs in spans)
        m = W.shape[0]
        g2 = cpu_kernel.as_rows(g, m)
        want_x = ctx.needs_input_grad[0]
        out_grads = []
        if outs:  # the output side first: H_s g on its spans (a temporary), g elsewhere
            gy = cpu_kernel.workspace(g2.shape, g2.dtype, slot=1)
            for lo, hi in _gaps(outs, m):
                gy[:, lo:hi] = g2[:, lo:hi]
            for i, ((lo, hi, coefs), vecs) in enumerate(zip(outs, out_vecs)):
                want_v = ctx.needs_input_grad[7 + n_in + i]  # the inputs after (x, W, b, spans, outs, raw, keep_input)
                full = (lo, hi) == (0, m)
                gs, gys = (g2, gy) if full else (g2[:, lo:hi], gy[:, lo:hi])
                c = cs[n_transformed + i]
                if ctx.keep_input:  # z = W_s x' on these rows: its sums from x
                    icoefs, ivecs = _input_span(lo, hi, spans, groups)
                    out_grads.append(_output_span_backward_from_input(
                        gs, vecs, coefs, c, gys, want_v, x2, W[lo:hi], icoefs, ivecs[0] if ivecs else None
                    ))
                    continue
                zs = kept.view(-1, m)[:, lo:hi]
                bs = b[lo:hi].to(kept.dtype) if b is not None else None
                out_grads.append(_output_span_backward(cpu_kernel, gs, zs, vecs, coefs, c, gys, want_v, bs,
                                                       output_kept=True))
            g2 = gy
        cs = iter(cs[:n_transformed])
        gx, grads, at = None, [], 7
        for (lo, hi, coefs), vecs in zip(spans, groups):
            n = len(vecs)
            if coefs is None:
                continue
            gs, Ws = (g2, W) if (lo, hi) == (0, m) else (g2[:, lo:hi], W[lo:hi])
            if raw:
                want_v = any(ctx.needs_input_grad[at + 1: at + n])
                t = gs @ Ws  # the gradient of H_s x; H_s of it goes into gx
                target = (t if gx is None else gx) if want_x else None
                gw = gpu_kernel.backward_raw(t, x2, vecs[1:], vecs[0], coefs, NORM_EPS, next(cs), target, want_v,
                                             accumulate=gx is not None)
                grads += [None, *_param_grads(gw, n - 1)]  # none for the keep factors
            else:
                want_v = ctx.needs_input_grad[at]
                # the first span's gradient becomes gx (updated in place); later ones go through the workspace
                if want_x and gx is None:
                    t = gs @ Ws
                else:
                    t = torch.mm(gs, Ws, out=cpu_kernel.workspace((gs.shape[0], Ws.shape[1]), gs.dtype))
                target = (t if gx is None else gx) if want_x else None
                gv = cpu_kernel.backward(t, x2, vecs[0], coefs, next(cs), target, want_v,
                                         accumulate=gx is not None)[1]
                grads.append(gv.to(vecs[0].dtype) if want_v else None)
            at += n
            gx = target
        if want_x:
            for (lo, hi, coefs), _ in zip(spans, groups):
                if coefs is None:
                    gx.addmm_(g2[:, lo:hi], W[lo:hi])
        gx = gx.view(*g.shape[:-1], d) if want_x else None
        return (gx, None, None, None, None, None, None, *grads, *out_grads)


def _rebuild_z(
    gvecs: torch.Tensor,
    vecs: torch.Tensor,
    coefs: tuple[float, ...],
    gram: torch.Tensor,
    bias: Optional[torch.Tensor],
    output_kept: bool,
) -> torch.Tensor:
    """The vector gradient taken with a kept tensor in place of the transform's input `z`, made the one with `z`.

    The kept tensor is `o = H z + b` (`output_kept`) or `y = z + b`; per block `z = o - b - sum_l s_l c_l ŵ_l`,
    so `sum_t d_tj z_t = sum_t d_tj o_t - (sum_t d_tj) b - sum_l s_l (sum_t d_tj c_tl) ŵ_l`. `gram` holds those
    sums over tokens, so the correction is a few small products."""
    # the coefficients stay Python numbers: a tensor made of them on a GPU would be a host-to-device copy that
    # waits for the whole queue, every step
    J = len(coefs)
    dt = gvecs.dtype
    corr = torch.zeros_like(gvecs)
    if output_kept:
        v = vecs.to(dt)
        for l, s_l in enumerate(coefs):
            corr.addcmul_(gram[:, l, :, None].to(dt), v[l], value=s_l)
    if bias is not None:
        corr.addcmul_(gram[:, J, :, None].to(dt), bias.to(dt).view(vecs.shape[1:]))
    out = gvecs.clone()
    for j, s_j in enumerate(coefs):
        out[j].sub_(corr[j], alpha=s_j)
    return out


class _OutputRowsUpdate(torch.autograd.Function):
    """The output-side transforms of one adapted layer on its GEMM output `y = W x' + b`: for every adapted slice
    `(lo, hi)` of the output rows, `y[..., lo:hi] = H_s (y[..., lo:hi] - b_s) + b_s` (computed as `y + sum_j s_j
    (ŵ_jᵀ y - ŵ_jᵀ b) ŵ_j`, with no pass over `y` for the bias), other rows untouched, bit for bit.

    `in_place=True` updates `y` (a fresh GEMM output nobody else holds) where it lies and keeps the result for
    backward instead of `y`: inside a `lit_gpt.GPT` the next operation keeps that result anyway (attention keeps
    the fused QKV output through its value view, the MLP's SiLU and product keep fc_1's and fc_2's), so there the
    transform keeps nothing of its own. The `z` the vector gradient needs is rebuilt from it (`_rebuild_z`).
    `in_place=False` writes a new tensor and keeps `y`: for models whose code may modify a layer's output in place
    afterwards, which would spoil a kept output.

    Each span's vectors come as one `(J, nb, k)` tensor of unit vectors or, with `raw` (the GPU kernels), as the
    span's float32 keep factors (or None) and its raw parameters, which the kernels normalise themselves and whose
    gradients they return (rebuilding `z` included), as `_RawVectorUpdate` does for the input side.

    `source` (the kernels, `in_place` only): `(in_spans, n)` when `y` is a frozen GEMM's output `W x' + b` whose
    input `x`, `W` and its input spans' inputs are the last `n` of `inputs` (`x`, `W`, then per transformed span of
    `in_spans`, `(lo, hi, coefs or None)` as for `_GroupedLinear`, its unit vectors or, with `raw`, keep factors and
    raw parameters: `x'` is `x` with those transforms). Then the node keeps `x` (or what rebuilds it:
    `lit_gpt.recompute`) instead of its output, and takes the vector gradient's `sum_t d_t z_t` with `z = W x'` as
    `W (sum_t d_t x'_t)` per block, a small product: for the projections into the residual stream, whose outputs
    nothing else keeps while the input is kept anyway (attention's output, the MLP product's factors), that is one
    activation fewer per layer.
    """

    @staticmethod
    def forward(ctx, y, bias, in_place, spans, raw, source, *inputs):
        m = y.shape[-1]
        y2 = y.view(-1, m)
        out = y if in_place else torch.empty_like(y)  # the tensor itself is returned: code after may modify it
        out2 = out.view(-1, m)
        cs, kernel = [], []
        src = ()
        if source is not None:
            inputs, src = inputs[: len(inputs) - source[1]], inputs[len(inputs) - source[1]:]
        for (lo, hi, coefs), vecs in zip(spans, _span_inputs(spans, raw, inputs)):
            zs, os_ = (y2, out2) if (lo, hi) == (0, m) else (y2[:, lo:hi], out2[:, lo:hi])
            if raw:
                bs = bias[lo:hi] if bias is not None else None
                cs.append(gpu_kernel.forward_raw(zs, vecs[1:], vecs[0], coefs, NORM_EPS, out=os_, bias=bs)[1])
                kernel.append(gpu_kernel)
                continue
            vecs = vecs[0]
            use = _kernel(vecs, zs, os_)
            cs.append(_output_span_forward(use, zs, os_, vecs, coefs, None if bias is None else bias[lo:hi]))
            kernel.append(use)
        if not in_place:
            for lo, hi in _gaps(spans, m):
                out2[:, lo:hi] = y2[:, lo:hi]
        ctx.spans, ctx.kernel, ctx.in_place, ctx.raw, ctx.n_inputs = spans, kernel, in_place, raw, len(inputs)
        ctx.source = None if source is None else source[0]
        if in_place:
            ctx.mark_dirty(y)
        if source is None:
            ctx.save_for_backward(y, bias, *inputs, *cs)
        else:  # x (or what rebuilds it), W and the input spans' raw inputs in place of the output
            x, *rest = src
            ctx.save_for_backward(*recompute.keep_rows(ctx, x, x.reshape(-1, x.shape[-1])), bias, *inputs, *cs,
                                  *rest)
        return out

    @staticmethod
    def backward(ctx, g):
        spans, raw = ctx.spans, ctx.raw
        m = g.shape[-1]
        if ctx.source is None:
            kept, bias, *rest = ctx.saved_tensors
            kept2 = kept.view(-1, m)
        else:
            x2, (bias, *rest) = recompute.rows(ctx, ctx.saved_tensors)
            kept2 = None
            rest, (W, *in_inputs) = rest[: ctx.n_inputs + len(spans)], rest[ctx.n_inputs + len(spans):]
            in_spans = ctx.source
            in_groups = _span_inputs(in_spans, raw, in_inputs)
        groups, cs = _span_inputs(spans, raw, rest[: ctx.n_inputs]), rest[ctx.n_inputs:]
        g2 = cpu_kernel.as_rows(g, m)
        want_y, want_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = torch.empty(g2.shape, dtype=g.dtype, device=g.device) if want_y or want_bias else None
        if gy is not None:
            for lo, hi in _gaps(spans, m):
                gy[:, lo:hi] = g2[:, lo:hi]
        gbias = torch.zeros(m, dtype=compute_dtype(g), device=g.device) if want_bias else None
        grads, at = [], 6  # the inputs after (y, bias, in_place, spans, raw, source)
        for i, ((lo, hi, coefs), vecs, c) in enumerate(zip(spans, groups, cs)):
            full = (lo, hi) == (0, m)
            gs = g2 if full else g2[:, lo:hi]
            zs = None if kept2 is None else kept2 if full else kept2[:, lo:hi]
            gzs = (gy if full else gy[:, lo:hi]) if gy is not None else None
            want_v = any(ctx.needs_input_grad[at: at + len(vecs)])
            at += len(vecs)
            if zs is None:  # z = W x' on these rows: its sums from the GEMM's input
                icoefs, ivecs = _input_span(lo, hi, in_spans, in_groups)
            if zs is None and not raw:
                grads.append(_output_span_backward_from_input(gs, vecs[0], coefs, c, gzs, want_v, x2, W[lo:hi],
                                                              icoefs, ivecs[0] if ivecs else None))
            elif zs is None:
                in_transform = None if icoefs is None else (
                    lambda M: gpu_kernel.forward_raw(M, list(ivecs[1:]), ivecs[0], icoefs, NORM_EPS)[0]
                )
                sums = functools.partial(_gemm_input_sums, x2=x2, W=W[lo:hi], in_transform=in_transform,
                                         batched=False)
                gw = gpu_kernel.backward_raw(gs, None, vecs[1:], vecs[0], coefs, NORM_EPS, c, gzs, want_v,
                                             z_sums=sums)
                grads += [None, *_param_grads(gw, len(vecs) - 1)]
            elif raw:
                bs = bias[lo:hi] if bias is not None else None
                gw = gpu_kernel.backward_raw(gs, zs, vecs[1:], vecs[0], coefs, NORM_EPS, c, gzs, want_v,
                                             kept_output=ctx.in_place, bias=bs)
                grads += [None, *_param_grads(gw, len(vecs) - 1)]  # none for the keep factors
            else:
                bs = bias[lo:hi].to(kept.dtype) if bias is not None else None
                grads.append(_output_span_backward(ctx.kernel[i], gs, zs, vecs[0], coefs, c, gzs, want_v, bs,
                                                   output_kept=ctx.in_place))
            if want_bias:  # the bias also enters as `- H b + b`: its own gradient is `g - H g` on these rows
                gbias[lo:hi] = (gs.sum(0, dtype=gbias.dtype) - gzs.sum(0, dtype=gbias.dtype))
        n_src = 0 if ctx.source is None else 2 + len(in_inputs)  # x, W and the input spans' raw inputs
        return (
            gy.view(g.shape) if want_y else None,
            gbias.to(bias.dtype) if want_bias else None,
            None,
            None,
            None,
            None,
            *grads,
            *[None] * n_src,
        )


class _SwiGLUOutputs(torch.autograd.Function):
    """A SwiGLU MLP's `h = silu(H_a a) * (H_b b)` on fc_1's and fc_2's fresh GEMM outputs `a`, `b` as one node on
    the CPU kernel (`cpu_kernel.swiglu_forward`): `a`, `b` are made `H_a a`, `H_b b` in place (a side without a
    transform, vectors None, stays), `s = silu(H_a a)` and `h` are written, a row at a time. It keeps what the
    SiLU and the product would keep (`H_a a`, `s`, `H_b b`) and the projections; backward takes the product's,
    the SiLU's and both transforms' gradients in one visit of each row (each transform's input made from its kept
    output, as `cpu_kernel.OutputRows`). Returns `(h, s, a, b)`: `s` (no gradient flows through it) for the
    product's recipe (`lit_gpt.recompute`), `a` and `b` because they were modified in place (autograd's rule)."""

    @staticmethod
    def forward(ctx, a, b, coefs_a, coefs_b, va, vb):
        n = a.shape[-1]
        a2, b2 = a.view(-1, n), b.view(-1, n)
        s, h, ca, cb = cpu_kernel.swiglu_forward(a2, b2, va, coefs_a, vb, coefs_b)
        ctx.mark_dirty(a, b)
        ctx.set_materialize_grads(False)
        ctx.coefs = (coefs_a, coefs_b)
        ctx.save_for_backward(a, s, b, va, vb, ca, cb)
        s = s.view(a.shape)
        ctx.mark_non_differentiable(s)
        return h.view(a.shape), s, a, b

    @staticmethod
    def backward(ctx, gh, _gs, _ga, _gb):
        a, s, b, va, vb, ca, cb = ctx.saved_tensors
        n = a.shape[-1]
        want_va, want_vb = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        ga, gb, gva, gvb = cpu_kernel.swiglu_backward(
            cpu_kernel.as_rows(gh, n), a.view(-1, n), s, b.view(-1, n), va, ctx.coefs[0], ca, vb, ctx.coefs[1], cb,
            want_va, want_vb,
        )
        return (
            ga.view(a.shape) if ctx.needs_input_grad[0] else None,
            gb.view(b.shape) if ctx.needs_input_grad[1] else None,
            None,
            None,
            gva.to(va.dtype) if gva is not None else None,
            gvb.to(vb.dtype) if gvb is not None else None,
        )


def _gemm_input_sums(
    d: torch.Tensor,
    x2: torch.Tensor,
    W: torch.Tensor,
    in_transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
    batched: bool,
) -> torch.Tensor:
    """`sum_t d_tj z_t` per block, `(J, nb, k)` of `d`'s dtype, for an output-side transform on `z = W x'` (bias
    left out: the transform acts on `z`), from the projections `d` `(J, tokens, nb)` (float32 on a GPU), the
    GEMM's input rows `x2` and its rows `W` `(nb * k, in)`: `W_i (sum_t d_tji x'_t)` for block `i`, where `x' = H
    x` with `in_transform` applying the input span's `H` to rows (None: `x' = x`). `H` acts on each token's row
    alone, so it moves out of the sum: the sums over tokens are one skinny product with `x`, `H` then runs on
    `J * nb` rows, and `W` is read once: by a batch of per-block products (`batched`, the CPU's form) or by one
    GEMM with all of it (the GPU's)."""
    J, T, nb = d.shape
    k = W.shape[0] // nb
    M = _float32_product(d.permute(2, 0, 1).reshape(nb * J, T), x2)  # rows (i, j): sum_t d_tji x_t
    if in_transform is not None:
        M = in_transform(M)
    if batched:  # block i of W times rows (i, j): the arithmetic needed
        return torch.bmm(W.view(nb, k, -1).to(M.dtype), M.view(nb, J, -1).transpose(1, 2)).permute(2, 0, 1)
    # every row times all of W (nb times the arithmetic needed, but one well-shaped GEMM that reads W once, where on
    # a GPU a batch of nb matrix-vector products runs far slower), then block i of rows (i, j)
    out = _float32_product(M, W.t()).view(nb, J, nb, k)
    return torch.diagonal(out, dim1=0, dim2=2).permute(0, 2, 1)


_mm_out_dtype = True  # whether torch.mm takes out_dtype here (CUDA builds of recent PyTorch)


def _float32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` in float32 for a float32 `a` with few rows and a `b` that may be bfloat16/float16: on CUDA `a` is
    split into a high and a low half of `b`'s dtype (together exact to about 16 bits) and both run through one GEMM
    with float32 accumulation and output, so `b` is never copied to float32; elsewhere `b` is taken to float32.
    Where `a` and `b` have one dtype, it is just `a @ b`."""
    low = b.dtype
    if low == a.dtype:
        return a @ b
    global _mm_out_dtype
    if a.is_cuda and _mm_out_dtype:
        try:
            hi = a.to(low)
            out = torch.mm(torch.cat([hi, (a - hi.float()).to(low)]), b, out_dtype=torch.float32)
            return out[: a.shape[0]] + out[a.shape[0]:]
        except (TypeError, RuntimeError):  # a PyTorch without out_dtype: the copy below
            _mm_out_dtype = False
    return a @ b.float()


def _param_grads(gw: Optional[torch.Tensor], n: int) -> list[Optional[torch.Tensor]]:
    """The `n` raw parameters' gradients from `gpu_kernel.backward_raw`'s `(n, nb, k)` result (None: not wanted)."""
    return list(gw.unbind(0)) if gw is not None else [None] * n


def _span_inputs(spans, raw: bool, inputs) -> list[tuple]:
    """The inputs of `_OutputRowsUpdate` or `_GroupedLinear` per span: `(vecs,)`, or with `raw` `(keep, u)` /
    `(keep, u, v)`; none for a span without a transform (`coefs` None)."""
    groups, at = [], 0
    for _, _, coefs in spans:
        n = 0 if coefs is None else 1 + len(coefs) if raw else 1
        groups.append(tuple(inputs[at: at + n]))
        at += n
    return groups


def _gaps(spans, m: int) -> list[tuple[int, int]]:
    """The column ranges of `[0, m)` no span covers (spans are sorted and disjoint)."""
    gaps, at = [], 0
    for lo, hi, _ in spans:
        if lo > at:
            gaps.append((at, lo))
        at = hi
    if at < m:
        gaps.append((at, m))
    return gaps


class HouseholderTransform(BlockTransform):
    """Blocks `I + sum_j s_j ŵ_j ŵ_jᵀ`; parameters ``u`` (and ``v`` for ETHER+), each `(nb, k)`."""

    # On the CPU kernel, adjacent output-side spans of one block size run as one transform over whole rows
    # (`linear_groups`); False runs a strided pass per span (`bench/output_spans.py` compares the two)
    merge_output_spans = True
    # On the CPU kernel, a SwiGLU MLP's output-side transforms of fc_1 and fc_2 run in one node with the SiLU and
    # the product (`swiglu_outputs`); False runs them as their layers' own passes and the SiLU and product as
    # PyTorch operations (`bench/ab_step.py --b lit_gpt.adapters.ether:HouseholderTransform.fuse_swiglu=False`)
    fuse_swiglu = True
    # On the GPU kernels, the output side of a layer that does not widen its input (attention's and the MLP's
    # projections into the residual stream, whose outputs nothing after them keeps) keeps the layer's input (kept
    # anyway) in place of its output (`_OutputRowsUpdate`'s `source`): one activation fewer per projection for a few
    # skinny products in backward; False keeps the output
    # (`bench/ab_step.py --b lit_gpt.adapters.ether:HouseholderTransform.output_side_keeps_input=False`)
    output_side_keeps_input = True
    # The same on the CPU kernel (`_GroupedLinear`'s `keep_input`), off by default: there the products cost about 2%
    # of an ETHER+HH step for about 10% less kept memory (docs/benchmarks.md), and time is what CPU runs lack
    cpu_output_side_keeps_input = False

    def __init__(
        self,
        size: int,
        nb: int,
        coefs: tuple[float, ...],
        block_dropout: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(size, nb, block_dropout)
        self.coefs = tuple(float(c) for c in coefs)
        self.u = nn.Parameter(torch.empty(nb, self.k, device=device, dtype=dtype))
        if len(self.coefs) == 2:
            self.v = nn.Parameter(torch.empty(nb, self.k, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the reference code's init: Kaiming-uniform per block; ETHER+ starts at I with v = -u
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        if len(self.coefs) == 2:
            with torch.no_grad():
                self.v.copy_(-self.u)

    def vector_params(self) -> list[nn.Parameter]:
        """`[u]` (ETHER) or `[u, v]` (ETHER+): the raw `(nb, k)` vectors, one per coefficient."""
        return [self.u] if len(self.coefs) == 1 else [self.u, self.v]

    def unit_vectors(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`(J, nb, k)` unit vectors, normalised in float32 (float64 stays); dropped blocks get a zero vector."""
        vecs = torch.stack([F.normalize(p.to(compute_dtype(p)), dim=-1, eps=NORM_EPS) for p in self.vector_params()])
        if keep is not None:
            vecs = vecs * keep.to(vecs.dtype)[None, :, None]
        return vecs

    def raw_inputs(self, device: torch.device) -> list[Optional[torch.Tensor]]:
        """What the raw-parameter kernels take for this transform on one step: this step's float32 keep factors
        (None without block dropout) and the raw vectors."""
        keep = self.keep_mask(device)
        return [None if keep is None else keep.float(), *self.vector_params()]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _traced_update(z, self.unit_vectors(self.keep_mask(z.device)).to(z.dtype), self.coefs)
        if gpu_kernel.usable_raw(z, self.vector_params()):
            keep, *params = self.raw_inputs(z.device)
            return _RawVectorUpdate.apply(z, keep, self.coefs, *params)
        return _BlockRankUpdate.apply(z, self.unit_vectors(self.keep_mask(z.device)).to(z.dtype), self.coefs)

    @staticmethod
    def apply_output_rows(
        y: torch.Tensor, bias: Optional[torch.Tensor], parts: list, in_place: bool, source: Optional[tuple] = None
    ) -> torch.Tensor:
        """`H_s (y_s - b_s) + b_s` on the rows `(lo, hi)` of the GEMM output `y = W x' + b` for every
        `(lo, hi, transform)` of `parts`: one autograd node per layer (`_OutputRowsUpdate`). `source`, `(x, W,
        in_spans, in_inputs)` as given to `_GroupedLinear`, lets the GPU kernels' node keep the GEMM's input in
        place of the output (see there)."""
        if torch.compiler.is_compiling():  # plain operations, a slice at a time (see `_traced_update`)
            pieces, at = [], 0
            for lo, hi, t in parts:
                bs = 0 if bias is None else bias[lo:hi].to(y.dtype)
                pieces += [y[..., at:lo], t(y[..., lo:hi] - bs) + bs]
                at = hi
            return torch.cat([*pieces, y[..., at:]], dim=-1)
        m = y.shape[-1]
        y2 = y.view(-1, m)
        raw = all(
            gpu_kernel.usable_raw(y, t.vector_params(), y2[:, lo:hi]) for lo, hi, t in parts
        ) and (bias is None or (bias.device == y.device and bias.is_contiguous()))
        spans, inputs = [], []
        for lo, hi, t in parts:
            spans.append((lo, hi, t.coefs))
            if raw:
                inputs += t.raw_inputs(y.device)
            else:
                inputs.append(t.unit_vectors(t.keep_mask(y.device)).to(y.dtype))
        spec = None
        keeps_input = source is not None and (HouseholderTransform.output_side_keeps_input if raw else (
            HouseholderTransform.cpu_output_side_keeps_input
            and all(cpu_kernel.usable(v, y2[:, lo:hi]) for (lo, hi, _), v in zip(spans, inputs))
        ))
        if (keeps_input and in_place
                and source[1].shape[0] <= source[1].shape[1]  # a layer that does not widen its input
                and source[0].is_contiguous() and source[0].dtype == y.dtype):  # x's rows: no copy to keep
            x, W, in_spans, in_inputs = source
            if _inside(spans, in_spans):
                spec = (in_spans, 2 + len(in_inputs))
                inputs += [x, W, *in_inputs]
        return _OutputRowsUpdate.apply(y, bias, in_place, tuple(spans), raw, spec, *inputs)

    @staticmethod
    def swiglu_runs(x: torch.Tensor, transforms: list) -> bool:
        """Whether `swiglu_outputs` runs for these output-side transforms on activations like `x`."""
        return (
            HouseholderTransform.fuse_swiglu
            and cpu_kernel.runs(x.dtype, x.device)
            and not autocast_on(x)
            and all(len(t.coefs) <= cpu_kernel.MAX_VECTORS for t in transforms)
        )

    @staticmethod
    def swiglu_outputs(
        a_fn: Callable[[], torch.Tensor],
        b_fn: Callable[[], torch.Tensor],
        ta: Optional["HouseholderTransform"],
        tb: Optional["HouseholderTransform"],
    ) -> torch.Tensor:
        """`silu(H_a a) * (H_b b)` for fc_1's and fc_2's fresh outputs `a = a_fn()`, `b = b_fn()` (`_SwiGLUOutputs`;
        a transform may be None). Each layer's output-side vectors are taken right after its GEMM, so block
        dropout draws its blocks in the order the layers' own passes would (the same seed, the same blocks)."""

        def vectors(t, y):
            return None if t is None else t.unit_vectors(t.keep_mask(y.device)).to(y.dtype)

        a = a_fn()
        va = vectors(ta, a)
        b = b_fn()
        vb = vectors(tb, b)
        coefs = [None if t is None else t.coefs for t in (ta, tb)]
        h, s, _, b2 = _SwiGLUOutputs.apply(a, b, coefs[0], coefs[1], va, vb)
        if recompute.keeps(h):  # the node keeps silu(H_a a) and H_b b: an adapter on the MLP's proj rebuilds h
            recompute.mark(h, torch.mul, s, b2, form="mul")
        return h

    @staticmethod
    def linear_groups(
        x: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], parts: list, outputs: list = ()
    ) -> Optional[torch.Tensor]:
        """`[W_s H_s x + b_s]_s` over the `(lo, hi, transform or None)` row spans of a layer as one autograd node
        (`_GroupedLinear`) where the fused kernels run (GPU or CPU) and `W`, `b` are frozen; None elsewhere (the
        caller then runs a GEMM per span). `outputs`, `(lo, hi, transform)` spans of output-side transforms, are
        applied too, in place (`_OutputRowsUpdate` with `in_place=True`): inside the node on the CPU kernel."""
        ts = [t for _, _, t in parts if t is not None]
        if (
            not ts
            or W.requires_grad
            or (bias is not None and bias.requires_grad)
            or W.dtype != x.dtype
            or autocast_on(x)
        ):
            return None
        if all(gpu_kernel.usable_raw(x, t.vector_params()) for t in ts):
            raw = True
        elif (
            cpu_kernel.runs(x.dtype, x.device)
            and W.device == x.device
            and (bias is None or bias.device == x.device)
            and all(len(t.coefs) <= cpu_kernel.MAX_VECTORS for t in [*ts, *(t for _, _, t in outputs)])
        ):
            raw = False
        else:
            return None
        spans, inputs = [], []
        for lo, hi, t in parts:
            spans.append((lo, hi, None if t is None else t.coefs))
            if t is None:
                continue
            if raw:
                inputs += t.raw_inputs(x.device)
            else:
                inputs.append(t.unit_vectors(t.keep_mask(x.device)).to(x.dtype))
        outs = []
        if not raw:
            for lo, hi, t in outputs:
                vecs = t.unit_vectors(t.keep_mask(x.device)).to(x.dtype)
                if (HouseholderTransform.merge_output_spans and outs and outs[-1][1] == lo
                        and outs[-1][2] == t.coefs and inputs[-1].shape[2] == t.k):
                    # adjacent spans of one block size (the q, k, v rows of a fused QKV without GQA): their blocks
                    # side by side are one transform, run as one pass over whole rows instead of a strided pass
                    # per span
                    outs[-1] = (outs[-1][0], hi, t.coefs)
                    inputs[-1] = torch.cat([inputs[-1], vecs], dim=1)
                else:
                    outs.append((lo, hi, t.coefs))
                    inputs.append(vecs)
        # the output of a layer that does not widen its input (the projections into the residual stream): nothing
        # after it keeps it, while the node keeps x anyway, so the output side takes its sums from x
        keep_input = bool(
            outs and HouseholderTransform.cpu_output_side_keeps_input and W.shape[0] <= W.shape[1]
            and _inside(outs, spans)
        )
        y = _GroupedLinear.apply(x, W, bias, tuple(spans), tuple(outs), raw, keep_input, *inputs)
        if raw and outputs:
            source = (x, W, tuple(spans), inputs)
            y = HouseholderTransform.apply_output_rows(y, bias, list(outputs), True, source=source)
        return y

    def rank_update(self, x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(C, P)` with `W H x = W x + C Pᵀ`: `C = [Û_jᵀ x]_j` is `(..., J*nb)`, `P = [s_j W Û_j]_j` is
        `(m, J*nb)`, where `Û_j` places block `i`'s unit vector in rows `i*k:(i+1)*k` of column `i`."""
        vecs = self.unit_vectors(self.keep_mask(x.device)).to(x.dtype)
        J, nb, k = vecs.shape
        xr = x.reshape(*x.shape[:-1], nb, k)
        C = torch.cat([(xr * vecs[j]).sum(-1) for j in range(J)], dim=-1)
        Wr = W.reshape(W.shape[0], nb, k)
        # multiply-and-sum streams W once per vector; einsum would route this through a strided bmm (6x slower)
        P = torch.cat([(Wr * (s * vecs[j])).sum(-1) for j, s in enumerate(self.coefs)], dim=-1)
        return C, P

    def blocks(self) -> torch.Tensor:
        vecs = self.unit_vectors()
        eye = torch.eye(self.k, dtype=vecs.dtype, device=vecs.device)
        H = eye.expand(self.nb, self.k, self.k).clone()
        for s, w in zip(self.coefs, vecs):
            H += s * w[:, :, None] * w[:, None, :]
        return H


ETHER_COEFS = (-2.0,)
ETHERPLUS_COEFS = (-1.0, 1.0)


@register_method("ether", "etherplus", "etherplusHH")
def build_householder(
    config: AdapterConfig, layer: str, in_features: int, out_features: int, device, dtype
) -> MultiplicativeAdapter:
    coefs = ETHER_COEFS if config.method == "ether" else ETHERPLUS_COEFS

    def side(size: int, which: str) -> HouseholderTransform:
        nb = num_blocks(config, size, layer, which)
        return HouseholderTransform(size, nb, coefs, config.block_dropout, device=device, dtype=dtype)

    if config.method == "etherplusHH":
        return MultiplicativeAdapter(input=side(in_features, "input"), output=side(out_features, "output"))
    if config.flip_side:
        return MultiplicativeAdapter(output=side(out_features, "output"))
    return MultiplicativeAdapter(input=side(in_features, "input"))
