"""Frozen weights in NF4 / int8 (`lit_gpt.quantize`): against bitsandbytes' own quantization and PEFT's LoRA on its
`Linear4bit` where bitsandbytes is installed, against the NF4 definition in float64, and in training: gradients
equal to those of the same model holding the dequantized weights, which autograd never keeps."""

import copy
import csv
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from lit_gpt import GPT
from lit_gpt.adapters import AdapterConfig, apply_adapters, plan_report
from lit_gpt.adapters.base import AdaptedLinear
from lit_gpt.quantize import (
    BLOCK, NF4_LEVELS, Quantized, QuantizedLinear, check_kind, quantize_model, quantized_nbytes,
)
from lit_gpt.utils import load_file, num_parameters
from test_model import tiny
from test_training import common_flags, run_cli, tiny_ckpt  # noqa: F401 (a fixture)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_functional():
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb_f
    return bnb_f


def weights(dtype=torch.float32, shape=(96, 200)) -> torch.Tensor:
    torch.manual_seed(0)
    W = torch.randn(shape, dtype=torch.float64).mul_(0.02).to(dtype)
    W.view(-1)[3 * BLOCK:4 * BLOCK] = 0  # a block of zeros: scale 0, every code the level 0
    W.view(-1)[5 * BLOCK + 7] = 0.5  # an outlier
    return W


def test_nf4_levels_are_qlora_normal_quantiles():
    """QLoRA's construction (Dettmers et al. 2023, section 3 and bitsandbytes' create_normal_map): 8 positive and 7
    negative quantiles of N(0, 1) between the 0.9677 quantile and the median, an exact zero, scaled to [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((positive, torch.zeros(1, dtype=torch.float64), negative)).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels, rtol=0, atol=2e-7)  # 2 ulps


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_is_the_nearest_level_of_each_block_scaled_by_its_absmax(dtype):
    W = weights(dtype)
    q = Quantized(W, "nf4")
    flat = W.double().reshape(-1, BLOCK)
    absmax = flat.abs().amax(dim=1)
    torch.testing.assert_close(q.scales.view(torch.float32).double(), absmax, rtol=0, atol=0)
    codes = torch.stack((q.codes >> 4, q.codes & 15), dim=1).reshape(-1, BLOCK).long()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    normalized = flat / absmax.clamp_min(1e-300)[:, None]
    nearest = (normalized[..., None] - levels).abs()
    assert torch.equal(nearest.gather(2, codes[..., None])[..., 0], nearest.min(dim=2).values)
    expected = (levels[codes].float() * absmax.float()[:, None]).to(dtype).reshape(W.shape)
    assert torch.equal(q.dequantize(), expected)
    flat = q.dequantize().view(-1)
    assert (flat[3 * BLOCK:4 * BLOCK] == 0).all() and flat[5 * BLOCK + 7] == 0.5  # the block's absmax is exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_is_the_rounded_row_scaled_by_127_over_its_absmax(dtype):
    W = weights(dtype)
    q = Quantized(W, "int8")
    absmax = W.double().abs().amax(dim=1)
    scaled = W.double() * 127 / absmax.clamp_min(1e-300)[:, None]
    assert ((q.codes.view(W.shape).double() - scaled).abs() <= 0.5 + 1e-5).all()  # the nearest integer
    error = (q.dequantize().double() - W.double()).abs()
    assert (error <= absmax[:, None] / 254 * 1.01 + W.double().abs() * 2 ** -7).all()


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"])
def test_any_range_of_elements_dequantizes_as_the_whole_weight_does(kind):
    q = Quantized(weights(), kind)
    flat = q.dequantize().reshape(-1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = sorted(torch.randint(0, flat.numel() + 1, (2,), generator=gen).tolist())
        if a < b:
            assert torch.equal(q.dequantize(a, b), flat[a:b])
    assert torch.equal(q.dequantize(0, 1), flat[:1]) and torch.equal(q.dequantize(flat.numel() - 1), flat[-1:])
    for shape in ((96, 200), (5, 77)):  # 7 blocks, the last ragged
        q = Quantized(weights(shape=shape), kind)
        assert q.nbytes() == quantized_nbytes(shape, kind)
        assert torch.equal(q.dequantize(1, 385), q.dequantize().view(-1)[1:385])


@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_scales_and_dequantized_weights_equal_bitsandbytes(dtype):
    bnb_f = bnb_functional()
    for shape in ((96, 200), (5, 77)):
        W = weights(dtype, shape)
        codes, state = bnb_f.quantize_4bit(W, blocksize=BLOCK, quant_type="nf4")
        ours = Quantized(W, "nf4")
        assert torch.equal(ours.codes, codes.reshape(-1))
        assert torch.equal(ours.scales.view(torch.float32), state.absmax)
        assert torch.equal(ours.dequantize(), bnb_f.dequantize_4bit(codes, state))
        codes, scales, _ = bnb_f.int8_vectorwise_quant(W.clone())
        ours = Quantized(W, "int8")
        assert torch.equal(ours.codes, codes.reshape(-1))
        assert torch.equal(ours.scales.view(torch.float32), scales)
        assert torch.equal(ours.dequantize(), bnb_f.int8_vectorwise_dequant(codes, scales).to(dtype))


def test_the_dynamic_map_is_bitsandbytes():
    bnb_f = bnb_functional()
    from lit_gpt.quantize import _dynamic_map

    assert torch.equal(_dynamic_map(torch.device("cpu")), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantized_nf4_against_bitsandbytes(dtype):
    """bitsandbytes' compress_statistics: the same 4-bit codes, mean offset and second-level scales; the 8-bit codes
    of the block scales are the nearest levels of the dynamic map (bitsandbytes' CPU kernel approximates that
    search with a 65,536-point table, its CUDA kernel with a binary search: they differ from it, and from each
    other, by one level in about 1% of the scales); and bitsandbytes' own dequantization of our codes is ours."""
    bnb_f = bnb_functional()
    from lit_gpt.quantize import _dynamic_map

    for shape in ((96, 200), (5, 77), (640, 1100)):
        W = weights(dtype, shape)
        codes, state = bnb_f.quantize_4bit(W, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
        ours = Quantized(W, "nf4-dq")
        assert torch.equal(ours.codes, codes.reshape(-1))
        assert ours.offset.view(torch.float32).item() == state.offset.item()
        assert torch.equal(ours.scales2.view(torch.float32), state.state2.absmax)
        assert ours.nbytes() == quantized_nbytes(shape, "nf4-dq")
        # nearest levels, in float64
        absmax = W.double().reshape(-1)
        absmax = torch.nn.functional.pad(absmax, (0, -absmax.numel() % BLOCK)).view(-1, BLOCK).abs().amax(dim=1)
        centred = absmax - absmax.float().mean().double()
        second = state.state2.absmax.double().repeat_interleave(256)[:centred.numel()]
        levels = _dynamic_map(torch.device("cpu")).double()
        distance = (centred[:, None] / second[:, None] - levels).abs()
        chosen = distance.gather(1, ours.scales.long()[:, None])[:, 0]
        assert (chosen <= distance.min(dim=1).values + 1e-6).all()
        differ = ours.scales.int() != state.absmax.int()
        assert differ.float().mean() < 0.03 and ((ours.scales.int() - state.absmax.int()).abs() <= 1).all()
        mine = copy.copy(state)
        mine.absmax = ours.scales
        assert torch.equal(ours.dequantize(), bnb_f.dequantize_4bit(codes, mine))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_layer_equals_peft_lora_on_a_bitsandbytes_linear4bit(dtype):
    """PEFT's QLoRA layer (LoRA on bitsandbytes' Linear4bit, its double quantization off) and ours, the same A, B:
    the same outputs and gradients of the input and of A and B."""
    bnb_functional()
    peft = pytest.importorskip("peft")
    import bitsandbytes as bnb
    from test_adapters_hf import Holder

    torch.manual_seed(0)
    base = nn.Linear(128, 96, bias=True).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear4 = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=dtype, quant_type="nf4",
                                    compress_statistics=False)
        linear4.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           blocksize=BLOCK, compress_statistics=False)
        linear4.bias = nn.Parameter(base.bias.data.clone())
        theirs = peft.get_peft_model(Holder(linear4.to("cpu")), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["lin"], lora_dropout=0.0))
    ours = apply_adapters(Holder(copy.deepcopy(base)), AdapterConfig(method="lora", r=4, alpha=8, targets=["lin"]))
    ours.lin.quantize("nf4")
    layer = theirs.base_model.model.lin
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    A_theirs, B_theirs = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        A, B = torch.randn_like(A_theirs) * 0.1, torch.randn_like(B_theirs) * 0.1
        A_theirs.copy_(A)
        B_theirs.copy_(B)
        ours.lin.adapters["full"].A.copy_(A.to(ours.lin.adapters["full"].A.dtype))
        ours.lin.adapters["full"].B.copy_(B.to(ours.lin.adapters["full"].B.dtype))
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    r = torch.randn(2, 5, 96, dtype=dtype)
    mine, their = ours(x), theirs(x)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mine, their, **(dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else tol))
    ad = ours.lin.adapters["full"]
    g_ours = torch.autograd.grad((mine * r).sum(), [x, ad.A, ad.B])
    g_theirs = torch.autograd.grad((their * r).sum(), [x, A_theirs, B_theirs])
    for a, b in zip(g_ours, g_theirs):  # (bfloat16: other orders of summation, so a relative bound on the whole)
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < (1e-6 if dtype == torch.float32
                                                                                else 1e-2)


def test_quantized_linear_equals_a_bitsandbytes_linear4bit():
    bnb_functional()
    import bitsandbytes as bnb

    torch.manual_seed(0)
    base = nn.Linear(128, 96, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                                   compress_statistics=False)
        theirs.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                          blocksize=BLOCK, compress_statistics=False)
        theirs.bias = base.bias
        theirs = theirs.to("cpu")
    x = torch.randn(3, 7, 128)
    assert torch.equal(QuantizedLinear(base, "nf4")(x), theirs(x))


def with_dequantized_weights(model: nn.Module) -> nn.Module:
    """A copy of a quantized `model` whose quantized layers hold their dequantized weights as plain parameters."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, AdaptedLinear) and m.quantized is not None:
            W = m.quantized.dequantize()
            m.quantized = None
            m.weight = nn.Parameter(W, requires_grad=False)
        elif isinstance(m, QuantizedLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight = nn.Parameter(m.quantized.dequantize(), requires_grad=False)
            linear.bias = m.bias
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, linear)
    return ref


METHODS = [
    ("lora", dict(r=4)),
    ("lora", dict(r=4, dora=True)),
    ("ether", dict(nb=4)),
    ("etherplus", dict(nb=4, flip_side=True)),
    ("etherplusHH", dict(nb=4)),
    ("oft", dict(nb=4)),
]


def quantized_gpt(method, kw, kind="nf4", dtype=torch.float32, targets="all-linear", device=None, **model_kw):
    """A tiny adapted GPT, its adapters away from their start, quantized on `device` (default: the CPU) and moved
    there."""
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=64, intermediate_size=128, **model_kw)).to(dtype)
    apply_adapters(model, AdapterConfig(method=method, targets=targets, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    quantize_model(model, kind, device=device)
    return model if device is None else model.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kw", METHODS)
@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"])
def test_training_a_quantized_model_is_training_on_its_dequantized_weights(method, kw, dtype, kind):
    """The same loss and gradients, bit for bit, with and without activation checkpointing: backward dequantizes
    the same values that forward used."""
    for checkpointing in (False, True):
        model = quantized_gpt(method, kw, kind, dtype)
        ref = with_dequantized_weights(model)
        model.activation_checkpointing = ref.activation_checkpointing = checkpointing
        x = torch.randint(0, 61, (2, 40))
        loss, ref_loss = model(x, labels=x), ref(x, labels=x)
        assert torch.equal(loss, ref_loss)
        loss.backward()
        ref_loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
        assert grads.keys() == ref_grads.keys() and grads
        for k in grads:
            assert torch.equal(grads[k], ref_grads[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,kw", METHODS)
def test_on_a_gpu_the_codes_are_the_cpus_and_training_is_on_the_dequantized_weights(method, kw):
    """Quantized on the GPU (`quantize_model(device=)`, as training does): the CPU's codes; the loss and gradients
    of the fused GPU paths equal those of the same model holding the dequantized weights."""
    on_cpu = quantized_gpt(method, kw, "nf4-dq", torch.bfloat16)
    model = quantized_gpt(method, kw, "nf4-dq", torch.bfloat16, device=torch.device("cuda"))
    cpu_codes = {n: m for n, m in on_cpu.named_modules() if isinstance(m, Quantized)}
    gpu_codes = {n: m for n, m in model.named_modules() if isinstance(m, Quantized)}
    assert cpu_codes.keys() == gpu_codes.keys() and gpu_codes
    for name, m in gpu_codes.items():
        assert m.codes.is_cuda and torch.equal(m.codes.cpu(), cpu_codes[name].codes), name
        assert torch.equal(m.dequantize().cpu(), cpu_codes[name].dequantize()), name
    ref = with_dequantized_weights(model)
    x = torch.randint(0, 61, (2, 40), device="cuda")
    loss, ref_loss = model(x, labels=x), ref(x, labels=x)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[k].grad, rtol=1e-2, atol=1e-3, msg=k)


@pytest.mark.parametrize("method,kw", METHODS)
def test_autograd_keeps_no_dequantized_weight_between_forward_and_backward(method, kw, monkeypatch):
    made = []
    dequantize = Quantized.dequantize

    def recorded(self, start=0, stop=None):
        out = dequantize(self, start, stop)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(Quantized, "dequantize", recorded)
    model = quantized_gpt(method, kw, targets=["query", "value"] if method == "lora" else "all-linear")
    x = torch.randint(0, 61, (2, 40))
    loss = model(x, labels=x)
    gc.collect()
    assert made and all(ref() is None for ref in made)  # the graph is alive, each layer's weight is not
    made.clear()
    loss.backward()  # which dequantizes the weights again
    assert made


def test_what_is_quantized_and_what_is_not():
    """QLoRA's choice: every frozen linear weight of the blocks; not embeddings, norms, the head, MoE routers, nor
    modules trained in full; the parameter counts do not change."""
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=64, intermediate_size=128, mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2,
                     moe_intermediate_size=64))
    apply_adapters(model, AdapterConfig(method="lora", r=2, targets=["query", "value"], train_modules=["head"]))
    counts = num_parameters(model, requires_grad=True), num_parameters(model, requires_grad=False)
    n = quantize_model(model, "nf4")
    names = {name for name, m in model.named_modules() if isinstance(m, Quantized)}
    assert n == len(names) == 2 * (2 + 4 * 3)  # per block: qkv, proj and 3 per expert
    assert all(name.startswith("transformer.h.") for name in names)
    assert not any(".gate." in name for name in names)
    assert isinstance(model.transformer.h[0].attn.qkv, AdaptedLinear) and isinstance(
        model.transformer.h[0].attn.proj, QuantizedLinear)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.requires_grad
    assert (num_parameters(model, requires_grad=True), num_parameters(model, requires_grad=False)) == counts
    assert not any("codes" in k or "scales" in k for k in model.state_dict())
    assert quantize_model(model, "nf4") == 0  # nothing is quantized twice


def test_the_dequantized_dtype_follows_the_models_casts_and_the_codes_do_not():
    model = quantized_gpt("lora", dict(r=2))
    layer = model.transformer.h[0].attn.qkv
    before = layer.quantized.dequantize()
    model.to(torch.bfloat16)
    assert layer.quantized.dtype == torch.bfloat16 and layer.quantized.scales.dtype == torch.int32
    assert torch.equal(layer.quantized.dequantize(), before.to(torch.bfloat16))


def test_quantizing_a_dora_layer_keeps_it_equal_to_its_quantized_base_at_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=64, intermediate_size=128))
    apply_adapters(model, AdapterConfig(method="lora", r=2, dora=True, targets="all-linear"))
    quantize_model(model, "nf4")
    ref = with_dequantized_weights(model)
    for layer in (m for m in ref.modules() if isinstance(m, AdaptedLinear)):
        layer.adapters_enabled = False
    x = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_kinds_are_refused_naming_the_flag():
    assert check_kind(None) is None and check_kind("nf4") == "nf4"
    for given in ("bnb.nf4", "bnb.nf4-dq"):
        with pytest.raises(ValueError, match=rf"^--quantize '{given}' is not a quantization here \(litgpt's {given} "
                                             rf"runs bitsandbytes; .* '{given[4:]}' is its name\): pass one of nf4, "
                                             r"nf4-dq, int8, or leave it unset"):
            check_kind(given)
    with pytest.raises(ValueError, match=r"^--quantize 'bnb.fp4' is not a quantization here: pass one of"):
        check_kind("bnb.fp4")
    with pytest.raises(ValueError, match="only 2-D floating-point weights"):
        Quantized(torch.zeros(4, dtype=torch.float32), "nf4")


def test_the_plan_counts_the_quantized_bytes():
    plan = plan_report("Llama-2-7b-hf", AdapterConfig(method="lora", r=8), "bf16-true", quantize="nf4")
    # 32 blocks × (qkv, proj, fc_1, fc_2, proj): 6,476,005,376 weights at 0.5 + 4/64 bytes
    assert ("quantized: 160 frozen linear weights (6,476,005,376 parameters) in 4-bit NormalFloat (QLoRA's NF4, "
            "blocks of 64), 3.39 GiB in place of 12.06 GiB") in plan
    assert "frozen parameters: 6,738,415,616" in plan and "weights: 3.89 GiB" in plan
    plain = plan_report("Llama-2-7b-hf", AdapterConfig(method="lora", r=8), "bf16-true")
    assert "weights: 12.56 GiB" in plain and "quantized" not in plain


def test_qlora_from_the_command_line_trains_resumes_and_merges(tiny_ckpt, tmp_path):  # noqa: F811
    out = tmp_path / "qlora"
    flags = [*common_flags(tiny_ckpt, out, 4, **{"--train.save_interval": "2"}), "--lora_r", "4",
             "--train.learning_rate", "1e-2"]
    r = run_cli("lora.py", *flags, "--quantize", "nf4", "--train.max_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("--quantize nf4: 10 frozen linear weights (73,728 parameters) kept in 4-bit NormalFloat (QLoRA's NF4, "
            "blocks of 64): 40.50 KiB in place of 288.00 KiB") in r.stdout
    plan = run_cli("lora.py", *flags, "--dry_run", "true").stdout
    frozen = [line for line in plan.splitlines() if line.startswith("frozen parameters")][0].split()[-1]
    assert f"frozen: {frozen}" in r.stdout  # the count of the unquantized model
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["quantize"] == "nf4"
    r = run_cli("lora.py", *flags, "--quantize", "nf4", "--resume", "auto", "--merge", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and (out / "merged" / "lit_model.pth").is_file()
    saved = load_file(out / "lit_model_lora_finetuned.pth", mmap=False)
    assert saved["adapter_config"]["method"] == "lora" and all(".adapters." in k for k in saved["state_dict"])
    # a resume takes the run's flags: quantized again, unless told otherwise
    r = run_cli("lora.py", *flags, "--resume", "auto", "--train.max_steps", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--quantize nf4: 10 frozen" in r.stdout and "--quantize nf4 ->" not in r.stdout
    r = run_cli("lora.py", *flags, "--resume", "auto", "--train.max_steps", "6", "--quantize", "null")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--quantize nf4: 10 frozen" not in r.stdout and "--quantize nf4 -> null" in r.stdout


def first_loss(out) -> float:
    with open(out / "logs" / "metrics.csv") as f:
        return float(next(row for row in csv.DictReader(f) if row["loss"])["loss"])


def test_the_first_logged_loss_is_the_quantized_models(tiny_ckpt, tmp_path):  # noqa: F811
    """The same first micro-batch and adapter (ETHER+ before any step is the identity) in every run: only the
    frozen weights differ, int8's nearer to the checkpoint's than NF4's."""
    losses = {}
    for kind in (None, "int8", "nf4"):
        out = tmp_path / str(kind)
        quantize = ["--quantize", kind] if kind else []
        r = run_cli("ether.py", *common_flags(tiny_ckpt, out, 1, **{"--train.global_batch_size": "1"}), "--Htype",
                    "etherplus", "--ether_nb", "4", *quantize)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[kind] = first_loss(out)
    assert 0 < abs(losses["int8"] - losses[None]) < abs(losses["nf4"] - losses[None])


def test_full_fine_tuning_says_where_quantization_is(tiny_ckpt, tmp_path):  # noqa: F811
    r = run_cli("full.py", *common_flags(tiny_ckpt, tmp_path / "full", 1), "--quantize", "nf4")
    assert r.returncode == 2
    assert "QLoRA is finetune/lora.py --quantize nf4" in r.stderr
    r = run_cli("lora.py", *common_flags(tiny_ckpt, tmp_path / "bad", 1), "--quantize", "bnb.nf4")
    assert r.returncode != 0 and "--quantize 'bnb.nf4' is not a quantization here" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_a_quantized_forward_is_linear_on_the_dequantized_weight():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = QuantizedLinear(base, "int8")
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.quantized.dequantize(), base.bias), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(g, layer.quantized.dequantize().sum(0).expand(4, 64), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def base_and_run(tmp_path_factory):
    from test_merge import make_base, make_run

    root = tmp_path_factory.mktemp("quantized-inference")
    base = make_base(root / "tiny-llama")
    run = make_run(root / "run", base, AdapterConfig(method="etherplus", nb=4, targets=["query", "value", "mlp"]))
    return base, run


@pytest.mark.parametrize("adapter", [False, True])
def test_a_model_loaded_quantized_computes_with_its_dequantized_weights(base_and_run, adapter):
    from lit_gpt.merge import load_finetuned

    base, run = base_and_run
    model = load_finetuned(base, run if adapter else None, quantize="nf4")
    quantized = [m for m in model.modules() if isinstance(m, Quantized)]
    assert len(quantized) == 2 * 5 and not model.training
    assert any(isinstance(m, AdaptedLinear) and m.quantized is not None for m in model.modules()) == adapter
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_dequantized_weights(model)(x), rtol=0, atol=0)
        assert not torch.allclose(model(x), load_finetuned(base, run if adapter else None)(x))


def test_chat_generate_and_eval_take_quantize(base_and_run):
    """chat/base.py's greedy answer is the quantized model's; scripts/generate.py and the lm-eval backend load it."""
    import subprocess
    import sys

    from lit_gpt import Tokenizer
    from lit_gpt.lm_eval import LitGPTLM
    from lit_gpt.merge import load_finetuned
    from test_chat import GREEDY, REPO, greedy_answer

    base, run = base_and_run
    r = subprocess.run([sys.executable, "chat/base.py", "--adapter_path", str(run), *GREEDY, "--quantize", "nf4"],
                       input="Add two and three.\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    from lit_gpt.data import prompt_style_from_name

    model, tokenizer = load_finetuned(base, run, quantize="nf4"), Tokenizer(base)
    flan = prompt_style_from_name("flan")
    assert r.stdout == greedy_answer(model, tokenizer, flan.apply("Add two and three.")) + "\n"
    r = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint_dir", str(base), *GREEDY,
                        "--quantize", "int8"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and r.stdout, r.stderr
    r = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint_dir", str(base), "--quantize", "fp4"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert "--quantize 'fp4' is not a quantization here: pass one of nf4, nf4-dq, int8" in r.stderr
    lm = LitGPTLM(checkpoint_dir=base, quantize="int8", device="cpu", precision="32-true")
    assert sum(isinstance(m, Quantized) for m in lm.model.modules()) == 2 * 5


@pytest.mark.slow
def test_real_smollm2_quantized_as_bitsandbytes_does_and_qlora_trains(smollm2_checkpoint, tmp_path):
    """SmolLM2-135M's own weights: our NF4 model computes what the weights bitsandbytes dequantizes compute, bit for
    bit; on a short text int8 costs 0.24% of the loss and NF4 8% (measured 2.5955 / 2.6017 / 2.802 nats: a 135M
    model loses more to 4 bits than the 7B+ models of QLoRA's paper); and a QLoRA run's loss falls."""
    import json

    import prepare_json

    from lit_gpt import Tokenizer
    from lit_gpt.merge import load_finetuned

    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital "
            "of Germany. Water boils at one hundred degrees Celsius at sea level.")
    ids = Tokenizer(smollm2_checkpoint).encode(text)[None]
    losses = {}
    with torch.no_grad():
        for kind in (None, "int8", "nf4"):
            model = load_finetuned(smollm2_checkpoint, quantize=kind)
            losses[kind] = model(ids, labels=ids).item()
        try:
            bnb_f = bnb_functional()
        except pytest.skip.Exception:
            bnb_f = None
        if bnb_f is not None:
            reference = load_finetuned(smollm2_checkpoint)
            for m in reference.transformer.h.modules():
                if type(m) is nn.Linear:
                    m.weight.copy_(bnb_f.dequantize_4bit(*bnb_f.quantize_4bit(m.weight, blocksize=BLOCK,
                                                                              quant_type="nf4")))
            assert reference(ids, labels=ids).item() == losses["nf4"]
    assert abs(losses["int8"] / losses[None] - 1) < 0.01
    assert 0.01 < losses["nf4"] / losses[None] - 1 < 0.15

    rows = [{"instruction": "What is the secret word?", "input": "", "output": "The secret word is pineapple."},
            {"instruction": "Name the project.", "input": "", "output": "The project is lit-ether."}] * 8
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    prepare_json.prepare(json_path=tmp_path / "rows.json", destination_path=tmp_path / "data",
                         checkpoint_dir=smollm2_checkpoint, max_seq_length=128, test_split_fraction=0.125)
    out = tmp_path / "run"
    r = run_cli("lora.py", "--io.train_data_dir", str(tmp_path / "data"), "--io.checkpoint_dir",
                str(smollm2_checkpoint), "--io.out_dir", str(out), "--train.learning_rate", "2e-3",
                "--train.max_steps", "8", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                "--train.lr_warmup_steps", "1", "--eval.interval", "0", "--eval.max_iters", "2",
                "--eval.max_new_tokens", "0", "--precision", "32-true", "--lora_r", "8", "--lora_targets",
                "all-linear", "--quantize", "nf4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--quantize nf4: 150 frozen linear weights" in r.stdout
    with open(out / "logs" / "metrics.csv") as f:
        trained = [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]
    assert len(trained) == 8 and sum(trained[-2:]) < 0.5 * sum(trained[:2]), trained
