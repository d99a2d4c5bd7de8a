"""LoRA's starting points (`AdapterConfig.init`, `--lora_init`): PiSSA and OLoRA against PEFT's own
`init_lora_weights="pissa"` / `"olora"` on the same layer (the same factors, the same outputs after the same update),
the base left unchanged (the starting factors kept and subtracted), saving, loading without decomposing again,
merging, export to PEFT as a plain LoRA of rank 2r, and a run from the command line that resumes and merges."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters, save_adapters
from lit_gpt.adapters.lora import base_factors
import test_adapters
from test_training import tiny_ckpt  # noqa: F401 (a fixture)

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors


def tiny_llama() -> GPT:
    torch.manual_seed(0)
    return GPT(Config(name="tiny", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64,
                      padded_vocab_size=64, block_size=32, bias=False, norm_class_name="RMSNorm",
                      mlp_class_name="LLaMAMLP", intermediate_size=48)).eval()


IDX = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_outputs_equal_pefts_on_the_same_layer(init):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(48, 40))
    torch.nn.init.normal_(layer[0].bias)
    x = torch.randn(5, 48)
    ours = apply_adapters(copy.deepcopy(layer), AdapterConfig(method="lora", r=4, alpha=8, targets=["0"], init=init))
    theirs = peft.get_peft_model(copy.deepcopy(layer), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                       init_lora_weights=init))
    ad, lora = ours[0].adapters["full"], theirs.base_model.model[0]
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    assert torch.equal(ad.A, A) and torch.equal(ad.B, B) and torch.equal(ad.A0, A) and torch.equal(ad.B0, B)
    assert torch.equal(ours[0].weight, layer[0].weight)  # the base weight is not changed here (PEFT's is)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), layer(x), atol=1e-6, rtol=0)  # the base layer at the start
        g = torch.Generator().manual_seed(1)
        ad.A.add_(torch.randn(A.shape, generator=g) * 0.1)
        ad.B.add_(torch.randn(B.shape, generator=g) * 0.1)
        A.copy_(ad.A)
        B.copy_(ad.B)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-6, rtol=0)
        torch.testing.assert_close(merge_adapters(copy.deepcopy(ours))(x), ours(x), atol=2e-6, rtol=0)


def test_the_factors_are_the_papers_in_float64():
    """PiSSA: s B_0 A_0 is the best rank-r approximation of W (Eckart-Young: its error is the norm of the other
    singular values) and A_0 has orthogonal rows scaled by sqrt(S_r / s); OLoRA: B_0 has orthonormal columns, A_0 is
    upper triangular, and B_0 A_0 holds W's first r columns exactly."""
    torch.manual_seed(0)
    W = torch.randn(40, 48, dtype=torch.float64)
    s = 2.0
    A0, B0 = base_factors(W, 4, s, "pissa")
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.matrix_norm(W - s * B0 @ A0), S[4:].norm(), atol=1e-10, rtol=0)
    torch.testing.assert_close(A0 @ A0.T, torch.diag(S[:4] / s), atol=1e-10, rtol=0)
    A0, B0 = base_factors(W, 4, s, "olora")
    torch.testing.assert_close(B0.T @ B0, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(A0.tril(-1), torch.zeros_like(A0))
    torch.testing.assert_close((B0 @ A0)[:, :4], W[:, :4], atol=1e-12, rtol=0)
    # the randomized SVD is close to the full one, and the same every time (a resumed run recomputes it)
    A1, B1 = base_factors(W, 4, s, "pissa_niter_8")
    assert torch.equal(A1, base_factors(W, 4, s, "pissa_niter_8")[0])
    error = torch.linalg.matrix_norm(W - s * B1 @ A1)
    assert S[4:].norm() <= error < 1.05 * S[4:].norm()


def test_gaussian_starts_a_at_std_one_over_r_and_b_at_zero():
    model = apply_adapters(tiny_llama(), AdapterConfig(method="lora", r=8, targets=["mlp"], init="gaussian"))
    ad = model.transformer.h[0].mlp.fc_1.adapters["full"]
    assert ad.A0 is None and torch.equal(ad.B, torch.zeros_like(ad.B))
    assert 0.1 < ad.A.std().item() < 0.15  # 1 / 8


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_save_load_without_decomposing_again_merge_and_export_to_peft(init, tmp_path, monkeypatch):
    """The file holds A_0 and B_0, so loading it (chat, eval, merge) decomposes nothing; PEFT loads the export, a
    plain LoRA of rank 2r ([A; A_0], [B, -B_0]), onto the original base with our logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lit_gpt.adapters.peft_format import export_peft_adapter
    from lit_gpt.convert_hf import convert_hf_checkpoint
    from lit_gpt.merge import load_finetuned
    from test_convert_hf import make_hf_model

    hf = make_hf_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    model = GPT.from_checkpoint(tmp_path / "hf").eval()
    with torch.no_grad():
        base = model(IDX)
    apply_adapters(model, AdapterConfig(method="lora", r=4, alpha=8, targets=["all-linear"], init=init))
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), base, atol=1e-5, rtol=0)
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ours = model(IDX)
    assert (ours - base).abs().max() > 1e-2
    path = save_adapters(model, tmp_path / "a.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("the base weights were decomposed again")

    monkeypatch.setattr("lit_gpt.adapters.lora.base_factors", refuse)
    loaded = load_finetuned(tmp_path / "hf", path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDX), ours)
        torch.testing.assert_close(merge_adapters(loaded)(IDX), ours, atol=1e-5, rtol=0)
    out = export_peft_adapter(path, tmp_path / "hf", tmp_path / "peft")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(exported, str(out)).eval()(IDX).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_what_does_not_go_together_is_refused_naming_the_flag():
    from lit_gpt.adapters.config import named_by_flags
    from lit_gpt.training import LORA_FLAGS

    with pytest.raises(ValueError, match="init must be default, gaussian, pissa, pissa_niter_<k>"):
        AdapterConfig(method="lora", init="pissa_niter_0")
    with pytest.raises(ValueError, match="init pissa is a LoRA option; method='oft' does not use it"):
        AdapterConfig(method="oft", init="pissa")
    with named_by_flags(LORA_FLAGS), pytest.raises(ValueError, match="--lora_init olora and --lora_dora do not go"):
        AdapterConfig(method="lora", init="olora", dora=True)


@pytest.mark.slow
def test_a_pissa_run_resumes_where_it_left_off_and_merges(tiny_ckpt, tmp_path):  # noqa: F811
    """A run stopped after step 2's checkpoint and resumed (which decomposes the base weights again) ends where the
    uninterrupted run did; --merge true then writes a model that computes the adapted one."""
    from lit_gpt.merge import load_finetuned
    from test_training import common_flags, final_tensors, run_cli

    ckpt = tiny_ckpt
    run = tmp_path / "run"
    flags = [*common_flags(ckpt, run, 4, **{"--train.save_interval": "2"}), "--lora_init", "pissa_niter_2",
             "--lora_dropout", "0", "--lora_targets", "all-linear", "--train.learning_rate", "1e-2"]
    r = run_cli("lora.py", *flags, "--merge", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    name = "lit_model_lora_finetuned.pth"
    uninterrupted = final_tensors(run, name)
    assert any(k.endswith(".A0") for k in uninterrupted)
    merged = GPT.from_checkpoint(run / "merged").eval()
    adapted = load_finetuned(ckpt, run / name).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX), adapted(IDX), atol=1e-4, rtol=0)
    (run / name).unlink()
    (run / "checkpoints" / "step-000004.pth").unlink()
    r = run_cli("lora.py", *flags, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = final_tensors(run, name)
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=1e-5, rtol=0, msg=k)

