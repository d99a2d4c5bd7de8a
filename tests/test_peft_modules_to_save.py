"""PEFT's `modules_to_save` (modules trained in full beside the adapter) both ways, as lit_gpt's
`AdapterConfig.train_modules` (`lit_gpt/adapters/peft_format.py`): checked against PEFT's own `PeftModel` on small
random transformers models (llama; GPT-2, whose head is tied to the token embeddings), compared on float32 logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters, save_adapters  # noqa: E402
from lit_gpt.adapters.peft_format import export_peft_adapter, peft_adapter_payload  # noqa: E402
from lit_gpt.convert_hf import convert_hf_checkpoint  # noqa: E402
from lit_gpt.merge import load_finetuned, read_finetuned  # noqa: E402
import test_adapters  # noqa: E402
import test_peft_format as fmt  # noqa: E402
from test_peft_format import edit_config, hf_export, logits, make_hf, peft_model  # noqa: E402

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors
quiet = fmt.quiet  # autouse: no warnings

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (transformers model, folder with its files and the lit conversion): llama, GPT-2 (tied head),
    GPT-NeoX (whose head transformers 5 calls lm_head, its files and transformers 4 embed_out)."""
    out = {}
    for family in ("llama", "gpt2", "gpt_neox"):
        model = make_hf(family)
        folder = tmp_path_factory.mktemp(family) / "hf"
        model.save_pretrained(folder)
        convert_hf_checkpoint(folder)
        out[family] = (model, folder)
    return out


def train_peft(base, tmp_path: Path, peft_config, seed: int = 2, scale: float = 0.3, name: str = "peft"):
    """A PeftModel on a copy of `base` whose adapter tensors are random and whose modules_to_save copies were moved
    off the base weights (as training moves them), saved as PEFT saves it; and its logits."""
    model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(model.named_parameters()):
            if any(part in key for part in ("lora_", "oft_R", "hra_u")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif ".modules_to_save.default." in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return logits(model.eval()), folder


def lit_trained(folder: Path, seed: int = 1, **config) -> GPT:
    """A lit model with random adapters and its train_modules moved off the base weights."""
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(model.named_parameters()):
            if ".adapters." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.requires_grad:  # a module trained in full
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def saved_keys(folder: Path) -> list[str]:
    from safetensors.torch import load_file

    return sorted(k for k in load_file(folder / "adapter_model.safetensors") if "lora_" not in k)


# ---------------------------------------------------------------------------------------------- PEFT -> lit
def test_lora_with_modules_to_save_imports_with_peft_logits(bases, tmp_path):
    base, folder = bases["llama"]
    expected, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head", "input_layernorm"]))
    assert saved_keys(peft_dir) == ["base_model.model.lm_head.weight",
                                    "base_model.model.model.layers.0.input_layernorm.weight",
                                    "base_model.model.model.layers.1.input_layernorm.weight"]

    finetuned = read_finetuned(peft_dir, folder)  # what chat, generate, eval and merge read
    config = finetuned.payload["adapter_config"]
    assert config["train_modules"] == ["head", "transformer.h.0.norm_1", "transformer.h.1.norm_1"]
    sd = finetuned.payload["state_dict"]
    assert {"lm_head.weight", "transformer.h.0.norm_1.weight", "transformer.h.1.norm_1.weight"} <= set(sd)
    model = load_finetuned(folder, peft_dir)
    torch.testing.assert_close(logits(model), expected, **TOL)
    # the trained modules matter: the adapters alone compute something else
    lora_only = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(peft_dir)).eval()
    for wrapper in (lora_only.base_model.model.lm_head, lora_only.base_model.model.model.layers[1].input_layernorm):
        wrapper.modules_to_save["default"].load_state_dict(wrapper.original_module.state_dict())
    assert (logits(lora_only) - expected).abs().max() > 1e-2

    merge_adapters(model)
    assert sorted(model.state_dict()) == sorted(GPT.from_checkpoint(folder).state_dict())
    torch.testing.assert_close(logits(model), expected, **TOL)


def test_tied_head_with_ensure_weight_tying_imports_with_peft_logits(bases, tmp_path):
    """PEFT trains a tied head and the embeddings as one tensor (ensure_weight_tying) and saves it under both names."""
    base, folder = bases["gpt2"]
    expected, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
        modules_to_save=["lm_head", "ln_f"], ensure_weight_tying=True))
    assert "base_model.model.transformer.wte.weight" in saved_keys(peft_dir)
    payload = peft_adapter_payload(peft_dir, folder)
    assert payload["adapter_config"]["train_modules"] == ["head", "transformer.ln_f"]
    torch.testing.assert_close(logits(load_finetuned(folder, peft_dir)), expected, **TOL)


def test_gpt_neox_head_under_its_transformers_5_name_imports_with_peft_logits(bases, tmp_path):
    """transformers 5 names GPT-NeoX's head lm_head (its files: embed_out), and PEFT saves it so; `embed_out`
    then selects nothing, which the import takes as PEFT does."""
    base, folder = bases["gpt_neox"]
    expected, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["query_key_value"],
        modules_to_save=["embed_out", "lm_head", "final_layer_norm"]))
    payload = peft_adapter_payload(peft_dir, folder)
    assert payload["adapter_config"]["train_modules"] == ["head", "transformer.ln_f"]
    torch.testing.assert_close(logits(load_finetuned(folder, peft_dir)), expected, **TOL)
    edit_config(peft_dir, modules_to_save=["embed_out", "final_layer_norm"])  # what transformers 5 trains nothing of
    from safetensors.torch import load_file, save_file

    tensors = load_file(peft_dir / "adapter_model.safetensors")
    del tensors["base_model.model.lm_head.weight"]
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    assert peft_adapter_payload(peft_dir, folder)["adapter_config"]["train_modules"] == ["transformer.ln_f"]


def test_gpt_neox_head_adapted_both_ways_under_transformers_5_name(bases, tmp_path):
    """A LoRA on GPT-NeoX's head: PEFT (transformers 5) saves it as lm_head, which an import reads as the converted
    checkpoint's embed_out; an export names both, so PEFT finds the head whichever transformers runs."""
    base, folder = bases["gpt_neox"]
    expected, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["query_key_value", "lm_head"]))
    torch.testing.assert_close(logits(load_finetuned(folder, peft_dir)), expected, **TOL)
    model = lit_trained(folder, method="lora", r=4, alpha=8, targets=["query", "value", "head"])
    out = export_peft_adapter(save_adapters(model, tmp_path / "adapter.safetensors"), folder, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_out", "lm_head"} <= set(cfg["target_modules"])
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), logits(model), **TOL)


def test_oft_with_modules_to_save_imports_with_peft_logits(bases, tmp_path):
    base, folder = bases["llama"]
    expected, peft_dir = train_peft(base, tmp_path, peft.OFTConfig(
        task_type="CAUSAL_LM", oft_block_size=8, target_modules=["q_proj", "v_proj"],
        modules_to_save=["post_attention_layernorm", "model.norm"]), scale=0.1)
    payload = peft_adapter_payload(peft_dir, folder)
    assert payload["adapter_config"]["train_modules"] == ["transformer.h.0.norm_2", "transformer.h.1.norm_2",
                                                          "transformer.ln_f"]
    torch.testing.assert_close(logits(load_finetuned(folder, peft_dir)), expected, **TOL)


# ---------------------------------------------------------------------------------------------- lit -> PEFT
EXPORTS = {
    # every norm: PEFT's "norm" selects input_layernorm, post_attention_layernorm and model.norm
    "llama_all": ("llama", dict(method="lora", r=4, alpha=8, targets=["query", "value"],
                                train_modules=["head", "norms"]), ["lm_head", "norm"]),
    # some norms only: names that select no other module
    "llama_some": ("llama", dict(method="lora", r=4, alpha=8, targets=["query", "value", "mlp"],
                                 train_modules=["transformer.h.0.norm_1", "transformer.ln_f"]),
                   ["layers.0.input_layernorm", "model.norm"]),
    # a head tied to the embeddings: both saved, PEFT keeps them one tensor (ensure_weight_tying)
    "gpt2_tied": ("gpt2", dict(method="lora", r=4, alpha=8, targets=["query", "value"],
                               train_modules=["head", "norms"]), ["ln_1", "ln_2", "ln_f", "lm_head", "wte"]),
    # the head under both its names: PEFT finds the one the running transformers has
    "gpt_neox": ("gpt_neox", dict(method="lora", r=4, alpha=8, targets=["query", "value"],
                                  train_modules=["embeddings", "norms", "head"]),
                 ["embed_in", "embed_out", "final_layer_norm", "input_layernorm", "lm_head",
                  "post_attention_layernorm"]),
    "ether_hra": ("llama", dict(method="ether", nb=4, targets=["query", "value"], train_modules=["norms", "head"]),
                  ["lm_head", "norm"]),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_with_train_modules_loads_in_peft_with_our_logits(case, bases, tmp_path):
    family, config, names = EXPORTS[case]
    _, folder = bases[family]
    model = lit_trained(folder, **config)
    adapter = save_adapters(model, tmp_path / "adapter.safetensors")
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == sorted(names)
    assert cfg.get("ensure_weight_tying", False) == (case == "gpt2_tied")
    expected = logits(model)
    loaded = peft_model(hf_export(folder, tmp_path), out)
    torch.testing.assert_close(logits(loaded), expected, **TOL)
    if case == "llama_some":  # the names select exactly the trained modules
        wrapped = sorted(n for n, m in loaded.named_modules() if isinstance(m, peft.utils.ModulesToSaveWrapper))
        assert wrapped == ["base_model.model.model.layers.0.input_layernorm", "base_model.model.model.norm"]
    # and back: the same tensors
    back = peft_adapter_payload(out, folder)
    ours = read_finetuned(adapter, folder).payload["state_dict"]
    assert sorted(back["state_dict"]) == sorted(ours)
    for key, value in ours.items():
        torch.testing.assert_close(back["state_dict"][key], value, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- refusals
def refusal(peft_dir: Path, folder: Path) -> str:
    with pytest.raises(ValueError) as e:
        peft_adapter_payload(peft_dir, folder)
    message = str(e.value)
    assert "\n" not in message and message.endswith("."), message
    return message


def test_refuses_a_tied_head_trained_apart_from_the_embeddings(bases, tmp_path):
    base, folder = bases["gpt2"]
    _, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"],
                                                             fan_in_fan_out=True, modules_to_save=["lm_head"]))
    message = refusal(peft_dir, folder)
    assert all(w in message for w in ["trains 'lm_head.weight' but not 'transformer.wte.weight'", "ties the output "
                                      "head", "ensure_weight_tying=true"]), message
    _, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"],
                                                             fan_in_fan_out=True,
                                                             modules_to_save=["lm_head", "wte"]), name="both")
    message = refusal(peft_dir, folder)
    assert "'lm_head.weight' and 'transformer.wte.weight' as two tensors that differ" in message, message


def test_refuses_what_a_lit_adapter_cannot_hold(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    base, folder = bases["llama"]
    # q_proj in full, but lit_gpt's q, k and v are one tensor
    _, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["v_proj"],
                                                             modules_to_save=["q_proj"]))
    message = refusal(peft_dir, folder)
    assert all(w in message for w in ["trains 'model.layers.0.self_attn.q_proj.weight' in full", "not "
                                      "'model.layers.0.self_attn.k_proj.weight'", "'transformer.h.0.attn.qkv.weight'"])

    _, peft_dir = train_peft(base, tmp_path, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["v_proj"],
                                                             modules_to_save=["lm_head"]), name="head")
    edit_config(peft_dir, modules_to_save=["lm_head", "v_proj"])  # a module both adapted and trained in full
    message = refusal(peft_dir, folder)
    assert all(w in message for w in ["v_proj'", "modules_to_save trains in full, so PEFT would not adapt it"])

    edit_config(peft_dir, modules_to_save=["lm_head", "norm"])  # names modules whose tensors are not there
    message = refusal(peft_dir, folder)
    assert all(w in message for w in ["trains 'model.layers.0.input_layernorm' in full beside the LORA layers",
                                      "has no base_model.model.model.layers.0.input_layernorm.weight"]), message

    edit_config(peft_dir, modules_to_save="lm_head")
    assert "modules_to_save='lm_head', which is not a list" in refusal(peft_dir, folder)

    edit_config(peft_dir, modules_to_save=["lm_head"])
    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"][:-1].clone()
    save_file(tensors, str(path))
    message = refusal(peft_dir, folder)
    assert "lm_head.weight in" in message and "trained on another base model" in message, message
