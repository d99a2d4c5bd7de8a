"""The fused Triton kernels of the Householder family (lit_gpt/adapters/gpu_kernel.py) against docs/METHODS.md's blocks
(float64 references) and against the eager path.

They run on a CUDA GPU when there is one. Without one, `test_kernels_in_triton_interpreter` runs this file again in a
child process under Triton's interpreter (`TRITON_INTERPRET=1` on CPU tensors; Triton reads it when it is first
imported, so it cannot be switched on inside a process that may have imported Triton already), and is skipped when
Triton is not installed."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from lit_gpt.adapters import AdapterConfig, apply_adapters, cpu_kernel, gpu_kernel
from lit_gpt.adapters.ether import _BlockRankUpdate, _OutputRowsUpdate
from test_cpu_kernel import dense_blocks

CUDA = torch.cuda.is_available()
CHILD = "LIT_GPT_TRITON_INTERPRETER_CHILD"
INTERPRETER = os.environ.get(CHILD) == "1" and os.environ.get("TRITON_INTERPRET") == "1"
direct = pytest.mark.skipif(not (CUDA or INTERPRETER), reason="no GPU: run by test_kernels_in_triton_interpreter")


def start_interpreter_child() -> Optional[subprocess.Popen]:
    """This file's tests in a child pytest under Triton's interpreter, started (its output in `.output`, a temporary
    file); None where they run directly (a GPU, or already the child) or Triton is missing. conftest.py starts it
    when the session begins, so that it runs beside the other tests."""
    if CUDA or INTERPRETER or importlib.util.find_spec("triton") is None:
        return None
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        # (one process: not the project's parallel workers, -n in addopts)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", __file__],
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1", CHILD: "1"},
        stdout=output, stderr=subprocess.STDOUT, text=True,
    )
    proc.output = output
    return proc


def test_kernels_in_triton_interpreter(request):
    if CUDA or INTERPRETER:
        pytest.skip("the kernel tests run directly in this process")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("neither a CUDA GPU nor Triton (for its interpreter) is available")
    from conftest import TRITON_INTERPRETER_CHILD

    proc = request.config.stash.get(TRITON_INTERPRETER_CHILD, None) or start_interpreter_child()
    proc.wait()
    proc.output.seek(0)
    out = proc.output.read()
    assert proc.returncode == 0, out[-8000:]
    assert " passed" in out and "failed" not in out


COEFS = {"ether": (-2.0,), "etherplus": (-1.0, 1.0)}


def test_kernels_that_cannot_run_fall_back_to_the_eager_path_with_a_warning(monkeypatch, caplog):
    """A Triton or driver that cannot build or run the kernels on a device costs speed, never the run: the first
    use's check fails, a warning names the switch, and the check is not repeated."""
    calls = []

    def broken(device):
        calls.append(device)
        raise RuntimeError("ptxas fatal: unsupported architecture\nmore detail")

    monkeypatch.setattr(gpu_kernel, "_device_ok", {})
    monkeypatch.setattr(gpu_kernel, "_selftest", broken)
    with caplog.at_level("WARNING"):
        assert gpu_kernel._works_on(torch.device("cpu")) is False
        assert gpu_kernel._works_on(torch.device("cpu")) is False
    assert len(calls) == 1
    assert "ptxas fatal: unsupported architecture" in caplog.text and "LIT_GPT_GPU_KERNEL=0" in caplog.text
    monkeypatch.setattr(gpu_kernel, "_selftest", lambda device: False)  # wrong numbers: the same fallback
    monkeypatch.setattr(gpu_kernel, "_device_ok", {})
    assert gpu_kernel._works_on(torch.device("cpu")) is False


@pytest.fixture
def device(monkeypatch):
    """The device the kernels run on: the GPU, or the CPU under the interpreter (with the CPU kernel switched off,
    so that the Triton one is what runs)."""
    monkeypatch.delenv("LIT_GPT_GPU_KERNEL", raising=False)
    if not CUDA:
        monkeypatch.setattr(cpu_kernel, "_switched_off", 1)
    return torch.device("cuda" if CUDA else "cpu")


def unit(J, nb, k, dtype=torch.float64):
    return F.normalize(torch.randn(J, nb, k, dtype=dtype), dim=-1)


@direct
@pytest.mark.parametrize("method", ["ether", "etherplus"])
@pytest.mark.parametrize("T,nb,k", [(5, 3, 8), (37, 2, 12), (300, 1, 16), (2000, 1, 16), (64, 4, 128), (9, 2, 344)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward_against_the_formula(device, method, T, nb, k, bias):
    """`out = H (z - b) + b`, `c = ŵᵀ (z - b)`, `gz = H g`, the vector gradient `s_j sum_t (c_tj g_t + d_tj z_t)`
    and the gram sums, with odd block sizes (padded tiles), token counts that are no multiple of a tile, and more
    token tiles than programs (each program walks several)."""
    coefs = COEFS[method]
    torch.manual_seed(T + nb + k)
    J, d = len(coefs), nb * k
    z, g, vecs = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64), unit(J, nb, k)
    b = torch.randn(d, dtype=torch.float64) if bias else torch.zeros(d, dtype=torch.float64)
    H = dense_blocks(vecs, coefs)
    c_ref = torch.einsum("tnk,jnk->jtn", (z - b).view(T, nb, k), vecs)
    d_ref = torch.einsum("tnk,jnk->jtn", g.view(T, nb, k), vecs)
    s = torch.tensor(coefs, dtype=torch.float64)
    gv_ref = s[:, None, None] * (torch.einsum("jtn,tnk->jnk", c_ref, g.view(T, nb, k))
                                 + torch.einsum("jtn,tnk->jnk", d_ref, (z - b).view(T, nb, k)))
    gram_ref = torch.cat([torch.einsum("jtn,ltn->jln", d_ref, c_ref), d_ref.sum(1)[:, None]], dim=1)

    f32 = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    zz, vv = f32(z), f32(vecs).contiguous()
    beta = f32(torch.einsum("jnk,nk->jn", vecs, b.view(nb, k))) if bias else None
    assert gpu_kernel.usable(vv, zz)
    out, c = gpu_kernel.forward(zz, vv, coefs, beta=beta)
    torch.testing.assert_close(out.double().cpu(), (z - b) @ H.T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.double().cpu(), c_ref, rtol=1e-5, atol=1e-5)

    gz = torch.full_like(zz, float("nan"))  # every element must be written
    _, gv, gram = gpu_kernel.backward(f32(g), f32(z - b), vv, coefs, c, gz, True, True)
    torch.testing.assert_close(gz.double().cpu(), g @ H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv.double().cpu(), gv_ref, rtol=1e-4, atol=1e-4 * T ** 0.5)
    torch.testing.assert_close(gram.double().cpu(), gram_ref, rtol=1e-4, atol=1e-4 * T ** 0.5)


@direct
def test_in_place_on_a_column_slice_leaves_the_other_columns(device):
    """The output side updates a slice of a fused output where it lies: rows of stride wider than the slice."""
    torch.manual_seed(0)
    T, nb, k = 33, 2, 8
    y = torch.randn(T, 3 * nb * k, device=device)
    before = y.clone()
    vecs = unit(2, nb, k).float().to(device)
    zs = y[:, nb * k: 2 * nb * k]
    gpu_kernel.forward(zs, vecs, COEFS["etherplus"], out=zs)
    H = dense_blocks(vecs.double().cpu(), COEFS["etherplus"])
    torch.testing.assert_close(y[:, nb * k: 2 * nb * k].double().cpu(), before[:, nb * k: 2 * nb * k].double().cpu()
                               @ H.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, : nb * k], before[:, : nb * k]) and torch.equal(y[:, 2 * nb * k:], before[:, 2 * nb * k:])


@direct
@pytest.mark.parametrize("method", ["ether", "etherplus"])
def test_autograd_node_matches_eager(device, method):
    """`_BlockRankUpdate` and `_OutputRowsUpdate` (in place, with a bias and two slices) give the eager path's
    values and gradients when they run the Triton kernels."""
    coefs = COEFS[method]
    torch.manual_seed(1)
    T, nb, k = 50, 4, 16
    z = torch.randn(2, T // 2, nb * k, device=device)
    vecs = unit(len(coefs), nb, k).float().to(device)
    g = torch.randn_like(z)
    bias = torch.randn(3 * nb * k, device=device)

    def run(kernel: bool):
        zz, vv, bb = z.clone().requires_grad_(), vecs.clone().requires_grad_(), bias.clone().requires_grad_()
        v2 = vv.flip(1).contiguous()
        with (gpu_kernel.disabled() if not kernel else torch.enable_grad()):
            out = _BlockRankUpdate.apply(zz, vv, coefs)
            y = torch.cat([out, out * 2, out], -1) + 0.0
            spans = ((0, nb * k, coefs), (2 * nb * k, 3 * nb * k, coefs))
            o = _OutputRowsUpdate.apply(y, bb, True, spans, False, None, vv, v2)
        ((o * torch.cat([g, g, -g], -1)).sum() + (out * g).sum()).backward()
        return o.detach(), zz.grad, vv.grad, bb.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@direct
@pytest.mark.parametrize("method", ["ether", "etherplus"])
@pytest.mark.parametrize("dropout", [False, True])
def test_raw_parameters_path_against_float64(device, method, dropout, monkeypatch):
    """`HouseholderTransform` on the GPU path normalises `u`, `v` inside the kernel (`_RawVectorUpdate`) and returns
    their gradients through the normalisation: the same values and gradients as the eager float64 path, with block
    dropout's keep factors and with an all-zero row (below the normalisation's eps: a zero vector, no NaN)."""
    from lit_gpt.adapters.ether import ETHER_COEFS, ETHERPLUS_COEFS, HouseholderTransform, _RawVectorUpdate

    torch.manual_seed(3)
    coefs = ETHER_COEFS if method == "ether" else ETHERPLUS_COEFS
    T, nb, k = 40, 4, 24
    t64 = HouseholderTransform(nb * k, nb, coefs, block_dropout=0.5 if dropout else 0.0, dtype=torch.float64)
    with torch.no_grad():
        for p in t64.parameters():
            p.normal_()
        t64.u[1].zero_()
    keep = torch.tensor([True, False, True, True]) if dropout else None
    monkeypatch.setattr(HouseholderTransform, "keep_mask", lambda self, dev: None if keep is None else keep.to(dev))
    t32 = HouseholderTransform(nb * k, nb, coefs, block_dropout=t64.block_dropout, device=device)
    t32.load_state_dict({n: p.float() for n, p in t64.state_dict().items()})
    z, g = torch.randn(2, T // 2, nb * k, dtype=torch.float64), torch.randn(2, T // 2, nb * k, dtype=torch.float64)

    calls = []
    monkeypatch.setattr(_RawVectorUpdate, "apply", lambda *a, f=_RawVectorUpdate.apply: calls.append(1) or f(*a))
    z32 = z.float().to(device).requires_grad_()
    out = t32(z32)
    out.backward(g.float().to(device))
    assert calls, "the raw-parameter kernel path did not run"
    z64 = z.clone().requires_grad_()
    with gpu_kernel.disabled():
        ref = t64(z64)
    ref.backward(g)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z32.grad.double().cpu(), z64.grad, rtol=1e-5, atol=1e-5)
    for p32, p64 in zip(t32.parameters(), t64.parameters()):
        scale = p64.grad.abs().max().item()
        torch.testing.assert_close(p32.grad.double().cpu(), p64.grad, rtol=1e-4, atol=1e-5 * scale)
    assert all(torch.isfinite(p.grad).all() for p in t32.parameters())


@direct
@pytest.mark.parametrize("method", ["ether", "etherplus"])
@pytest.mark.parametrize("in_place,bias,dropout", [(True, False, False), (True, True, True), (False, True, False),
                                                   (False, False, True)])
def test_raw_output_side_against_float64(device, method, in_place, bias, dropout, monkeypatch):
    """The output side on the GPU path (`apply_output_rows` -> `_OutputRowsUpdate` with raw parameters): two slices
    of a fused output (a gap between them), kept output (in place) or kept input, with or without a bias and block
    dropout, an all-zero row: values and the gradients of `y`, the bias and the raw `u`, `v` as the eager float64
    path gives them (the kernels rebuild `z` in their finishing reduction instead of `_rebuild_z`)."""
    from lit_gpt.adapters.ether import ETHER_COEFS, ETHERPLUS_COEFS, HouseholderTransform

    torch.manual_seed(5)
    coefs = ETHER_COEFS if method == "ether" else ETHERPLUS_COEFS
    T, nb, k = 37, 3, 20
    d = nb * k
    t64 = [HouseholderTransform(d, nb, coefs, block_dropout=0.5 if dropout else 0.0, dtype=torch.float64)
           for _ in range(2)]
    for t in t64:
        with torch.no_grad():
            for p in t.parameters():
                p.normal_()
    with torch.no_grad():
        t64[1].u[2].zero_()
    keep = torch.tensor([True, False, True]) if dropout else None
    monkeypatch.setattr(HouseholderTransform, "keep_mask", lambda self, dev: None if keep is None else keep.to(dev))
    t32 = [HouseholderTransform(d, nb, coefs, block_dropout=t.block_dropout, device=device) for t in t64]
    for a, b in zip(t32, t64):
        a.load_state_dict({n: p.float() for n, p in b.state_dict().items()})
    y = torch.randn(2, T, 4 * d, dtype=torch.float64)
    g = torch.randn_like(y)
    b = torch.randn(4 * d, dtype=torch.float64) if bias else None

    def run(ts, dev, dtype):
        yy = y.to(device=dev, dtype=dtype).requires_grad_()
        bb = b.to(device=dev, dtype=dtype).requires_grad_() if bias else None
        y0 = yy * 1.0  # a fresh tensor: the in-place form updates it
        parts = [(0, d, ts[0]), (2 * d, 3 * d, ts[1])]
        out = HouseholderTransform.apply_output_rows(y0, bb, parts, in_place)
        out.backward(g.to(device=dev, dtype=dtype))
        grads = [yy.grad] + ([bb.grad] if bias else []) + [p.grad for t in ts for p in t.vector_params()]
        return [out.detach()] + grads

    calls = []
    monkeypatch.setattr(gpu_kernel, "backward_raw", lambda *a, f=gpu_kernel.backward_raw, **kw: calls.append(1)
                        or f(*a, **kw))
    got = run(t32, device, torch.float32)
    assert calls, "the raw-parameter output path did not run"
    with gpu_kernel.disabled():
        ref = run(t64, "cpu", torch.float64)
    for a, r in zip(got, ref):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double().cpu(), r, rtol=1e-4, atol=2e-5 * scale)


@direct
@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplusHH"])
@pytest.mark.parametrize("targets,bias", [(["query", "value"], True), (["key"], False), (["query", "key", "value"], False)])
def test_fused_qkv_as_one_node_against_float64(device, method, targets, bias, monkeypatch):
    """The fused QKV projection of a GQA `GPT` block with input-side transforms on some of its spans runs as one
    node on the GPU path (`_GroupedLinear`: a GEMM per span into one output, input gradients added into one
    buffer): the same output and gradients (of the input and the raw vectors) as the eager float64 path."""
    from lit_gpt import GPT, Config
    from lit_gpt.adapters.ether import _GroupedLinear

    torch.manual_seed(7)
    config = Config(name="t", block_size=8, vocab_size=32, padded_vocab_size=32, n_layer=1, n_head=4,
                    n_query_groups=2, n_embd=48, intermediate_size=64, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", bias=bias)
    model = apply_adapters(GPT(config).double(), AdapterConfig(method=method, nb=3, targets=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()
    layer = model.transformer.h[0].attn.qkv
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    g = torch.randn(2, 7, layer.out_features, dtype=torch.float64)

    def run(dev, dtype):
        layer.zero_grad(set_to_none=True)  # before the conversion, which would convert the last run's gradients
        lay = layer.to(device=dev, dtype=dtype)
        xx = x.to(device=dev, dtype=dtype).detach().clone().requires_grad_()
        y = lay(xx)
        y.backward(g.to(device=dev, dtype=dtype))
        return [y.detach().double().cpu(), xx.grad.double().cpu()] + [
            p.grad.double().cpu() for p in lay.parameters() if p.requires_grad]

    with gpu_kernel.disabled():
        ref = run("cpu", torch.float64)
    calls = []
    monkeypatch.setattr(_GroupedLinear, "apply", lambda *a, f=_GroupedLinear.apply: calls.append(1) or f(*a))
    got = run(device, torch.float32)
    assert calls, "the fused QKV node did not run"
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()))


@direct
def test_tiny_gpt_trains_the_same_with_the_kernels(device):
    """ETHER+HH on every linear layer of a tiny GPT: the same loss and adapter gradients through the kernels as
    through the eager path."""
    from lit_gpt import GPT, Config

    torch.manual_seed(0)
    config = Config(name="t", block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                    intermediate_size=48, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", bias=True)
    model = apply_adapters(GPT(config).to(device), AdapterConfig(method="etherplusHH", nb=4, targets=["all-linear"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()  # away from the identity, so every term of the gradient counts
    x = torch.randint(0, 64, (2, 16), device=device)

    def grads(kernel: bool):
        with (gpu_kernel.disabled() if not kernel else torch.enable_grad()):
            loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
            loss.backward()
        out = [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return out

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@direct
@pytest.mark.parametrize(("method", "dtype"), [("ether", torch.float32), ("etherplusHH", torch.float32),
                                               ("ether", torch.bfloat16)])
def test_kernels_rebuild_marked_inputs(device, method, dtype, monkeypatch):
    """The raw-parameter nodes (one transform, and the fused QKV node) keep what rebuilds a norm's output or the
    MLP's product (`lit_gpt.recompute`) instead of it: bit-for-bit the same gradients, one activation fewer each.
    The backward kernel makes those inputs from their parts where it reads them (no rebuilt tensor), rounding
    where PyTorch rounds in bfloat16."""
    from lit_gpt import GPT, Config, recompute
    from test_output_side import kept_bytes

    torch.manual_seed(0)
    config = Config(name="t", block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                    n_query_groups=2, intermediate_size=48, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP")
    model = apply_adapters(GPT(config).to(device, dtype), AdapterConfig(method=method, nb=4, targets=["all-linear"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
            elif p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norm weights away from 1, so that the weight's product and rounding count
    idx = torch.randint(0, 64, (2, 16), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    given = []
    kernel_rows = cpu_kernel.kernel_rows

    def recorded(*args):
        given.append(kernel_rows(*args))
        return given[-1]

    monkeypatch.setattr(cpu_kernel, "kernel_rows", recorded)

    def run():
        grads = torch.autograd.grad(model(idx).float().square().mean(), params)
        return grads, kept_bytes(model, idx)

    grads = torch.autograd.grad(model(idx).float().square().mean(), params)
    # per block: norm_2's output (fc_1 and fc_2: two consumers), the MLP product (proj); norm_1's (qkv) after block 0.
    # ETHER+HH's output side on proj rebuilds the product first (it keeps proj's input, not its output), and the
    # input side reads that rebuild
    products = ["ProductRows"] * 2 if method == "ether" else []
    assert sorted(type(z).__name__ for z in given) == products + ["ScaledRows"] * 5
    kept = kept_bytes(model, idx)
    with recompute.disabled():
        grads_kept, kept_without = run()
    for a, b in zip(grads, grads_kept):
        assert torch.equal(a, b)
    T = idx.numel()  # per block: norm_2's output and the MLP product; norm_1's after block 0 (see test_recompute)
    assert kept_without - kept == (2 * T * 32 + 2 * T * 48 + T * 32) * dtype.itemsize


@direct
@pytest.mark.parametrize(("dtype", "method", "flip"), [(torch.float32, "etherplusHH", False),
                                                      (torch.bfloat16, "etherplusHH", False),
                                                      (torch.float32, "ether", True)])
def test_output_side_keeps_the_layers_input(device, dtype, method, flip, monkeypatch):
    """ETHER+HH on the kernels: the output sides of attention's and the MLP's projections (which do not widen their
    input) keep the layer's input, which autograd keeps anyway (for the input side), instead of their output: one
    activation fewer per projection, and gradients at least as close to float64's as keeping the output gives (on a
    GPU the products run in bfloat16 halves with float32 accumulation). An output-side-only ETHER does so where the
    input's parts are kept anyway (the MLP product), not on attention's output (after some attention kernels a copy
    that nothing else keeps)."""
    from lit_gpt import GPT, Config
    from lit_gpt.adapters import ether
    from test_output_side import kept_bytes

    torch.manual_seed(0)
    config = Config(name="t", block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=1, n_head=4, n_embd=32,
                    n_query_groups=2, intermediate_size=64, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                    bias=True)
    cfg = AdapterConfig(method=method, nb=4, targets=["all-linear"], flip_side=flip)
    ref = apply_adapters(GPT(config).double(), cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 or not p.requires_grad else p.normal_()
    model = copy.deepcopy(ref).to(device, dtype)
    idx = torch.randint(0, 64, (2, 16), device=device)

    def grads(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.autograd.grad(m(idx).double().square().mean(), params)

    expected = grads(ref.to(device))
    new, kept_new = grads(model), kept_bytes(model, idx)
    monkeypatch.setattr(ether.HouseholderTransform, "output_side_keeps_input", False)
    old, kept_old = grads(model), kept_bytes(model, idx)
    projections = 1 if flip else 2
    assert kept_old - kept_new == config.n_layer * projections * idx.numel() * config.n_embd * dtype.itemsize
    err = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    for a, b, e in zip(new, old, expected):
        assert err(a, e) <= 1.5 * err(b, e) + (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.skipif(not CUDA, reason="bfloat16 runs on the GPU")
@pytest.mark.parametrize("method", ["ether", "etherplus"])
def test_bfloat16_close_to_float32(device, method):
    """bf16 activations: the kernel computes in float32 and rounds once, so it is at least as close to the float32
    result as the eager bf16 path is."""
    coefs = COEFS[method]
    torch.manual_seed(2)
    T, nb, k = 4096, 32, 128
    z, g = torch.randn(T, nb * k, device=device), torch.randn(T, nb * k, device=device)
    vecs = unit(len(coefs), nb, k).float().to(device)
    ref_out, c = gpu_kernel.forward(z, vecs, coefs)
    _, ref_gv, _ = gpu_kernel.backward(g, z, vecs, coefs, c, None, True)
    bf = lambda t: t.bfloat16()  # noqa: E731
    out, c = gpu_kernel.forward(bf(z), bf(vecs), coefs)
    gz = torch.empty_like(bf(g))
    _, gv, _ = gpu_kernel.backward(bf(g), bf(z), bf(vecs), coefs, c, gz, True)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref_out) < 1e-2 and rel(gv, ref_gv) < 1e-2
    assert torch.isfinite(out).all() and torch.isfinite(gz).all()


@direct
@pytest.mark.parametrize("k", [1, 2, 5, 16, 32, 33, 64] + ([128] if CUDA else []))  # 128: minutes interpreted
def test_cayley_kernel_against_float64(device, k, monkeypatch):
    """OFT's exact blocks from the `cayley` kernel (a program per block, elimination without pivoting): against
    float64 `torch.linalg.inv` in float32 and float64, for large `S` (pivots up to about `k / 2`) and small;
    orthogonal with determinant +1; the gradient of `_ExactCayley` on this path against autograd through the float64
    formula; and the kernel is what ran (a broken one fails the test)."""
    from lit_gpt.adapters import oft

    calls = []
    real = gpu_kernel.cayley
    monkeypatch.setattr(gpu_kernel, "cayley", lambda S: calls.append(S.shape) or real(S))
    torch.manual_seed(5)
    eye = torch.eye(k, dtype=torch.float64)
    for scale in (3.0, 0.01):
        R = torch.randn(6, k, k, dtype=torch.float64) * scale
        G = torch.randn(6, k, k, dtype=torch.float64)  # the loss <G, H>
        R64 = R.clone().requires_grad_()
        S = (R64 - R64.transpose(1, 2)) / 2
        expected = (eye + S) @ torch.linalg.inv(eye - S)
        (expected_gR,) = torch.autograd.grad((expected * G).sum(), R64)
        for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 3e-5)):
            Rd = R.to(device, dtype).requires_grad_()
            H = oft.cayley((Rd - Rd.transpose(1, 2)) / 2)
            (gR,) = torch.autograd.grad((H * G.to(device, dtype)).sum(), Rd)
            torch.testing.assert_close(H.double().cpu(), expected.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(gR.double().cpu(), expected_gR, rtol=tol,
                                       atol=tol * expected_gR.abs().max().item())
            if dtype == torch.float64:
                H = H.cpu()
                torch.testing.assert_close(H.transpose(1, 2) @ H, eye.expand(6, k, k), rtol=1e-11, atol=1e-11)
                torch.testing.assert_close(torch.linalg.det(H), torch.ones(6, dtype=dtype), rtol=1e-10, atol=1e-10)
    assert len(calls) == 4
    monkeypatch.setattr(gpu_kernel, "CAYLEY_MAX_BLOCK", k - 1)  # larger blocks go to inv_ex
    assert not gpu_kernel.cayley_usable(torch.zeros(2, k, k, device=device))


@direct
@pytest.mark.parametrize("k", [2, 16, 33, 64])
def test_neumann_kernels_against_float64(device, k, monkeypatch):
    """OFT's Cayley-Neumann blocks `(I + S) sum_{j <= K} S^j` and their gradient from the `neumann_fwd` /
    `neumann_bwd` kernels (float32) against the PyTorch series in float64, for 1 to 5 terms; the kernels are what
    ran (a broken one fails the test), and blocks above `NEUMANN_MAX_BLOCK` take the PyTorch path."""
    from lit_gpt.adapters import oft

    calls = []
    real = gpu_kernel.neumann_backward
    monkeypatch.setattr(gpu_kernel, "neumann_backward", lambda *a: calls.append(a[2]) or real(*a))
    torch.manual_seed(6)
    for terms in (1, 2, 5):
        R = torch.randn(4, k, k, dtype=torch.float64) * (0.5 / k ** 0.5)
        G = torch.randn(4, k, k, dtype=torch.float64)
        R64 = R.clone().requires_grad_()
        with gpu_kernel.disabled():
            expected = oft.cayley((R64 - R64.transpose(1, 2)) / 2, terms)
        (expected_gR,) = torch.autograd.grad((expected * G).sum(), R64)
        Rd = R.to(device, torch.float32).requires_grad_()
        H = oft.cayley((Rd - Rd.transpose(1, 2)) / 2, terms)
        (gR,) = torch.autograd.grad((H * G.to(device, torch.float32)).sum(), Rd)
        torch.testing.assert_close(H.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gR.double().cpu(), expected_gR, rtol=1e-5,
                                   atol=1e-5 * expected_gR.abs().max().item())
    assert calls == [1, 2, 5]
    monkeypatch.setattr(gpu_kernel, "NEUMANN_MAX_BLOCK", k - 1)
    assert not gpu_kernel.neumann_usable(torch.zeros(2, k, k, device=device))
