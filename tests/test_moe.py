"""Mixtures of experts (Mixtral, Qwen3-MoE) against transformers' own `MixtralForCausalLM` and
`Qwen3MoeForCausalLM`: import, KV-cache decoding, export, the routing formula in float64, adapters on every expert
(and gradients for experts no token chose, which FSDP needs), the named config's size, and refusals."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters  # noqa: E402
from lit_gpt.convert_hf import ConversionError, config_from_hf, config_to_hf, convert_hf_checkpoint  # noqa: E402
from lit_gpt.model import LLaMAMoE  # noqa: E402
import test_adapters  # noqa: E402
from test_convert_hf import TOL, assert_decodes_like, exported, hf_logits, lit_logits, make_hf_model  # noqa: E402

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors
randomize_adapters = test_adapters.randomize_adapters

_BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5)
HF = {
    "mixtral": ("mixtral", dict(_BASE, num_local_experts=4, num_experts_per_tok=2)),
    # a 6-token window in every block, against 20-token inputs
    "mixtral_window": ("mixtral", dict(_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    # experts narrower than intermediate_size, three of six per token, per-head query/key norms
    "qwen3_moe": ("qwen3_moe", dict(_BASE, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                                    norm_topk_prob=True, head_dim=16)),
    "qwen3_moe_unnormalised": ("qwen3_moe", dict(_BASE, num_experts=6, num_experts_per_tok=3,
                                                 moe_intermediate_size=24, norm_topk_prob=False)),
    # a shared expert (with its sigmoid gate) beside the routed ones, and a bias on q/k/v
    "qwen2_moe": ("qwen2_moe", dict(_BASE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, norm_topk_prob=False)),
}
IDX = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))


def tiny_moe(**kw) -> Config:
    return Config(**{**dict(name="tiny-moe", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64,
                            padded_vocab_size=64, block_size=64, bias=False, norm_class_name="RMSNorm",
                            mlp_class_name="LLaMAMoE", intermediate_size=16, n_expert=4, n_expert_per_token=2), **kw})


@pytest.mark.parametrize("family", list(HF))
def test_import_kv_cache_and_export_match_transformers(family, tmp_path):
    model_type, kwargs = HF[family]
    hf = make_hf_model(model_type, **kwargs)
    hf.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf")
    assert config.mlp_class_name == "LLaMAMoE"
    assert (config.n_expert, config.n_expert_per_token) == (kwargs.get("num_local_experts") or kwargs["num_experts"],
                                                           kwargs["num_experts_per_tok"])
    assert config.sliding_window_size == kwargs.get("sliding_window")
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    assert len(model.transformer.h[1].mlp.experts) == config.n_expert
    expected = hf_logits(hf, IDX)
    torch.testing.assert_close(lit_logits(model, IDX), expected, **TOL)
    assert_decodes_like(model, IDX, expected, prefill=9)
    back = exported(tmp_path / "hf", tmp_path / "export")
    assert type(back) is type(hf)
    torch.testing.assert_close(hf_logits(back, IDX), expected, **TOL)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_routing_is_the_formula_in_float64(norm_topk):
    """y = sum over the k most probable experts e of p_e(x) * expert_e(x), p = softmax(W_gate x) (renormalised over
    the chosen k with moe_norm_topk), written densely: every expert on every token, the others weighted 0."""
    torch.manual_seed(0)
    moe = LLaMAMoE(tiny_moe(n_expert=5, n_expert_per_token=2, moe_norm_topk=norm_topk)).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    p = torch.softmax(x @ moe.gate.weight.T, dim=-1)
    kth = p.topk(2, dim=-1).values[..., -1:]
    w = torch.where(p >= kth, p, torch.zeros_like(p))
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    experts = torch.stack([e.proj(F.silu(e.fc_1(x)) * e.fc_2(x)) for e in moe.experts], dim=-2)
    torch.testing.assert_close(moe(x), (w[..., None] * experts).sum(dim=-2), atol=1e-12, rtol=0)


def test_every_expert_has_gradients_even_when_no_token_chose_it():
    """With FSDP every process reduces the gradients of the same tensors, whichever experts its tokens chose: an
    expert no token chose still runs (on no tokens), so its adapter has a zero gradient, not none."""
    torch.manual_seed(0)
    model = GPT(tiny_moe())
    apply_adapters(model, AdapterConfig(method="lora", r=2, targets=["all-linear"]))
    randomize_adapters(model, scale=0.3)
    for block in model.transformer.h:  # expert 0 is never chosen
        block.mlp.gate.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([0]), -1e4))
    model(IDX).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            unused = ".experts.0." in name
            assert (p.grad.abs().sum() == 0) == unused, name


@pytest.mark.parametrize("method,opts", [("ether", {"nb": 4}), ("etherplus", {"nb": 4}), ("etherplusHH", {"nb": 4}),
                                         ("oft", {"nb": 4}), ("lora", {"r": 3})])
def test_adapters_on_every_expert_merge_and_leave_the_router_alone(method, opts):
    torch.manual_seed(0)
    base = GPT(tiny_moe()).eval()
    model = copy.deepcopy(base)
    apply_adapters(model, AdapterConfig(method=method, targets=["mlp"], **opts))
    adapted = {n.rsplit(".adapters", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {f"transformer.h.{i}.mlp.experts.{e}.{layer}" for i in range(2) for e in range(4)
                       for layer in ("fc_1", "fc_2", "proj")}
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        out = model(IDX)
    assert (out - base(IDX)).abs().max() > 1e-3
    merged = merge_adapters(copy.deepcopy(model))
    assert {type(m).__name__ for m in merged.modules()} == {type(m).__name__ for m in base.modules()}
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX), out, atol=1e-5 * out.abs().max().item(), rtol=0)


def test_the_router_is_adapted_when_named():
    model = GPT(tiny_moe())
    apply_adapters(model, AdapterConfig(method="lora", r=2, targets=["mlp.gate", "query"]))
    adapted = {n.rsplit(".adapters", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"transformer.h.0.mlp.gate", "transformer.h.1.mlp.gate", "transformer.h.0.attn.qkv",
                       "transformer.h.1.attn.qkv"}


def test_named_config_has_the_published_parameter_count():
    """Mixtral-8x7B: 46,702,792,704 parameters, as transformers' own model of the same config counts them."""
    c = Config.from_name("Mixtral-8x7B-v0.1")
    hf_config = transformers.MixtralConfig(**config_to_hf(c))
    with torch.device("meta"):
        ours, theirs = GPT(c), transformers.MixtralForCausalLM(hf_config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 46_702_792_704
    assert config_from_hf(config_to_hf(c)).to_dict() == {**c.to_dict(), "name": "mixtral", "padding_multiple": 512,
                                                         "hf_config": {"org": "", "name": "mixtral"}}


@pytest.mark.parametrize("name,total,active", [("Mixtral-8x22B-v0.1", 140_620_634_112, 39_152_031_744),
                                               ("Mixtral-8x22B-Instruct-v0.1", 140_630_071_296, 39_161_468_928)])
def test_mixtral_8x22b_has_transformers_count_and_the_published_size(name, total, active):
    """141B parameters, 39B active per token (Mistral AI's announcement), as transformers counts the same config;
    the dry run says both."""
    from lit_gpt.adapters.plan import plan_report

    c = Config.from_name(name)
    with torch.device("meta"):
        theirs = transformers.MixtralForCausalLM(transformers.MixtralConfig(**config_to_hf(c)))
    assert sum(p.numel() for p in theirs.parameters()) == total and round(total / 1e9) == 141
    report = plan_report(name, None)
    assert f"trainable parameters: {total:,}" in report
    assert f"model parameters active per token: {active:,} (2 of 8 experts per token;" in report
    assert round(active / 1e9) == 39


@pytest.mark.parametrize("name,total,active", [("Qwen3-30B-A3B", 30_532_122_624, 3_353_032_704),
                                               ("Qwen3-235B-A22B", 235_093_634_560, 22_190_763_520)])
def test_qwen3_moe_named_configs_have_transformers_count_and_the_published_active_size(name, total, active):
    """30.5B / 3.3B active and 235B / 22B active (the Qwen3 technical report's figures); the dry run says both."""
    from lit_gpt.adapters.plan import plan_report

    c = Config.from_name(name)
    hf = config_to_hf(c)
    assert (hf["model_type"], hf["num_experts"], hf["norm_topk_prob"]) == ("qwen3_moe", 128, True)
    with torch.device("meta"):
        theirs = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf))
    assert sum(p.numel() for p in theirs.parameters()) == total
    report = plan_report(name, None)
    assert f"trainable parameters: {total:,}" in report  # (full fine-tuning)
    assert f"model parameters active per token: {active:,} (8 of 128 experts per token;" in report
    adapted = plan_report(name, AdapterConfig(method="lora", targets=["query", "value"]))
    assert f"model parameters active per token: {active:,} (8 of 128 experts per token;" in adapted


@pytest.mark.parametrize("name,total,active,published", [
    ("Qwen1.5-MoE-A2.7B", 14_315_784_192, 2_689_173_504, (14.3, 2.7)),
    ("Qwen1.5-MoE-A2.7B-Chat", 14_315_784_192, 2_689_173_504, (14.3, 2.7)),
    ("Qwen2-57B-A14B", 57_408_658_944, 14_249_270_784, (57, 14)),
    ("Qwen2-57B-A14B-Instruct", 57_408_658_944, 14_249_270_784, (57, 14))])
def test_qwen2_moe_named_configs_have_transformers_count_and_the_published_size(name, total, active, published):
    """14.3B / 2.7B active (Qwen's Qwen1.5-MoE announcement) and 57B / 14B active (the Qwen2 technical report), as
    transformers counts the same config, its shared expert included; the dry run says both."""
    from lit_gpt.adapters.plan import plan_report

    c = Config.from_name(name)
    hf = config_to_hf(c)
    assert (hf["model_type"], hf["norm_topk_prob"], hf["qkv_bias"]) == ("qwen2_moe", False, True)
    with torch.device("meta"):
        theirs = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**hf))
    assert sum(p.numel() for p in theirs.parameters()) == total
    digits = 1 if published[0] % 1 else 0
    assert (round(total / 1e9, digits), round(active / 1e9, digits)) == published
    report = plan_report(name, None)
    assert f"trainable parameters: {total:,}" in report
    assert f"model parameters active per token: {active:,} ({c.n_expert_per_token} of {c.n_expert} experts" in report


def test_what_cannot_be_expressed_is_refused():
    qwen = {**HF["qwen3_moe"][1], "model_type": "qwen3_moe"}
    with pytest.raises(ConversionError, match=r"gives blocks \[0\] a dense MLP \(mlp_only_layers=\[0\]"):
        config_from_hf({**qwen, "mlp_only_layers": [0]})
    with pytest.raises(ConversionError, match=r"gives blocks \[0\] a dense MLP .*decoder_sparse_step=2"):
        config_from_hf({**qwen, "decoder_sparse_step": 2})
    with pytest.raises(ConversionError, match="moe_norm_topk=False .Mixtral renormalises"):
        config_to_hf(tiny_moe(moe_norm_topk=False))
    with pytest.raises(ValueError, match="describe the experts of mlp_class_name 'LLaMAMoE', not of 'LLaMAMLP'"):
        tiny_moe(mlp_class_name="LLaMAMLP")
    with pytest.raises(ValueError, match="n_expert_per_token from 1 to n_expert, got n_expert=4 and n_expert_per_tok"):
        tiny_moe(n_expert_per_token=5)
    with pytest.raises(ValueError, match="moe_intermediate_size='8' must be a positive whole number"):
        tiny_moe(moe_intermediate_size="8")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")  # (transformers' and PEFT's notes)
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_peft_lora_both_ways_with_peft_logits(family, tmp_path):
    """A PEFT LoRA on the attention imports with PeftModel's logits; our LoRA on every linear layer, the experts'
    included (saved in the Hub's per-expert names, which transformers 5 and PEFT fold into its fused experts),
    exports to a file PeftModel loads with our logits, and imports back to them."""
    pytest.importorskip("peft")
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.adapters import save_adapters
    from lit_gpt.merge import load_finetuned
    from test_peft_format import hf_export, logits, peft_model, randomize_lora, save_peft

    model_type, kwargs = HF[family]
    base = make_hf_model(model_type, **kwargs)
    folder = tmp_path / "hf"
    base.save_pretrained(folder)
    convert_hf_checkpoint(folder)
    peft, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    expected = logits(peft)
    assert (expected - logits(base)).abs().max() > 1e-2
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)

    model = GPT.from_checkpoint(folder).eval()
    # (PEFT on transformers 5 leaves out a Qwen2-MoE's routed experts: that export says so, see below)
    targets = ["query", "value", "projection", "*.shared_expert.*"] if family == "qwen2_moe" else ["all-linear"]
    apply_adapters(model, AdapterConfig(method="lora", r=4, alpha=6.0, targets=targets))
    randomize_lora(model)
    ours = logits(model)
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), folder, tmp_path / "peft_export")
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), ours, **TOL)
    back = import_peft_adapter(out, folder, tmp_path / "back.safetensors")
    torch.testing.assert_close(logits(load_finetuned(folder, back)), ours, **TOL)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("family,targets,method,note", [
    ("qwen2_moe", ["mlp"], "lora", "PEFT on transformers 5 applies a Qwen2-MoE's shared-expert adapters only"),
    ("mixtral", ["mlp.experts.0.fc_1", "mlp.experts.0.fc_2"], "lora", "it adapts some experts only (0.w1, 0.w3)"),
    ("mixtral", ["mlp"], "oft", "leaves out or refuses OFT adapters on experts (it converts plain LoRA only)"),
    ("qwen3_moe", ["mlp.gate"], "ether", "whose router is not a linear module, cannot put HRA on it"),
    ("mixtral", ["mlp"], "lora", None),
])
def test_peft_export_says_when_peft_on_transformers_5_would_leave_experts_out(family, targets, method, note, tmp_path,
                                                                              capsys):
    pytest.importorskip("peft")
    from lit_gpt.adapters import save_adapters
    from lit_gpt.adapters.peft_format import export_peft_adapter

    model_type, kwargs = HF[family]
    make_hf_model(model_type, **kwargs).save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    model = GPT.from_checkpoint(tmp_path / "hf")
    apply_adapters(model, AdapterConfig(method=method, targets=targets, **({"r": 2} if method == "lora" else
                                                                           {"nb": 2})))
    capsys.readouterr()
    export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), tmp_path / "hf", tmp_path / "peft")
    err = capsys.readouterr().err
    if note is None:
        assert "Note:" not in err
    else:
        assert note in err and "load this PEFT folder with transformers 4" in err


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    """A random tiny Mixtral-shaped checkpoint (4 experts, 2 per token) with a BPE tokenizer and prepared data."""
    from lit_gpt.utils import save_model_weights
    from test_training import ROWS, _tokenizer  # (which puts scripts/ on the path)

    import prepare_json

    d = tmp_path_factory.mktemp("moe") / "tiny-moe"
    d.mkdir()
    _tokenizer(d)
    torch.manual_seed(0)
    cfg = tiny_moe(vocab_size=400, padded_vocab_size=448, block_size=256, n_embd=64, intermediate_size=32)
    cfg.save(d)
    save_model_weights(GPT(cfg), d)
    (d / "rows.json").write_text(__import__("json").dumps(ROWS))
    prepare_json.prepare(json_path=d / "rows.json", destination_path=d / "data", checkpoint_dir=d, max_seq_length=256)
    return d


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process_and_the_result_merges(moe_ckpt, tmp_path):
    """LoRA on every expert with FSDP2 on two CPU processes: each process's tokens choose other experts, and the run
    neither hangs nor differs from one process, with the routers' load-balancing loss too (its gradient reaches the
    adapters of earlier blocks through their outputs); the adapter then merges into a model that generates."""
    from test_training import common_flags, final_tensors, run_cli

    flags = ["--lora_targets", "all-linear", "--lora_r", "4", "--lora_dropout", "0", "--train.learning_rate", "1e-2",
             "--train.router_aux_loss_coef", "0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    cpu = dict(CUDA_VISIBLE_DEVICES="")
    r = run_cli("lora.py", *common_flags(moe_ckpt, one, 3), *flags, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("lora.py", *common_flags(moe_ckpt, two, 3, **{"--devices": "2"}), *flags, timeout=300, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (final_tensors(d, "lit_model_lora_finetuned.pth") for d in (one, two))
    assert set(a) == set(b) and any(".experts.3.fc_2." in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
    logged = [[float(row["router_aux_loss"]) for row in csv.DictReader(
        (d / "logs" / "metrics.csv").read_text().splitlines()) if row.get("router_aux_loss")] for d in (one, two)]
    assert len(logged[0]) == 3 and logged[0] == pytest.approx(logged[1], abs=1e-5)

    import merge_lora
    from lit_gpt.merge import load_finetuned

    merged_dir = tmp_path / "merged"
    merge_lora.main(checkpoint_dir=moe_ckpt, adapter_path=one / "lit_model_lora_finetuned.pth", out_dir=merged_dir)
    merged = GPT.from_checkpoint(merged_dir).eval()
    adapted = load_finetuned(moe_ckpt, one / "lit_model_lora_finetuned.pth").eval()
    idx = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), adapted(idx), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("targets,layers", [(["mlp.gate"], None), (["mlp.gate", "query"], [1]),
                                            (["mlp.gate", "mlp"], None)])
def test_a_router_adapter_goes_to_peft_and_back(targets, layers, tmp_path):
    """The router adapted (alone, in some blocks, beside the experts): its PEFT export imports back to the same
    layers (it used to become the named target mlp, which is the experts, and crash)."""
    pytest.importorskip("peft")
    from lit_gpt.adapters import save_adapters
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.merge import load_finetuned
    from test_peft_format import logits, randomize_lora

    model_type, kwargs = HF["qwen3_moe"]
    make_hf_model(model_type, **kwargs).save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    apply_adapters(model, AdapterConfig(method="lora", r=2, targets=targets, layers=layers))
    randomize_lora(model)
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), tmp_path / "hf", tmp_path / "peft")
    back = load_finetuned(tmp_path / "hf", import_peft_adapter(out, tmp_path / "hf", tmp_path / "b.safetensors"))
    adapted = {n.rsplit(".adapters", 1)[0] for n, p in back.named_parameters() if ".adapters." in n}
    assert adapted == {n.rsplit(".adapters", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(logits(back), logits(model), **TOL)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")
def test_an_expert_lora_trained_with_dropout_exports_without_it_and_loads_in_peft(tmp_path, capsys):
    """PEFT on transformers 5 refuses lora_dropout on fused experts; the dropout changes nothing an export computes,
    so it is written as 0, with a note (finetune/lora.py trains with 0.05 by default)."""
    pytest.importorskip("peft")
    from lit_gpt.adapters import save_adapters
    from lit_gpt.adapters.peft_format import export_peft_adapter
    from test_peft_format import hf_export, logits, peft_model, randomize_lora

    model_type, kwargs = HF["mixtral"]
    make_hf_model(model_type, **kwargs).save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    apply_adapters(model, AdapterConfig(method="lora", r=2, dropout=0.05, targets=["all-linear"]))
    randomize_lora(model)
    model.eval()
    capsys.readouterr()
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), tmp_path / "hf", tmp_path / "peft")
    assert "trained with lora_dropout=0.05, which PEFT on transformers 5 refuses" in capsys.readouterr().err
    assert __import__("json").loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0
    torch.testing.assert_close(logits(peft_model(hf_export(tmp_path / "hf", tmp_path), out)), logits(model), **TOL)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_router_trained_in_full_goes_to_peft_and_back(family, tmp_path):
    """transformers 5 names Mixtral's router mlp.gate (its files block_sparse_moe.gate): a router trained in full
    (PEFT's modules_to_save) is exported under both names, and a folder PEFT wrote on transformers 5 imports."""
    peft = pytest.importorskip("peft")
    from lit_gpt.adapters import save_adapters
    from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter
    from lit_gpt.merge import load_finetuned
    from test_peft_format import hf_export, logits, peft_model, randomize_lora

    model_type, kwargs = HF[family]
    base = make_hf_model(model_type, **kwargs)
    base.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    apply_adapters(model, AdapterConfig(method="lora", r=2, targets=["query"], train_modules=["mlp.gate"]))
    randomize_lora(model)
    with torch.no_grad():
        model.transformer.h[1].mlp.gate.weight.mul_(-2.0)
    ours = logits(model)
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), tmp_path / "hf", tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model(hf_export(tmp_path / "hf", tmp_path), out)), ours, **TOL)

    native = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                       target_modules=["q_proj"],
                                                                       modules_to_save=["gate"]))
    randomize_lora(native)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if "modules_to_save" in name:
                p.mul_(-2.0)
    native.save_pretrained(tmp_path / "native")
    adapter = import_peft_adapter(tmp_path / "native", tmp_path / "hf", tmp_path / "n.safetensors")
    torch.testing.assert_close(logits(load_finetuned(tmp_path / "hf", adapter)), logits(native.eval()), **TOL)


def test_a_mixtral_routers_training_noise_is_named_when_it_is_dropped(capsys):
    config_from_hf({**HF["mixtral"][1], "model_type": "mixtral", "router_jitter_noise": 0.1})
    assert "router_jitter_noise=0.1" in capsys.readouterr().err
    config_from_hf({**HF["mixtral"][1], "model_type": "mixtral", "router_jitter_noise": 0.0})
    assert capsys.readouterr().err == ""


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("parameters", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                        ["experts.down_proj", "experts.gate_up_proj"], ["experts.down_proj"]],
                         ids=["both", "both-nested-the-other-way", "down-only"])
def test_a_peft_lora_on_transformers_5_fused_experts_imports(family, parameters, tmp_path):
    """PEFT on transformers 5 puts LoRA on a block's fused experts with target_parameters (one ParamWrapper per
    parameter, nested): imported as LoRA on each expert's layers, it computes PeftModel's logits."""
    peft = pytest.importorskip("peft")
    from lit_gpt.adapters.peft_format import import_peft_adapter
    from lit_gpt.merge import load_finetuned

    model_type, kwargs = HF[family]
    make_hf_model(model_type, **kwargs).save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(IDX).logits
    config = peft.LoraConfig(r=2, lora_alpha=3, target_parameters=parameters, target_modules=["q_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        expected = model(IDX).logits
    model.save_pretrained(tmp_path / "peft")
    assert (expected - plain).abs().max() > 1e-2
    ours = load_finetuned(tmp_path / "hf", import_peft_adapter(tmp_path / "peft", tmp_path / "hf",
                                                               tmp_path / "a.safetensors")).eval()
    adapted = {n.split(".adapters")[0] for n, _ in ours.named_parameters() if ".adapters." in n}
    parts = {"gate_up_proj": {"fc_1", "fc_2"}, "down_proj": {"proj"}}
    assert {n.rsplit(".", 1)[1] for n in adapted if ".experts." in n} == set().union(
        *(parts[p.rsplit(".", 1)[1]] for p in parameters))
    assert sum(".experts." in n for n in adapted) == len(adapted) - 2  # (and the two blocks' attention)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX), expected, **TOL)


def test_target_parameters_other_than_fused_experts_are_refused(tmp_path):
    import json

    from lit_gpt.adapters.peft_format import import_peft_adapter

    model_type, kwargs = HF["mixtral"]
    make_hf_model(model_type, **kwargs).save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        dict(peft_type="LORA", r=2, lora_alpha=2, target_modules=[], target_parameters=["self_attn.q_proj.weight"])))
    with pytest.raises(ValueError, match=r"adapter_config\.json' sets target_parameters=\['self_attn\.q_proj\.weight'\]"
                                         r", LoRA on parameters instead of linear modules \(other than a mixture's "
                                         r"fused experts\), which lit_gpt's LoRA does not implement: retrain"):
        import_peft_adapter(tmp_path / "peft", tmp_path / "hf", tmp_path / "a.safetensors")
