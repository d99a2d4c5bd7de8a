"""Modules trained in full beside the adapters (`AdapterConfig.train_modules`, PEFT's `modules_to_save`;
`finetune/*.py --*_train_modules`): which modules the names select, that their gradients are plain autograd's on the
base model, that only they and the adapters change in a step, save/load/merge, tied heads, the refusals, the dtype
under half precision, and a training run that merges. PEFT folders with `modules_to_save`: tests/test_peft_*.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lit_gpt import GPT
from lit_gpt.adapters import (
    AdapterConfig, adapter_state_dict, apply_adapters, load_adapters, merge_adapters, save_adapters,
    set_adapters_enabled,
)
from lit_gpt.adapters.plan import plan_report
from lit_gpt.merge import load_finetuned
from lit_gpt.training import (
    cast_trainable_float32, check_precision, tied_trained_note, train_modules_from_flag, trainable_state_dict,
)
from lit_gpt.utils import load_file
from test_adapters import one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)
from test_final_folder import train
from test_training import tiny_ckpt  # noqa: F401 (a fixture)

NORMS = ["transformer.h.0.norm_1.weight", "transformer.h.0.norm_2.weight", "transformer.h.1.norm_1.weight",
         "transformer.h.1.norm_2.weight", "transformer.ln_f.weight"]


def trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n)


@pytest.fixture(scope="module")
def base() -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config()).double()
    with torch.no_grad():  # norms away from 1, so a lost norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("names, expected", [
    (["head"], ["lm_head.weight"]),
    (["embeddings"], ["transformer.wte.weight"]),
    (["norms"], NORMS),
    (["transformer.ln_f", "norm_1"], ["transformer.h.0.norm_1.weight", "transformer.h.1.norm_1.weight",
                                      "transformer.ln_f.weight"]),
    (["re:transformer\\.h\\.1\\..*norm_2"], ["transformer.h.1.norm_2.weight"]),
    (["transformer.h.1.mlp"], ["transformer.h.1.mlp.fc_1.weight", "transformer.h.1.mlp.fc_2.weight",
                               "transformer.h.1.mlp.proj.weight"]),
])
def test_named_and_pattern_modules_are_trained(base, names, expected):
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(method="ether", nb=4, train_modules=names))
    assert trainable(model) == expected
    assert [k for k in adapter_state_dict(model) if ".adapters." not in k] == expected


def test_gpt2_embeddings_include_positions():
    model = GPT(tiny_config(name="tiny-gpt2", norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                            pos_embedding="learned", rotary_percentage=0.0, bias=True))
    apply_adapters(model, AdapterConfig(method="lora", train_modules=["embeddings"]))
    assert trainable(model) == ["transformer.wpe.weight", "transformer.wte.weight"]


@pytest.mark.parametrize("method", ["etherplus", "lora"])
def test_gradients_are_plain_autograd_on_the_base(base, method):
    """At init (ETHER+ and LoRA leave the model unchanged) the trained modules' gradients are those of the base
    model with the same weights trainable; after an AdamW step only they and the adapters changed."""
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(method=method, nb=4, r=4, targets=["query", "value"],
                                                              train_modules=["head", "norms"]))
    reference = copy.deepcopy(base)
    x = torch.randint(0, 64, (35, 30))  # (the training loss: over 1024 tokens its chunks are recomputed in backward)
    model(x, labels=x).backward()
    reference(x, labels=x).backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name in ["lm_head.weight"] + NORMS:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-10, atol=1e-12)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(adapter_state_dict(model))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_load_and_merge_carry_the_trained_weights(base, tmp_path, suffix):
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(method="etherplus", nb=4, targets=["query", "mlp"],
                                                              train_modules=["head", "transformer.ln_f"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    x = torch.randint(0, 64, (2, 10))
    expected = model(x)
    path = save_adapters(model, tmp_path / f"adapter{suffix}")
    loaded = load_adapters(copy.deepcopy(base), path).eval()
    torch.testing.assert_close(loaded(x), expected)
    assert trainable(loaded) == ["lm_head.weight", "transformer.ln_f.weight"]
    # into a model adapted alike, and its own copy of the trained weights is overwritten
    again = apply_adapters(copy.deepcopy(base), read_config(path))
    torch.testing.assert_close(load_adapters(again, path).eval()(x), expected)
    merged = merge_adapters(loaded)
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(x), expected)
    torch.testing.assert_close(merged.lm_head.weight, model.lm_head.weight)
    assert adapter_state_dict(merged) == {}
    with pytest.raises(ValueError, match="no adapters to save"):
        save_adapters(merged, tmp_path / "again.pth")


def read_config(path):
    from lit_gpt.adapters import read_adapter_config

    return read_adapter_config(path)


def test_a_tied_head_is_one_tensor_trained_in_both_places(tmp_path):
    torch.manual_seed(0)
    base = GPT(tiny_config(tie_embeddings=True)).double()
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=4, train_modules=["head"]))
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.requires_grad
    assert tied_trained_note(model) == ("note: lm_head.weight is tied to transformer.wte.weight (one tensor), so "
                                        "training it in full changes both.")
    assert tied_trained_note(apply_adapters(GPT(tiny_config()), AdapterConfig(train_modules=["head"]))) is None
    with torch.no_grad():
        model.lm_head.weight.add_(0.3)
    msd, _ = trainable_state_dict(model)  # (what a run saves: the tied weight under both of its names)
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(msd)
    path = save_adapters(model, tmp_path / "a.pth", state_dict=msd)
    assert [k for k in load_file(path)["state_dict"] if ".adapters." not in k] == ["lm_head.weight"]
    loaded = load_adapters(copy.deepcopy(base), path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    # a training checkpoint as lit_gpt.merge reads it (step-*.pth as --adapter_path): both names of the tied weight
    step = {"adapter_config": read_config(path).to_dict(), "state_dict": msd}
    torch.testing.assert_close(load_adapters(copy.deepcopy(base), step).eval()(x), model(x))
    # merging it: the adapters go to the file's float32, the tied trained head stays in the model's dtype
    from lit_gpt.merge import _adapters_to_file_precision

    half = load_adapters(copy.deepcopy(base).bfloat16(), step)
    _adapters_to_file_precision(half, {k: v.float() for k, v in msd.items()})
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.lm_head.weight is half.transformer.wte.weight
    assert {p.dtype for n, p in half.named_parameters() if ".adapters." in n} == {torch.float32}


def test_refusals(base, tmp_path):
    gpt = copy.deepcopy(base)
    with pytest.raises(ValueError, match="'transformer.h.0.attn' would be both trained in full .* adapted .* holds "
                                         "the adapted layer 'transformer.h.0.attn.qkv'"):
        apply_adapters(gpt, AdapterConfig(method="ether", nb=4, train_modules=["transformer.h.0.attn"]))
    with pytest.raises(ValueError, match="'lm_head' would be both .* it is the adapted layer 'lm_head'"):
        apply_adapters(gpt, AdapterConfig(method="ether", nb=4, targets=["head"], train_modules=["head"]))
    with pytest.raises(ValueError, match=r"'embed_tokens' matches no module of GPT.*'transformer.wte' here"):
        apply_adapters(gpt, AdapterConfig(method="ether", nb=4, train_modules=["embed_tokens"]))
    assert all(p.requires_grad for p in gpt.parameters())  # (refused calls left the model untouched)
    with pytest.raises(ValueError, match="train_modules must be a list of module names"):
        AdapterConfig(train_modules=[""])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        AdapterConfig(train_modules=["re:("])
    # a model with trained modules cannot be switched back to the base
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(method="ether", nb=4, train_modules=["norms"]))
    with pytest.raises(ValueError, match="trains 'transformer.h.0.norm_1' and more in full .* load the base"):
        set_adapters_enabled(model, False)
    # a file with trained modules into a model adapted without them: the setting is named
    path = save_adapters(model, tmp_path / "a.pth")
    plain = apply_adapters(copy.deepcopy(base), AdapterConfig(method="ether", nb=4))
    with pytest.raises(ValueError, match=r"train_modules=\['norms'\] in the file, train_modules=\[\] in this model"):
        load_adapters(plain, path)
    # the same modules written otherwise are the same setting
    spelled = apply_adapters(copy.deepcopy(base),
                             AdapterConfig(method="ether", nb=4, train_modules=["re:.*(norm_[12]|ln_f)"]))
    load_adapters(spelled, path)
    with pytest.raises(ValueError, match="--precision 16-true cannot train modules in full"):
        check_precision("16-true", AdapterConfig(method="lora", train_modules=["head"]))


def test_any_model_by_module_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
            self.classifier = nn.Linear(8, 3)

        def forward(self, x):
            return self.classifier(self.body(self.emb(x)))

    net = apply_adapters(Net(), AdapterConfig(method="lora", r=2, targets=["body.0", "body.3"],
                                              train_modules=["classifier", "body.1"]))
    assert trainable(net) == ["body.1.bias", "body.1.weight", "classifier.bias", "classifier.weight"]
    with pytest.raises(ValueError, match="'head' matches no module of Net: name modules that have parameters "
                                         r"\(0, 1, 3, classifier, emb\)"):
        apply_adapters(Net(), AdapterConfig(method="lora", targets=["body.0"], train_modules=["head"]))
    with pytest.raises(ValueError, match="'body.2' matches only modules without parameters in Net"):
        apply_adapters(Net(), AdapterConfig(method="lora", targets=["body.0"], train_modules=["body.2"]))


def test_half_precision_keeps_trained_modules_in_the_model_dtype(base):
    """`--adapter_float32` / 16-true: the adapters in float32, the modules trained in full in the model's dtype (their
    own forward takes the activations' dtype), as full fine-tuning and PEFT's modules_to_save do."""
    model = apply_adapters(copy.deepcopy(base).bfloat16(), AdapterConfig(method="lora", train_modules=["norms"]))
    cast_trainable_float32(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert {dtypes[n] for n in NORMS} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if ".adapters." in n} == {torch.float32}
    model(torch.randint(0, 64, (1, 5))).float().sum().backward()


def test_flag_names_and_dry_run_count():
    assert train_modules_from_flag("norms, head,embed_tokens,head") == ["head", "norms", "transformer.wte"]
    assert train_modules_from_flag(["input_layernorm", "lm_head"]) == train_modules_from_flag("head,norm_1")
    assert train_modules_from_flag("re:h\\.[0-9]{1,2}\\.norm_1,head") == ["head", "re:h\\.[0-9]{1,2}\\.norm_1"]
    assert train_modules_from_flag(None) == []
    report = plan_report("Llama-2-7b-hf", AdapterConfig(method="lora", r=8, train_modules=["head", "norms"]),
                         "bf16-true", adapter_float32=True)
    head, norms = 32000 * 4096, 65 * 4096
    assert f"trainable parameters: {4_194_304 + head + norms:,} ({head + norms:,} of them in the modules" in report
    # AdamW's state: the adapter in float32, the trained modules in bfloat16
    assert f"AdamW state: {(2 * (4 * 4_194_304 + 2 * (head + norms))) / 2**20:.2f} MiB" in report


@pytest.mark.slow
def test_finetune_with_train_modules_trains_and_merges(tiny_ckpt, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train("lora", out, tiny_ckpt, steps=3, lora_train_modules="head,transformer.ln_f", lora_dropout=0.0,
          merge=True)
    adapter = out / "lit_model_lora_finetuned.pth"
    saved = load_file(adapter)
    assert saved["adapter_config"]["train_modules"] == ["head", "transformer.ln_f"]
    base = GPT.from_checkpoint(tiny_ckpt).eval()
    merged = load_file(out / "merged" / "lit_model.pth")
    for key in ("lm_head.weight", "transformer.ln_f.weight"):
        assert not torch.equal(saved["state_dict"][key], base.state_dict()[key])  # trained
        assert torch.equal(merged[key], saved["state_dict"][key])
    assert torch.equal(merged["transformer.h.0.norm_1.weight"], base.transformer.h[0].norm_1.weight)
    adapted = load_finetuned(tiny_ckpt, adapter)
    x = torch.randint(0, base.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_checkpoint(out / "merged").eval()(x), adapted(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_two_processes_with_float32_adapters_and_trained_norms(tiny_ckpt, tmp_path):  # noqa: F811
    """FSDP2 wants one dtype for a unit's trainable weights: the norms (bfloat16) are units of their own beside the
    blocks' float32 adapters, kept gathered until backward (a norm's weight rebuilds its output there). (That two
    processes train as one does is tests/test_training.py's, for the adapters; with trained modules it agreed to a
    bfloat16 spacing by hand.)"""
    from test_training import common_flags, final_tensors, run_cli

    flags = common_flags(tiny_ckpt, tmp_path, 2, **{"--devices": "2", "--precision": "bf16-true"})
    r = run_cli("lora.py", *flags, "--adapter_float32", "true", "--lora_train_modules", "norms,head",
                "--lora_dropout", "0", "--train.learning_rate", "1e-2", timeout=300, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = final_tensors(tmp_path, "lit_model_lora_finetuned.pth")
    base = load_file(tiny_ckpt / "lit_model.pth")
    for key, value in trained.items():
        assert value.dtype == (torch.float32 if ".adapters." in key else torch.bfloat16), key
    for key in ["lm_head.weight", "transformer.ln_f.weight", "transformer.h.1.norm_2.weight"]:
        assert not torch.equal(trained[key].float(), base[key].bfloat16().float()), key


def checkpoint(folder, model: GPT):
    from lit_gpt.utils import save_model_weights

    folder.mkdir()
    model.config.save(folder)
    save_model_weights(model, folder)
    return folder


def test_merge_and_load_check_the_trained_modules_against_the_base(tmp_path):
    """A merge at a wider --precision than the base's keeps the trained weights as the file holds them; a base of
    another vocabulary is refused before its weights are read, naming the file and the tensor."""
    from lit_gpt.merge import merge_checkpoint

    torch.manual_seed(0)
    ckpt = checkpoint(tmp_path / "base", GPT(tiny_config()).bfloat16())
    model = apply_adapters(GPT.from_checkpoint(ckpt, dtype=torch.float32),
                           AdapterConfig(method="lora", r=4, train_modules=["head", "norms"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)  # below a bfloat16 spacing of the norms' ones
    adapter = save_adapters(model, tmp_path / "run" / "adapter.pth")
    out = merge_checkpoint(adapter, ckpt, tmp_path / "merged", precision="32-true", log=lambda *a: None)
    merged = load_file(out / "lit_model.pth")
    for key in ["lm_head.weight"] + NORMS:
        assert torch.equal(merged[key], model.state_dict()[key]), key
    torch.testing.assert_close(GPT.from_checkpoint(out).eval()(torch.arange(8)[None]),
                               model.eval()(torch.arange(8)[None]), atol=1e-5, rtol=1e-5)
    other = checkpoint(tmp_path / "other", GPT(tiny_config(vocab_size=96, padded_vocab_size=96)))
    with pytest.raises(ValueError, match=rf"^{str(adapter)} was trained on another base model .*its 'lm_head.weight' "
                                         r"had shape \[64, 32\] there but .* has shape \[96, 32\]"):
        load_finetuned(other, adapter)
