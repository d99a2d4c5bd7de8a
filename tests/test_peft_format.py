"""LoRA adapters between lit_gpt and HF PEFT (`lit_gpt/adapters/peft_format.py`, `scripts/convert_peft_adapter.py`),
checked against PEFT's own `PeftModel` on transformers models: small random models of the llama (GQA), GPT-2
(`Conv1D`, fused `c_attn`) and GPT-NeoX (interleaved `query_key_value`) families, converted with the scripts'
functions, compared on float32 logits."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.adapters import AdapterConfig, adapted_layers, apply_adapters, read_adapter_config, save_adapters  # noqa
from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter  # noqa: E402
from lit_gpt.adapters.state import load_adapter_file  # noqa: E402
from lit_gpt.convert_hf import convert_hf_checkpoint, convert_lit_checkpoint  # noqa: E402
from lit_gpt.merge import load_finetuned  # noqa: E402
import test_adapters  # noqa: E402

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
TOL = dict(atol=2e-5, rtol=2e-5)
IDX = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))

FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                  rms_norm_eps=1e-5),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                 bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=VOCAB, rotary_pct=0.5, max_position_embeddings=32),
}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def make_hf(family: str, seed: int = 0, **overrides):
    kwargs = dict(FAMILIES[family], **overrides)
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (transformers model, folder holding its files and the lit conversion next to them)."""
    out = {}
    for family in FAMILIES:
        model = make_hf(family)
        folder = tmp_path_factory.mktemp(family) / "hf"
        model.save_pretrained(folder)
        convert_hf_checkpoint(folder)  # lit_model.pth + model_config.yaml, as scripts/convert_hf_checkpoint.py
        out[family] = (model, folder)
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDX)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def randomize_lora(model, seed: int = 1) -> None:
    """Random non-zero A and B on every LoRA of a lit model (B starts at zero) or of a PeftModel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".adapters." in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_model(base, folder: Path):
    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


def hf_export(folder: Path, tmp_path: Path):
    out = tmp_path / "hf_export"
    if not out.is_dir():
        convert_lit_checkpoint(folder, out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def lit_lora(folder: Path, targets: list[str], r: int = 4, alpha: float = 6.0, seed: int = 1) -> GPT:
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(method="lora", r=r, alpha=alpha, targets=targets))
    randomize_lora(model, seed)
    return model.eval()


def save_peft(base, tmp_path: Path, seed: int = 2, **config) -> tuple[object, Path]:
    """A PeftModel with random non-zero LoRA weights on a copy of `base`, saved as PEFT saves it."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    randomize_lora(model, seed)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    return model.eval(), folder


# ---------------------------------------------------------------------------------------------- (a) export
EXPORT_TARGETS = {
    "llama": ["query", "key", "value", "projection", "mlp", "head"],
    "gpt2": ["query", "value", "mlp"],  # c_attn in block form (rank 2r, rank_pattern) next to rank-r layers
    "gpt_neox": ["query", "key", "value", "projection"],  # block form through the per-head interleave
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_loads_in_peft_with_the_same_logits(family, suffix, bases, tmp_path):
    _, folder = bases[family]
    model = lit_lora(folder, EXPORT_TARGETS[family])
    adapter = save_adapters(model, tmp_path / f"adapter{suffix}")
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert cfg["fan_in_fan_out"] == (family == "gpt2")
    expected = logits(model)
    assert (expected - logits(GPT.from_checkpoint(folder).eval())).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), expected, **TOL)


def test_export_names_transformers_modules(bases, tmp_path):
    _, folder = bases["gpt2"]
    out = export_peft_adapter(save_adapters(lit_lora(folder, EXPORT_TARGETS["gpt2"]), tmp_path / "a.pth"), folder,
                           tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    # mlp.c_proj, not c_proj: the bare name would also select the attention's c_proj
    assert cfg["target_modules"] == ["c_attn", "c_fc", "mlp.c_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 6, {"c_attn": 8},
                                                                                         {"c_attn": 12})


# ---------------------------------------------------------------------------------------------- (b) import
IMPORT_CASES = {
    "llama_rslora": ("llama", dict(r=4, lora_alpha=12, use_rslora=True, lora_dropout=0.1,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])),
    "llama_regex": ("llama", dict(r=3, lora_alpha=5, target_modules=r".*\.(q_proj|v_proj|lm_head)")),
    "llama_all_linear": ("llama", dict(r=2, lora_alpha=16, target_modules="all-linear")),
    # the same layers in some blocks: AdapterConfig.layers (lm_head, named in full, whatever the blocks)
    "llama_layers": ("llama", dict(r=4, lora_alpha=8, layers_to_transform=[1],
                                   target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])),
    # q_proj in one block, down_proj in every one: that block as the layers, down_proj by full names
    "llama_q_in_one_block": ("llama", dict(r=4, lora_alpha=8,
                                           target_modules=r".*(layers\.0\.self_attn\.q_proj|down_proj)")),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=7, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt_neox_rslora": ("gpt_neox", dict(r=4, lora_alpha=3, use_rslora=True,
                                         target_modules=["query_key_value", "dense"])),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_computes_what_peft_computes(case, bases, tmp_path):
    family, lora_config = IMPORT_CASES[case]
    base, folder = bases[family]
    model, peft_dir = save_peft(base, tmp_path, **lora_config)
    expected = logits(model)
    assert (expected - logits(base)).abs().max() > 1e-2

    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    config = read_adapter_config(adapter)
    r_peft, alpha_peft = lora_config["r"], lora_config["lora_alpha"]
    peft_scale = alpha_peft / (math.sqrt(r_peft) if lora_config.get("use_rslora") else r_peft)
    assert config.alpha / config.r == pytest.approx(peft_scale)
    assert config.dropout == lora_config.get("lora_dropout", 0.0)
    assert config.layers == lora_config.get("layers_to_transform", config.layers)
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)


def test_import_of_ranks_and_scales_that_differ_between_layers(bases, tmp_path, capsys):
    """rank_pattern / alpha_pattern: one lit r and alpha for all layers, the lower ranks padded with zeros (which
    get zero gradients, so training keeps those layers at their rank) and the other scales folded into B."""
    base, folder = bases["llama"]
    model, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3})
    expected = logits(model)
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    err = capsys.readouterr().err
    assert "imported as rank 4, scale 2," in err, err
    config = read_adapter_config(adapter)
    assert (config.r, config.alpha) == (4, 8)
    lit = load_finetuned(folder, adapter)
    torch.testing.assert_close(logits(lit), expected, **TOL)
    proj = lit.transformer.h[0].attn.proj.adapters["full"]
    assert proj.A.shape[0] == 4 and not proj.A[2:].any() and not proj.B[:, 2:].any()
    loss = lit(IDX).square().mean()
    loss.backward()
    assert proj.A.grad[:2].any() and not proj.A.grad[2:].any() and not proj.B.grad[:, 2:].any()


def test_rank_and_alpha_patterns_select_what_peft_selects():
    """`rank_pattern` keys match the end of a module's name, as PEFT's get_pattern_key matches them: a key that is a
    prefix ("model.layers.1") or a piece of a name ("q") selects nothing, a suffix or a regex does."""
    from peft.utils.other import get_pattern_key

    from lit_gpt.adapters.peft_format import _pattern_value

    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in (1, 12) for p in "qkvo"] + ["lm_head"]
    keys = ["model.layers.1", "layers.1.self_attn", "q", "q_proj", "layers.12.self_attn.v_proj", r".*\.(k|o)_proj",
            "layers.1.self_attn.q_proj", "lm_head"]
    for key in keys:
        for pattern in ({key: 16}, {key: 16, "v_proj": 2}):
            for module in modules:
                expected = pattern.get(get_pattern_key(pattern.keys(), module), 8)
                assert _pattern_value(pattern, module, 8) == expected, (pattern, module)


def test_import_targets(bases, tmp_path):
    base, folder = bases["llama"]
    _, peft_dir = save_peft(base, tmp_path, **IMPORT_CASES["llama_layers"][1])
    config = read_adapter_config(import_peft_adapter(peft_dir, folder, tmp_path / "a.pth"))
    assert (config.targets, config.layers) == (["query", "value", "projection", "mlp.proj", "head"], [1])
    _, peft_dir = save_peft(base, tmp_path / "one", **IMPORT_CASES["llama_q_in_one_block"][1])
    config = read_adapter_config(import_peft_adapter(peft_dir, folder, tmp_path / "o.pth"))
    assert (config.targets, config.layers) == (["query", "transformer.h.0.mlp.proj", "transformer.h.1.mlp.proj"], [0])
    _, peft_dir = save_peft(base, tmp_path / "names", r=4, lora_alpha=8,
                            target_modules=r".*(layers\.1\.self_attn\.o_proj|down_proj)")
    config = read_adapter_config(import_peft_adapter(peft_dir, folder, tmp_path / "n.pth"))
    assert (config.targets, config.layers) == (["transformer.h.0.mlp.proj", "transformer.h.1.attn.proj",
                                                "transformer.h.1.mlp.proj"], None)
    _, peft_dir = save_peft(base, tmp_path / "all", **IMPORT_CASES["llama_all_linear"][1])
    config = read_adapter_config(import_peft_adapter(peft_dir, folder, tmp_path / "b.pth"))
    assert config.targets == ["query", "key", "value", "projection", "mlp"]


# ---------------------------------------------------------------------------------------------- (c) round trips
def test_the_trained_prompt_format_goes_to_peft_and_back(bases, tmp_path):
    """The format and system prompt a run trained with: a prompt_style.yaml beside the PEFT files (PEFT ignores
    it), which an import stores in the lit file again; --prompt_style / --system_prompt override it."""
    from lit_gpt.merge import resolve_prompt_style

    _, folder = bases["llama"]
    trained = {"prompt_style": "chatml", "system_prompt": "You are terse."}
    adapter = save_adapters(lit_lora(folder, ["query"]), tmp_path / "a.safetensors", prompt_style=trained)
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")
    assert yaml.safe_load((out / "prompt_style.yaml").read_text()) == trained
    back = import_peft_adapter(out, folder, tmp_path / "back.safetensors")
    style = resolve_prompt_style(folder, back)
    assert (style.name, style.system_prompt) == ("chatml", "You are terse.")
    other = import_peft_adapter(out, folder, tmp_path / "other.pth", prompt_style="alpaca")
    assert resolve_prompt_style(folder, other).name == "alpaca"
    other = import_peft_adapter(out, folder, tmp_path / "other2.pth", prompt_style="chatml", system_prompt="Hi.")
    assert resolve_prompt_style(folder, other).system_prompt == "Hi."
    (out / "prompt_style.yaml").unlink()
    with pytest.raises(ValueError, match=r"^--system_prompt needs --prompt_style"):
        import_peft_adapter(out, folder, tmp_path / "x.pth", system_prompt="Hi.")
    # an adapter without a recorded format exported into the same folder: the earlier export's file goes, or an
    # import would take chatml for this adapter's format
    export_peft_adapter(adapter, folder, out)
    plain = save_adapters(lit_lora(folder, ["query"], seed=3), tmp_path / "b.safetensors")
    export_peft_adapter(plain, folder, out)
    assert not (out / "prompt_style.yaml").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_of_export_gives_the_adapter_back(family, bases, tmp_path):
    _, folder = bases[family]
    adapter = save_adapters(lit_lora(folder, EXPORT_TARGETS[family]), tmp_path / "a.safetensors")
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")
    back = import_peft_adapter(out, folder, tmp_path / "back.safetensors")
    before, after = load_adapter_file(adapter), load_adapter_file(back)
    assert read_adapter_config(back).to_dict() == read_adapter_config(adapter).to_dict()
    assert sorted(after["state_dict"]) == sorted(before["state_dict"])
    for k, v in before["state_dict"].items():
        assert torch.equal(after["state_dict"][k], v), k


@pytest.mark.parametrize("case", ["gpt2", "gpt_neox_rslora"])
def test_export_of_import_gives_the_peft_tensors_back(case, bases, tmp_path):
    """A fused layer's one PEFT A (every slice shares it after the import) is written back as one A."""
    family, lora_config = IMPORT_CASES[case]
    base, folder = bases[family]
    _, peft_dir = save_peft(base, tmp_path, **lora_config)
    out = export_peft_adapter(import_peft_adapter(peft_dir, folder, tmp_path / "a.pth"), folder, tmp_path / "again")
    from safetensors.torch import load_file

    before, after = load_file(peft_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- (c) DoRA
DORA_TARGETS = {"llama": ["query", "value", "mlp"],
                "gpt2": ["query", "value"],  # c_attn: its key rows have no adapter, and keep their norm
                "gpt_neox": ["query", "key", "value", "projection"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dora_export_loads_in_peft_and_imports_back(family, bases, tmp_path):
    _, folder = bases[family]
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(method="lora", r=4, alpha=6.0, targets=DORA_TARGETS[family], dora=True))
    randomize_lora(model)
    adapter = save_adapters(model, tmp_path / "a.safetensors")
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    expected = logits(model)
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), expected, **TOL)
    back = import_peft_adapter(out, folder, tmp_path / "back.pth")
    assert read_adapter_config(back).dora
    torch.testing.assert_close(logits(load_finetuned(folder, back)), expected, **TOL)


@pytest.mark.parametrize("family, targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn"])])
def test_dora_import_computes_what_peft_computes(family, targets, bases, tmp_path):
    base, folder = bases[family]
    model, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                fan_in_fan_out=family == "gpt2")
    expected = logits(model)
    assert (expected - logits(base)).abs().max() > 1e-2
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.pth")
    assert read_adapter_config(adapter).dora
    assert any(k.endswith(".magnitude") for k in load_adapter_file(adapter)["state_dict"])
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)


# ---------------------------------------------------------------------------------------------- (d) refusals
@pytest.fixture
def llama_peft(bases, tmp_path):
    base, folder = bases["llama"]
    _, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    return peft_dir, folder


def edit_config(peft_dir: Path, **changes) -> None:
    path = peft_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, words", [
    (dict(use_dora=True), ["lora_magnitude_vector", "use_dora=true needs", "incomplete"]),  # LoRA that says DoRA
    (dict(bias="lora_only"), ["bias='lora_only'", "biases"]),
    # (modules_to_save imports: tests/test_peft_modules_to_save.py) a config naming tensors the folder lacks
    (dict(modules_to_save=["lm_head"]), ["modules_to_save", "has no base_model.model.lm_head.weight", "incomplete"]),
    (dict(peft_type="IA3"), ["IA3", "only LORA"]),
    (dict(init_lora_weights="pissa"), ["init_lora_weights='pissa'", "path_initial_model_for_weight_conversion"]),
    (dict(rank_pattern={"o_proj": 2}), ["rank 4", "r=2"]),
    (dict(target_modules=["q_proj", "v_proj"]), ["o_proj", "does not select", "ignore"]),
    (dict(target_modules=".*proj", layers_to_transform=[0]), ["layers_to_transform with a regular expression",
                                                              "PEFT refuses too"]),
    (dict(layers_to_transform=[0], layers_pattern="h"), ["does not select", "layers_to_transform or layers_pattern"]),
    (dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]), ["selects", "down_proj", "incomplete"]),
])
def test_import_refuses_in_one_sentence(changes, words, llama_peft, tmp_path):
    peft_dir, folder = llama_peft
    edit_config(peft_dir, **changes)
    with pytest.raises(ValueError) as e:
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")
    message = str(e.value)
    assert "adapter_config.json" in message or "adapter_model" in message, message
    assert all(w in message for w in words), message
    assert "\n" not in message and message.endswith("."), message
    assert not (tmp_path / "out.pth").exists()


def test_peft_weights_alone_as_adapter_path_say_what_is_missing(llama_peft, tmp_path):
    """chat, eval and merge --adapter_path read through read_finetuned: PEFT's weights file without its
    adapter_config.json was taken for full fine-tuning weights of another base model."""
    from lit_gpt.merge import read_finetuned

    peft_dir, folder = llama_peft
    alone = tmp_path / "alone" / "adapter_model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"holds the tensors of a Hugging Face PEFT adapter, without the "
                                         r"adapter_config\.json .* pass that folder as --adapter_path with "
                                         r"--checkpoint_dir"):
        read_finetuned(alone, folder)


def test_import_refuses_other_qkv_projections_in_other_blocks(bases, tmp_path):
    base, folder = bases["llama"]
    _, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8,
                            target_modules=r".*(layers\.0\.self_attn\.q_proj|layers\.1\.self_attn\.v_proj)")
    with pytest.raises(ValueError, match=r"adapts other query/key/value projections in block 0 than in block 1, "
                                         r"which lit_gpt's fused QKV layer cannot express"):
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")


@pytest.mark.parametrize("family, targets, names", [
    ("llama", ["query", "value", "mlp", "head"], ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj", "lm_head"]),
    ("gpt2", ["query", "value", "mlp"], ["c_attn", "c_fc", "mlp.c_proj"]),  # (GPT-2's head is tied: not adapted)
    # a layer outside the blocks, named in full: PEFT adapts it whatever layers_to_transform says
    ("llama", ["query", "transformer.h.0.attn.proj"], ["q_proj", "model.layers.0.self_attn.o_proj"]),
])
def test_export_of_some_blocks_writes_layers_to_transform(family, targets, names, bases, tmp_path):
    _, folder = bases[family]
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(method="lora", r=4, alpha=6.0, targets=targets, layers=[1]))
    randomize_lora(model)
    adapter = save_adapters(model, tmp_path / "a.safetensors")
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["layers_to_transform"]) == (names, [1])
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), logits(model), **TOL)
    back = read_adapter_config(import_peft_adapter(out, folder, tmp_path / "back.pth"))
    assert back.to_dict() == read_adapter_config(adapter).to_dict()


def test_import_refuses_pickle_and_another_base(llama_peft, bases, tmp_path):
    peft_dir, folder = llama_peft
    _, other = bases["gpt_neox"]
    with pytest.raises(ValueError, match=r"adapts 'model\.layers\.0\.self_attn\.o_proj', which the transformers"):
        import_peft_adapter(peft_dir, other, tmp_path / "out.pth")
    # same module names, other widths: the tensor is named
    wider_config = dict(FAMILIES["llama"], intermediate_size=40)
    del wider_config["model_type"]
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(**wider_config))
    _, peft_wide = save_peft(wider, tmp_path / "wide", r=4, lora_alpha=8, target_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"down_proj\.lora_A\.weight in .* has shape \[4, 40\], .* takes 48 inputs"):
        import_peft_adapter(peft_wide, folder, tmp_path / "out.pth")

    (peft_dir / "adapter_model.safetensors").rename(peft_dir / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle file.*safe_serialization=True"):
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")


@pytest.mark.parametrize("method", ["etherplus", "etherplusHH"])
def test_export_refuses_other_methods(method, bases, tmp_path):
    """ETHER and OFT export as PEFT's HRA and OFT (tests/test_peft_oft_hra.py); ETHER+ has no PEFT form."""
    _, folder = bases["llama"]
    model = GPT.from_checkpoint(folder)
    apply_adapters(model, AdapterConfig(method=method, nb=4, targets=["query", "value"]))
    adapter = save_adapters(model, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=f"holds {method} adapters, whose blocks .* not products of reflections.*"
                                         "merge_ether.py"):
        export_peft_adapter(adapter, folder, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_refuses_another_base(bases, tmp_path):
    _, llama = bases["llama"]
    _, neox = bases["gpt_neox"]
    adapter = save_adapters(lit_lora(llama, ["mlp"]), tmp_path / "a.pth")
    with pytest.raises(ValueError, match="trained on another base model"):
        export_peft_adapter(adapter, neox, tmp_path / "peft")


# ---------------------------------------------------------------------------------------------- (e) the CLI
def test_cli_import_then_merge_and_export(bases, tmp_path, capsys):
    base, folder = bases["llama"]
    model, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    expected = logits(model)
    script = load_script("convert_peft_adapter")
    adapter = tmp_path / "run" / "imported.pth"
    script.main(["import", "--peft_dir", str(peft_dir), "--checkpoint_dir", str(folder), "--adapter_path",
                 str(adapter), "--prompt_style", "alpaca"])
    assert load_adapter_file(adapter)["prompt_style"] == {"prompt_style": "alpaca", "system_prompt": None}

    merged = load_script("merge_lora").main(lora_path=adapter, checkpoint_dir=folder, out_dir=tmp_path / "merged")
    merged_model = GPT.from_checkpoint(merged).eval()
    assert not list(adapted_layers(merged_model))
    torch.testing.assert_close(logits(merged_model), expected, **TOL)

    script.main(["export", "--adapter_path", str(adapter), "--checkpoint_dir", str(folder), "--output_dir",
                 str(tmp_path / "peft_again")])
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), tmp_path / "peft_again")), expected,
                               **TOL)
    assert "merge_lora.py --lora_path" in capsys.readouterr().err


def test_cli_help_and_errors(llama_peft, tmp_path, capsys):
    peft_dir, folder = llama_peft
    edit_config(peft_dir, lora_bias=True)
    r = subprocess.run([sys.executable, "scripts/convert_peft_adapter.py", "import", "--peft_dir", str(peft_dir),
                        "--checkpoint_dir", str(folder), "--adapter_path", str(tmp_path / "a.pth")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "lora_bias" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    script = load_script("convert_peft_adapter")
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0 and "export  Write a lit LoRA, OFT or ETHER adapter" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        script.main(["imprt", "--peft_dir", "x"])
    assert e.value.code == 2 and "export or import (got 'imprt')" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- (f) PEFT folder as
# --adapter_path: chat, generate, eval and merge import it in memory, as `convert_peft_adapter.py import` would
@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """A llama base with a real (tiny BPE) tokenizer, for chat and generate: (transformers model, lit folder)."""
    import test_merge

    model = make_hf("llama", vocab_size=300, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("llama_tok") / "hf"
    model.save_pretrained(folder)
    convert_hf_checkpoint(folder)
    test_merge.write_tokenizer(folder)
    return model, folder


@pytest.fixture
def peft_and_import(llama_tok, tmp_path, capsys):
    """A PEFT LoRA folder with the prompt_style.yaml an export writes, and its two-step import (a lit file)."""
    base, folder = llama_tok
    model, peft_dir = save_peft(base, tmp_path, r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    (peft_dir / "prompt_style.yaml").write_text("prompt_style: chatml\nsystem_prompt: Be brief.\n")
    imported = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    capsys.readouterr()
    return model, peft_dir, imported, folder


NOTE = "Imported the PEFT LoRA adapter {!r} in memory (`python scripts/convert_peft_adapter.py import` writes it"


def test_a_peft_folder_loads_as_its_import_does(peft_and_import, capsys):
    """load_finetuned (chat, generate, eval) with the folder, or its adapter_model.safetensors, gives the logits of
    the imported file exactly, and PeftModel's; the prompt format is the folder's prompt_style.yaml."""
    from lit_gpt.lm_eval import load_eval_model
    from lit_gpt.merge import resolve_prompt_style

    model, peft_dir, imported, folder = peft_and_import
    expected = logits(load_finetuned(folder, imported))
    assert (expected - logits(GPT.from_checkpoint(folder).eval())).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(expected, logits(model), **TOL)
    for given in (peft_dir, peft_dir / "adapter_model.safetensors"):
        assert torch.equal(logits(load_finetuned(folder, given)), expected)
        assert NOTE.format(str(peft_dir)) in capsys.readouterr().err
    assert torch.equal(logits(load_eval_model(folder, peft_dir)), expected)
    style = resolve_prompt_style(folder, peft_dir)
    assert (style.name, style.system_prompt) == ("chatml", "Be brief.")
    (peft_dir / "prompt_style.yaml").unlink()
    resolve_prompt_style(folder, peft_dir)
    assert "does not record the prompt format it was trained with (no prompt_style.yaml" in capsys.readouterr().err


def test_chat_and_generate_take_a_peft_folder(peft_and_import, tmp_path, capsys, monkeypatch):
    _, peft_dir, imported, folder = peft_and_import
    generate = load_script("generate")
    answers = []
    for adapter in (peft_dir, imported):
        generate.main(checkpoint_dir=folder, adapter_path=adapter, prompt="Add two and three.", max_new_tokens=6,
                      temperature=0, device="cpu")
        answers.append(capsys.readouterr())
    assert answers[0].out == answers[1].out and answers[0].out.strip()
    assert NOTE.format(str(peft_dir)) in answers[0].err

    spec = importlib.util.spec_from_file_location("_chat_base", ROOT / "chat" / "base.py")
    chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat)
    (tmp_path / "messages.txt").write_text("Add two and three.\nWrite a response.\n")
    answers = []
    for adapter in (peft_dir, imported):
        with open(tmp_path / "messages.txt", encoding="utf-8") as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            chat.main(checkpoint_dir=folder, adapter_path=adapter, max_new_tokens=6, temperature=0, device="cpu")
        answers.append(capsys.readouterr())
    assert answers[0].out == answers[1].out and len(answers[0].out.splitlines()) == 2
    assert NOTE.format(str(peft_dir)) in answers[0].err


def test_merging_a_peft_folder_writes_what_merging_its_import_writes(peft_and_import, tmp_path, capsys):
    from lit_gpt.utils import load_file

    model, peft_dir, imported, folder = peft_and_import
    merge_lora = load_script("merge_lora")
    from_peft = merge_lora.main(lora_path=peft_dir, checkpoint_dir=folder, out_dir=tmp_path / "a")
    assert NOTE.format(str(peft_dir)) in capsys.readouterr().err
    from_file = merge_lora.main(lora_path=imported, checkpoint_dir=folder, out_dir=tmp_path / "b")
    a, b = load_file(from_peft / "lit_model.pth"), load_file(from_file / "lit_model.pth")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (from_peft / "prompt_style.yaml").read_text() == (from_file / "prompt_style.yaml").read_text()
    torch.testing.assert_close(logits(GPT.from_checkpoint(from_peft).eval()), logits(model), **TOL)
    # merge_ether.py is the same merge; its default output goes into the PEFT folder
    out = load_script("merge_ether").main(ether_path=peft_dir, checkpoint_dir=folder, probe=False)
    assert out == peft_dir / "merged" and (out / "lit_model.pth").is_file()
    # the merged checkpoint knows what it holds: the same folder on top of it again is refused
    with pytest.raises(ValueError, match="already has .* merged into it"):
        load_finetuned(from_peft, peft_dir)


def test_a_peft_folder_without_checkpoint_dir_asks_for_it(peft_and_import):
    from lit_gpt.merge import checkpoint_dir_for

    _, peft_dir, _, _ = peft_and_import
    expected = (rf"^'{re.escape(str(peft_dir))}' is a Hugging Face PEFT adapter, which records no lit base "
                r"checkpoint: pass --checkpoint_dir with the lit checkpoint converted \(scripts/convert_hf_checkpoint"
                r"\.py\) from the adapter's base model\.$")
    with pytest.raises(ValueError, match=expected):
        checkpoint_dir_for(None, peft_dir)  # chat, generate, eval
    with pytest.raises(ValueError, match=expected):
        load_script("merge_lora").main(lora_path=peft_dir)
    edit_config(peft_dir, base_model_name_or_path="org/tiny-llama")
    with pytest.raises(ValueError, match=r"base model \('org/tiny-llama', as its adapter_config\.json says\)\.$"):
        checkpoint_dir_for(None, peft_dir / "adapter_model.safetensors")


@pytest.mark.parametrize("changes, words", [
    (dict(lora_bias=True), ["lora_bias", "a bias on lora_B"]),
    (dict(modules_to_save=["lm_head"]), ["modules_to_save", "has no base_model.model.lm_head.weight"]),
])
def test_a_peft_folder_the_import_refuses_keeps_its_sentence(changes, words, peft_and_import, tmp_path):
    _, peft_dir, _, folder = peft_and_import
    edit_config(peft_dir, **changes)
    for run in (lambda: load_finetuned(folder, peft_dir),
                lambda: load_script("merge_lora").main(lora_path=peft_dir, checkpoint_dir=folder,
                                                       out_dir=tmp_path / "m")):
        with pytest.raises(ValueError) as e:
            run()
        message = str(e.value)
        assert "adapter_config.json" in message and all(w in message for w in words), message
        assert "\n" not in message and message.endswith("."), message
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- (g) the export names
# a base AutoPeftModelForCausalLM can load
def test_export_names_the_base_folder_its_message_asks_for(bases, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    _, folder = bases["llama"]  # converted from a local transformers folder: no Hub id
    model = lit_lora(folder, ["query", "value", "mlp"])
    adapter = save_adapters(model, tmp_path / "a.safetensors")
    script = load_script("convert_peft_adapter")
    monkeypatch.chdir(tmp_path)
    out = script.main(["export", "--adapter_path", str(adapter), "--checkpoint_dir", str(folder), "--output_dir",
                       "peft"])
    hf = str(tmp_path / "peft-base-hf")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == hf
    err = capsys.readouterr().err
    assert (f"names the base model {hf!r}: write it there with `python scripts/convert_lit_checkpoint.py "
            f"--checkpoint_dir {str(folder)!r} --output_dir {hf!r}`, then AutoPeftModelForCausalLM.from_pretrained("
            "'peft') loads the adapted model.") in err, err
    convert_lit_checkpoint(folder, Path(hf))
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained("peft", dtype=torch.float32, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded.eval()), logits(model), **TOL)

    script.main(["export", "--adapter_path", str(adapter), "--checkpoint_dir", str(folder), "--output_dir",
                 "peft2", "--base_model_name_or_path", "org/tiny-llama"])
    assert json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny-llama"
    err = capsys.readouterr().err
    assert "names the base model 'org/tiny-llama', onto which AutoPeftModelForCausalLM.from_pretrained('peft2')" \
        in err, err
    with pytest.raises(ValueError, match=r"^--base_model_name_or_path '' names no model: pass a Hub id"):
        export_peft_adapter(adapter, folder, tmp_path / "peft3", base_model_name_or_path="")
    # a local folder given relative to here is written absolute, so the adapter loads from any directory
    for given in ("peft-base-hf", "./peft-base-hf"):
        export_peft_adapter(adapter, folder, tmp_path / "peft4", base_model_name_or_path=given)
        assert json.loads((tmp_path / "peft4" / "adapter_config.json").read_text())["base_model_name_or_path"] == hf
    # and the default export, loaded onto the checkpoint it came from, is not taken for another base's adapter
    capsys.readouterr()
    load_finetuned(folder, tmp_path / "peft")
    assert "warning" not in capsys.readouterr().err
