"""The fused CPU kernel of the Householder family (lit_gpt/adapters/cpu_kernel.py) against docs/METHODS.md's blocks in
float64 and against the eager path, and its fallbacks: switched off, no compiler, a failing compiler."""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from lit_gpt.adapters import cpu_kernel
from lit_gpt.adapters.ether import _BlockRankUpdate

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel could not be built")

COEFS = {"ether": (-2.0,), "etherplus": (-1.0, 1.0)}


def dense_blocks(vecs: torch.Tensor, coefs) -> torch.Tensor:
    """docs/METHODS.md: `H = diag(I + sum_j s_j ŵ_j ŵ_jᵀ)` as one dense matrix (vectors already unit length)."""
    J, nb, k = vecs.shape
    eye = torch.eye(k, dtype=vecs.dtype)
    return torch.block_diag(*[eye + sum(s * torch.outer(vecs[j, i], vecs[j, i]) for j, s in enumerate(coefs))
                              for i in range(nb)])


@contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(z, vecs, coefs, g, eager: bool):
    z = z.detach().clone().requires_grad_()
    vecs = vecs.detach().clone().requires_grad_()
    if eager:
        with cpu_kernel.disabled():
            out = _BlockRankUpdate.apply(z, vecs, coefs)
    else:
        out = _BlockRankUpdate.apply(z, vecs, coefs)
    out.backward(g)
    return out.detach(), z.grad, vecs.grad


@needs_kernel
@pytest.mark.parametrize("method", ["ether", "etherplus"])
@pytest.mark.parametrize(
    "shape,nb",
    [((3, 7, 24), 4), ((2, 5, 12), 1), ((1, 1, 16), 16), ((130, 64), 8)]
    # block sizes the kernel compiles as constants: 16, 32, 64, 128
    + [((2, 3, 16 * nb_), nb_) for nb_ in (1, 3)] + [((4, 64), 2), ((3, 128), 2), ((2, 256), 2)],
)
def test_kernel_computes_the_dense_formula_in_float64(method, shape, nb):
    coefs = COEFS[method]
    torch.manual_seed(0)
    d = shape[-1]
    z = torch.randn(*shape, dtype=torch.float64)
    vecs = F.normalize(torch.randn(len(coefs), nb, d // nb, dtype=torch.float64), dim=-1)
    g = torch.randn(*shape, dtype=torch.float64)
    out, gz, gv = run(z, vecs, coefs, g, eager=False)
    H = dense_blocks(vecs, coefs)
    torch.testing.assert_close(out, z @ H.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, g @ H, rtol=1e-12, atol=1e-12)
    # the vector gradient through the dense formula, by autograd
    v = vecs.clone().requires_grad_()
    (z @ dense_blocks(v, coefs).T * g).sum().backward()
    torch.testing.assert_close(gv, v.grad, rtol=1e-10, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0)])
def test_kernel_gradcheck(coefs):
    torch.manual_seed(0)
    z = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    vecs = torch.randn(len(coefs), 3, 4, dtype=torch.float64, requires_grad=True)
    assert cpu_kernel.usable(vecs, z)
    assert torch.autograd.gradcheck(lambda z, v: _BlockRankUpdate.apply(z, v, coefs), (z, vecs))


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0)])
def test_kernel_equals_eager_path_in_float32(coefs, n_threads):
    """Large enough for the threaded loops (and per-thread vector-gradient sums), with a dropped (zero) block."""
    with threads(n_threads):
        torch.manual_seed(1)
        z = torch.randn(4, 300, 256)
        assert z.numel() >= cpu_kernel.PARALLEL_MIN_NUMEL
        vecs = F.normalize(torch.randn(len(coefs), 8, 32), dim=-1)
        vecs[:, 3] = 0  # block dropout hands the update a zero vector: that block is the identity
        g = torch.randn_like(z)
        a = run(z, vecs, coefs, g, eager=False)
        b = run(z, vecs, coefs, g, eager=True)
    for x, y in zip(a, b):  # float32 sums in another order: relative to each tensor's scale
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    torch.testing.assert_close(a[0][..., 96:128], z[..., 96:128], rtol=0, atol=0)


@needs_kernel
def test_kernel_takes_non_contiguous_inputs_and_partial_gradients():
    torch.manual_seed(2)
    coefs = (-1.0, 1.0)
    big = torch.randn(6, 40, dtype=torch.float64)
    z = big[:, 4:28].detach().requires_grad_()  # a column slice, as on a fused QKV output
    assert not z.is_contiguous()
    vecs = F.normalize(torch.randn(2, 3, 8, dtype=torch.float64), dim=-1)
    out = _BlockRankUpdate.apply(z, vecs, coefs)  # only z needs a gradient
    g = torch.randn(40, 6, dtype=torch.float64).t()[:, :24]  # a non-contiguous output gradient
    out.backward(g)
    H = dense_blocks(vecs, coefs)
    torch.testing.assert_close(out, z.detach() @ H.T)
    torch.testing.assert_close(z.grad, g @ H)
    v = vecs.clone().requires_grad_()  # only the vectors need one
    out = _BlockRankUpdate.apply(big[:, 4:28], v, coefs)
    out.backward(g)
    w = vecs.clone().requires_grad_()
    (big[:, 4:28] @ dense_blocks(w, coefs).T * g).sum().backward()
    torch.testing.assert_close(v.grad, w.grad)


def test_other_dtypes_and_devices_take_the_eager_path():
    vecs = torch.randn(2, 3, 4)
    assert not cpu_kernel.usable(vecs.bfloat16())
    assert not cpu_kernel.usable(vecs, torch.randn(5, 12, dtype=torch.float64))
    assert not cpu_kernel.usable(vecs, torch.randn(12, 5).t())
    assert not cpu_kernel.usable(torch.randn(5, 3, 4))  # more vectors than the kernel takes
    with cpu_kernel.disabled():
        assert not cpu_kernel.usable(vecs)


def test_environment_switch_turns_the_kernel_off():
    code = "from lit_gpt.adapters import cpu_kernel; print(cpu_kernel.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **__import__("os").environ, cpu_kernel.ENV_SWITCH: "0"}, check=True).stdout
    assert out.strip() == "False"


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # found on PATH, exits 1
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert not cpu_kernel.available()
    assert "eager path" in caplog.text
    assert not list((tmp_path / "lit_gpt" / "kernels").glob("*.so"))  # nothing half-written left behind
    # and the update still computes the formula
    torch.manual_seed(0)
    z = torch.randn(3, 8, dtype=torch.float64)
    vecs = F.normalize(torch.randn(1, 2, 4, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(_BlockRankUpdate.apply(z, vecs, (-2.0,)), z @ dense_blocks(vecs, (-2.0,)).T)


def test_no_compiler_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    assert not cpu_kernel.available()


@needs_kernel
def test_the_library_is_built_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cc = cpu_kernel._compiler()
    first = cpu_kernel._build(cc)
    mtime = first.stat().st_mtime_ns
    assert cpu_kernel._build(cc) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left


@needs_kernel
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0)])
def test_kernel_updates_a_column_slice_in_place_with_a_bias_offset(coefs):
    """The output side's use: the rows of one slice of a fused GEMM output `y = z + b`, updated where they lie to
    `H (y - b) + b`, the other columns untouched; `c` is `ŵᵀ (y - b)`."""
    torch.manual_seed(3)
    big = torch.randn(7, 40, dtype=torch.float64)
    before = big.clone()
    lo, hi = 8, 32
    vecs = F.normalize(torch.randn(len(coefs), 3, 8, dtype=torch.float64), dim=-1)
    b = torch.randn(hi - lo, dtype=torch.float64)
    beta = (vecs * b.view(3, 8)).sum(-1).contiguous()
    view = big[:, lo:hi]
    assert cpu_kernel.usable(vecs, view) and cpu_kernel.row_stride(view) == 40
    out, c = cpu_kernel.forward(view, vecs, coefs, out=view, beta=beta)
    assert out.data_ptr() == view.data_ptr()
    H = dense_blocks(vecs, coefs)
    torch.testing.assert_close(big[:, lo:hi], (before[:, lo:hi] - b) @ H.T + b, rtol=1e-12, atol=1e-12)
    assert torch.equal(big[:, :lo], before[:, :lo]) and torch.equal(big[:, hi:], before[:, hi:])
    expected_c = torch.einsum("tik,jik->jti", (before[:, lo:hi] - b).view(7, 3, 8), vecs)
    torch.testing.assert_close(c, expected_c, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0)])
def test_kernel_backward_writes_strided_slices_and_sums_the_gram(coefs, n_threads):
    with threads(n_threads):
        torch.manual_seed(4)
        T, m, lo, hi, nb, k = 600, 96, 16, 80, 2, 32  # enough numbers for two threads
        g, z = torch.randn(T, m, dtype=torch.float64), torch.randn(T, m, dtype=torch.float64)
        vecs = F.normalize(torch.randn(len(coefs), nb, k, dtype=torch.float64), dim=-1)
        c = torch.randn(len(coefs), T, nb, dtype=torch.float64)
        gz = torch.full((T, m), 7.0, dtype=torch.float64)
        _, gv, gram = cpu_kernel.backward(g[:, lo:hi], z[:, lo:hi], vecs, coefs, c, gz[:, lo:hi], True, want_gram=True)
    H = dense_blocks(vecs, coefs)
    torch.testing.assert_close(gz[:, lo:hi], g[:, lo:hi] @ H, rtol=1e-12, atol=1e-12)
    assert (gz[:, :lo] == 7).all() and (gz[:, hi:] == 7).all()
    gr, zr = g[:, lo:hi].reshape(T, nb, k), z[:, lo:hi].reshape(T, nb, k)
    d = torch.einsum("tik,jik->jti", gr, vecs)
    s = torch.tensor(coefs, dtype=torch.float64)
    expected_gv = s[:, None, None] * (torch.einsum("jti,tik->jik", c, gr) + torch.einsum("jti,tik->jik", d, zr))
    torch.testing.assert_close(gv, expected_gv, rtol=1e-10, atol=1e-10)
    J = len(coefs)
    expected_gram = torch.cat([torch.einsum("jti,lti->jli", d, c), d.sum(1)[:, None]], dim=1)
    assert gram.shape == (J, J + 1, nb)
    torch.testing.assert_close(gram, expected_gram, rtol=1e-10, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0), (-1.0, 1.0, 0.5)])
def test_kernel_backward_in_place_and_accumulating(coefs):
    """`gz` may be `g` itself (the vector gradient still sees the `g` that came in), and `accumulate` adds `H g` to
    what `gz` holds: how the fused layer node (`_GroupedLinear`) gathers its spans' input gradients in one buffer."""
    torch.manual_seed(5)
    T, nb, k = 37, 3, 16
    g, z = torch.randn(T, nb * k, dtype=torch.float64), torch.randn(T, nb * k, dtype=torch.float64)
    vecs = F.normalize(torch.randn(len(coefs), nb, k, dtype=torch.float64), dim=-1)
    c = torch.randn(len(coefs), T, nb, dtype=torch.float64)
    H = dense_blocks(vecs, coefs)
    _, ref_gv, _ = cpu_kernel.backward(g, z, vecs, coefs, c, None, True)

    inplace = g.clone()
    _, gv, _ = cpu_kernel.backward(inplace, z, vecs, coefs, c, inplace, True)
    torch.testing.assert_close(inplace, g @ H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-12, atol=1e-12)

    held = torch.randn(T, nb * k, dtype=torch.float64)
    target = held.clone()
    _, gv, _ = cpu_kernel.backward(g, z, vecs, coefs, c, target, True, accumulate=True)
    torch.testing.assert_close(target, held + g @ H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0), (-1.0, 1.0, 0.5)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_backward_makes_z_from_the_kept_output(coefs, bias):
    """`OutputRows`: the output `o = H (z - b) + b` of an update made in place stands in for `z`; the kernel makes
    `z = o - b - sum_l s_l c_l ŵ_l` block by block, so the vector gradient is the one taken with `z` itself."""
    torch.manual_seed(6)
    T, nb, k = 29, 3, 32
    z, g = torch.randn(T, nb * k, dtype=torch.float64), torch.randn(T, nb * k, dtype=torch.float64)
    vecs = F.normalize(torch.randn(len(coefs), nb, k, dtype=torch.float64), dim=-1)
    b = torch.randn(nb * k, dtype=torch.float64) if bias else None
    y = z + b if bias else z.clone()
    beta = (vecs * b.view(nb, k)).sum(-1).contiguous() if bias else None
    o, c = cpu_kernel.forward(y, vecs, coefs, out=y, beta=beta)  # in place: y now holds the output
    ref_gz, ref_gv, _ = cpu_kernel.backward(g, z, vecs, coefs, c, torch.empty_like(g), True)
    gz, gv, _ = cpu_kernel.backward(g, cpu_kernel.OutputRows(o, b), vecs, coefs, c, torch.empty_like(g), True)
    torch.testing.assert_close(gz, ref_gz, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-10, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplusHH"])
@pytest.mark.parametrize(
    "targets,bias",
    [(["query", "value"], True), (["key"], False), (["query", "key", "value"], False), (["mlp"], True)],
)
@pytest.mark.parametrize("input_grad", [True, False])
def test_layer_as_one_node_against_float64(method, targets, bias, input_grad, monkeypatch):
    """On the CPU kernel an adapted layer's input-side transforms and GEMMs run as one node (`_GroupedLinear`: for
    a fused QKV projection a GEMM per span into one output, the spans' input gradients added into one buffer, the
    transformed inputs in a reused workspace): the same output and gradients as the eager float64 path, with and
    without an input that requires grad (block 0's QKV reads the frozen embedding's norm)."""
    from lit_gpt import GPT, Config
    from lit_gpt.adapters import AdapterConfig, apply_adapters
    from lit_gpt.adapters.ether import _GroupedLinear

    torch.manual_seed(7)
    config = Config(name="t", block_size=8, vocab_size=32, padded_vocab_size=32, n_layer=1, n_head=4,
                    n_query_groups=2, n_embd=48, intermediate_size=64, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", bias=bias)
    model = apply_adapters(GPT(config).double(), AdapterConfig(method=method, nb=4, targets=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()
    layer = model.transformer.h[0].attn.qkv if targets != ["mlp"] else model.transformer.h[0].mlp.proj
    layer_node_against_float64(layer, _GroupedLinear, input_grad, monkeypatch)


def layer_node_against_float64(layer, node, input_grad: bool, monkeypatch) -> None:
    """`layer` (float64) run in float32 through the autograd Function `node` (which must run) gives the output and
    the gradients of the input and of the trainable parameters that the eager float64 path gives."""
    x = torch.randn(2, 7, layer.in_features, dtype=torch.float64)
    g = torch.randn(2, 7, layer.out_features, dtype=torch.float64)

    def run(dtype):
        layer.zero_grad(set_to_none=True)
        lay = layer.to(dtype=dtype)
        xx = x.to(dtype).detach().clone().requires_grad_(input_grad)
        y = lay(xx)
        y.backward(g.to(dtype))
        return [y.detach().double(), xx.grad.double() if input_grad else None] + [
            p.grad.double() for p in lay.parameters() if p.requires_grad]

    with cpu_kernel.disabled():
        ref = run(torch.float64)
    calls = []
    monkeypatch.setattr(node, "apply", lambda *a, f=node.apply: calls.append(1) or f(*a))
    got = run(torch.float32)
    assert calls, "the layer node did not run"
    for a, r in zip(got, ref, strict=True):
        if r is None:
            assert a is None
            continue
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()))


@needs_kernel
def test_the_workspace_serves_inference_and_training_in_turn():
    """The reused workspace of `_GroupedLinear` first made under `torch.inference_mode` (generation, evaluation)
    still serves a training step afterwards, and the other way round."""
    from lit_gpt import GPT, Config
    from lit_gpt.adapters import AdapterConfig, apply_adapters

    cpu_kernel._workspaces.__dict__.pop("bufs", None)  # as in a fresh process
    torch.manual_seed(0)
    config = Config(name="t", block_size=8, vocab_size=32, padded_vocab_size=32, n_layer=1, n_head=4,
                    n_query_groups=2, n_embd=32, intermediate_size=64, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP")
    model = apply_adapters(GPT(config), AdapterConfig(method="etherplusHH", nb=4, targets=["all-linear"]))
    idx = torch.randint(0, 32, (2, 8))
    with torch.inference_mode():
        expected = model(idx)
    out = model(idx)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), expected)


@needs_kernel
@pytest.mark.parametrize("vector_code", [True, False])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0), (-1.0, 1.0, 0.5)])
@pytest.mark.parametrize(
    "dtype,k",
    # float32 vectors hold 8 numbers, float64 ones 4: blocks with a partial last vector (9, 18, 86; 6, 13), whole
    # vectors (24; 8, 12) and blocks shorter than a vector (5; 3)
    [(torch.float32, k) for k in (9, 18, 86, 24, 5)] + [(torch.float64, k) for k in (6, 13, 8, 12, 3)],
)
def test_every_block_size_and_way_of_giving_z(dtype, k, coefs, n_threads, vector_code, monkeypatch):
    """The explicit vector code covers a block by whole vectors and, where the vector length does not divide the
    block size, one more ending at the block's end that overlaps the one before it; its lanes that overlap must add
    nothing to the dot products, the vector gradient or an accumulated gradient, and an update in place must not
    read numbers it has already written. Forward and backward against docs/METHODS.md's blocks in float64, `z` given as
    rows (a column slice), as an RMSNorm's parts, as the MLP's product (both bit for bit the rows' result) and as
    the kept output of an update in place with a bias, or not at all (the sums without `z`, the projections
    returned); the input gradient in place and accumulated; the plain loops (`VECTOR_CODE = False`) alike."""
    monkeypatch.setattr(cpu_kernel, "VECTOR_CODE", vector_code)
    torch.manual_seed(8)
    T, nb, J = 301, 3, len(coefs)  # two threads split the rows unevenly
    d = nb * k
    eps = 1e-5 if dtype == torch.float32 else 1e-12

    def close(a, ref):  # float32 sums over many rows: relative to the tensor's scale
        torch.testing.assert_close(a.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())
    x, y = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
    r, w = torch.rand(T, dtype=torch.float64) + 0.5, torch.randn(d, dtype=torch.float64)
    g, b = torch.randn(T, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    vecs = F.normalize(torch.randn(J, nb, k, dtype=torch.float64), dim=-1)
    H = dense_blocks(vecs, coefs)
    s = torch.tensor(coefs, dtype=torch.float64)

    def expected_gv(z, c):  # s_j sum_t (c_tj g_t + d_tj z_t) per block
        gr, zr = g.view(T, nb, k), z.view(T, nb, k)
        dd = torch.einsum("tik,jik->jti", gr, vecs)
        return s[:, None, None] * (torch.einsum("jti,tik->jik", c.double(), gr) + torch.einsum("jti,tik->jik", dd, zr))

    xs, ys, rs, ws, gs, bs, vs = (t.to(dtype) for t in (x, y, r, w, g, b, vecs))
    with threads(n_threads):
        wide = torch.zeros(T, d + 7, dtype=dtype)  # the rows as a column slice of a wider matrix
        z = wide[:, 2: 2 + d]
        z.copy_(xs)
        out, c = cpu_kernel.forward(z, vs, coefs)
        close(out, x @ H.T)
        close(c, torch.einsum("tik,jik->jti", x.view(T, nb, k), vecs))
        gz, gv, _ = cpu_kernel.backward(gs, z, vs, coefs, c, torch.empty_like(gs), True)
        close(gz, g @ H)
        close(gv, expected_gv(x, c))

        # z made from its producer's tensors: the same numbers, so the same sums bit for bit
        for made, parts in [(ws * (xs * rs[:, None]), cpu_kernel.ScaledRows(xs, rs, ws)),
                            (xs * ys, cpu_kernel.ProductRows(xs, ys))]:
            _, c = cpu_kernel.forward(made, vs, coefs)
            gz_rows, gv_rows, _ = cpu_kernel.backward(gs, made, vs, coefs, c, torch.empty_like(gs), True)
            gz_parts, gv_parts, _ = cpu_kernel.backward(gs, parts, vs, coefs, c, torch.empty_like(gs), True)
            assert torch.equal(gv_parts, gv_rows) and torch.equal(gz_parts, gz_rows)

        # z made from the kept output of an update in place, with a bias: o = H (z - b) + b
        o = xs + bs
        beta = (vs * bs.view(nb, k)).sum(-1).contiguous()
        _, c = cpu_kernel.forward(o, vs, coefs, out=o, beta=beta)
        close(o, x @ H.T + b)
        _, gv, _ = cpu_kernel.backward(gs, cpu_kernel.OutputRows(o, bs), vs, coefs, c, None, True)
        close(gv, expected_gv(x, c))

        # z not given: the sums leave out d_tj z_t and the projections d come back, for a caller that takes the
        # rest from what made z (a GEMM's input)
        _, c = cpu_kernel.forward(xs, vs, coefs)
        dd = torch.full((J, T, nb), float("nan"), dtype=dtype)
        gz, gv, _ = cpu_kernel.backward(gs, None, vs, coefs, c, torch.empty_like(gs), True, d=dd)
        close(gz, g @ H)
        close(dd, torch.einsum("tik,jik->jti", g.view(T, nb, k), vecs))
        close(gv, s[:, None, None] * torch.einsum("jti,tik->jik", c.double(), g.view(T, nb, k)))

        # the input gradient in place of g, and added to what the target holds
        inplace = gs.clone()
        cpu_kernel.backward(inplace, z, vs, coefs, c, inplace, False)
        close(inplace, g @ H)
        held = torch.randn(T, d, dtype=dtype)
        target = held.clone()
        cpu_kernel.backward(gs, z, vs, coefs, c, target, False, accumulate=True)
        close(target, held.double() + g @ H)
