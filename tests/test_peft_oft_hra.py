"""OFT (both ways) and ETHER as HRA (and back, where exact) between lit_gpt and HF PEFT
(`lit_gpt/adapters/peft_format.py`, `scripts/convert_peft_adapter.py`), checked against PEFT 0.21's own `PeftModel`
on small random transformers models: llama (split q/k/v, GQA), GPT-2 (`Conv1D` layers, which PEFT's OFT and HRA do
not wrap, and a `Linear` head) and GPT-NeoX (fused `query_key_value`), compared on float32 logits."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lit_gpt import GPT  # noqa: E402
from lit_gpt.adapters import AdapterConfig, adapted_layers, apply_adapters, read_adapter_config, save_adapters  # noqa
from lit_gpt.adapters.peft_format import export_peft_adapter, import_peft_adapter  # noqa: E402
from lit_gpt.adapters.state import load_adapter_file  # noqa: E402
from lit_gpt.merge import load_finetuned  # noqa: E402
import test_adapters  # noqa: E402
import test_peft_format as fmt  # noqa: E402
from test_peft_format import edit_config, hf_export, load_script, logits, peft_model  # noqa: E402

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors
quiet = fmt.quiet  # autouse: no warnings
bases = fmt.bases  # family -> (transformers model, its folder with the lit conversion), built once per module

TOL = dict(atol=2e-5, rtol=2e-5)


def randomize(model, seed: int = 1, scale: float = 0.3) -> None:
    """Random adapter tensors on a lit model (OFT starts at R = 0, the identity) or a PeftModel (oft_R, hra_u)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".adapters." in name or "oft_R" in name or "hra_u" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lit_adapted(folder: Path, **config) -> GPT:
    model = GPT.from_checkpoint(folder).eval()
    apply_adapters(model, AdapterConfig(**config))
    randomize(model)
    return model.eval()


def export_and_compare(bases, family: str, tmp_path: Path, **config) -> tuple[dict, Path, Path]:
    """Export a random lit adapter; PeftModel on the transformers export must compute the lit model's logits."""
    _, folder = bases[family]
    model = lit_adapted(folder, **config)
    adapter = save_adapters(model, tmp_path / "adapter.safetensors")
    out = export_peft_adapter(adapter, folder, tmp_path / "peft")
    expected = logits(model)
    assert (expected - logits(GPT.from_checkpoint(folder).eval())).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), expected, **TOL)
    return json.loads((out / "adapter_config.json").read_text()), adapter, out


def save_peft(base, tmp_path: Path, peft_config, seed: int = 2, scale: float = 0.3):
    """A PeftModel with random adapter weights on a copy of `base`, saved as PEFT saves it, and its logits."""
    model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    randomize(model, seed, scale)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    return logits(model.eval()), folder


LLAMA_ALL = ["query", "key", "value", "projection", "mlp", "head"]


# ---------------------------------------------------------------------------------------------- OFT export
OFT_EXPORTS = {
    # nb=4: blocks of 8 on the 32-wide inputs, of 12 on down_proj's 48: r=4, oft_block_size=0
    "exact_nb": (dict(nb=4, targets=LLAMA_ALL), dict(r=4, oft_block_size=0, use_cayley_neumann=False)),
    "upper_block_size": (dict(block_size=8, upper_triangle=True, targets=["query", "value", "mlp"]),
                         dict(r=0, oft_block_size=8, use_cayley_neumann=False)),
    "neumann3": (dict(nb=4, neumann_terms=3, targets=["query", "value"]),
                 dict(use_cayley_neumann=True, num_cayley_neumann_terms=5)),
    "neumann2": (dict(nb=2, neumann_terms=2, upper_triangle=True, targets=["key", "projection"]),
                 dict(use_cayley_neumann=True, num_cayley_neumann_terms=4)),
    "coft": (dict(nb=4, coft=True, eps=0.05, targets=["query", "value", "mlp"]), dict(coft=True, eps=0.1)),
    "layers": (dict(nb=4, targets=["query", "mlp"], layers=[0]), dict(layers_to_transform=[0])),
    "block_share": (dict(block_size=4, block_share=True, coft=True, eps=0.05, targets=["value", "head"]),
                    dict(block_share=True, oft_block_size=4, eps=0.05)),
}


@pytest.mark.parametrize("case", list(OFT_EXPORTS))
def test_oft_export_loads_in_peft_with_the_same_logits(case, bases, tmp_path):
    ours, expected_cfg = OFT_EXPORTS[case]
    cfg, _, out = export_and_compare(bases, "llama", tmp_path, method="oft", **ours)
    assert (cfg["peft_type"], cfg["bias"], cfg["peft_version"]) == ("OFT", "none", "0.18.0")
    for key, value in expected_cfg.items():
        assert cfg[key] == pytest.approx(value), key
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    assert all(k.endswith(".oft_R.weight") for k in tensors)


def test_oft_coft_export_binds_the_constraint(bases, tmp_path):
    """The COFT case above must clip: PEFT's radius eps/sqrt(r) is ours, and the random blocks are far outside it."""
    _, folder = bases["llama"]
    model = lit_adapted(folder, method="oft", nb=4, coft=True, eps=0.05, targets=["query"])
    t = next(layer for _, layer in adapted_layers(model)).adapters["query"].input
    S = (t.R - t.R.transpose(-1, -2)) / 2
    assert (torch.linalg.matrix_norm(S) > 0.05).all()


# ---------------------------------------------------------------------------------------------- HRA export
def test_ether_export_as_hra_with_the_same_logits(bases, tmp_path):
    cfg, adapter, out = export_and_compare(bases, "llama", tmp_path, method="ether", nb=4, targets=LLAMA_ALL)
    assert (cfg["peft_type"], cfg["r"], cfg["apply_GS"]) == ("HRA", 4, False)
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                             "up_proj", "v_proj"]
    from safetensors.torch import load_file

    u = load_file(out / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp.down_proj.hra_u"]
    assert u.shape == (48, 4)  # column b is u_b, zero outside block b
    assert torch.equal(u.ne(0).nonzero()[:, 1], torch.arange(48) // 12)


@pytest.mark.parametrize("method, dropouts, note", [
    ("ether", dict(dropout=0.1, block_dropout=0.2), "trained with dropout=0.1 on the layer input (--ether_dropout) "
     "and block dropout=0.2 (--block_dropout), which PEFT's HRA has no setting for: the export computes the same, "
     "but training it further in PEFT runs without them."),
    ("oft", dict(dropout=0.1, block_dropout=0.2), "trained with dropout=0.1 on the layer input (--ether_dropout), "
     "which PEFT's OFT has no setting for"),
    ("oft", dict(block_dropout=0.2), None),  # PEFT's module_dropout
])
def test_export_notes_the_dropout_peft_has_no_setting_for(method, dropouts, note, bases, tmp_path, capsys):
    cfg, _, _ = export_and_compare(bases, "llama", tmp_path, method=method, nb=4, targets=["query"], **dropouts)
    err = capsys.readouterr().err
    assert (note in err) if note else "note:" not in err, err
    assert cfg.get("module_dropout", 0.2) == 0.2


def test_hra_with_apply_gs_computes_the_same(bases, tmp_path):
    """Gram-Schmidt leaves the disjoint (orthogonal) vectors as they are: PEFT's apply_GS=True computes the same."""
    _, _, out = export_and_compare(bases, "llama", tmp_path, method="ether", nb=8, targets=["query", "value"])
    edit_config(out, apply_GS=True)
    _, folder = bases["llama"]
    model = lit_adapted(folder, method="ether", nb=8, targets=["query", "value"])
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), out)), logits(model), **TOL)


# ---------------------------------------------------------------------------------------------- import
OFT_IMPORTS = {
    "llama_exact": ("llama", dict(oft_block_size=8, use_cayley_neumann=False,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head"])),
    "llama_neumann5": ("llama", dict(r=4, oft_block_size=0, num_cayley_neumann_terms=5, module_dropout=0.1,
                                     target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])),
    "llama_neumann3": ("llama", dict(oft_block_size=4, num_cayley_neumann_terms=3, target_modules=["q_proj"],
                                     layers_to_transform=[1])),
    "llama_coft": ("llama", dict(r=4, oft_block_size=0, use_cayley_neumann=False, coft=True, eps=0.1,
                                 target_modules=["q_proj", "v_proj"])),
    "llama_share": ("llama", dict(oft_block_size=8, block_share=True, coft=True, eps=0.03,
                                  target_modules="all-linear")),
    # one rotation of the fused layer's input: query, key and value get the same blocks
    "gpt_neox": ("gpt_neox", dict(oft_block_size=8, use_cayley_neumann=False,
                                  target_modules=["query_key_value", "dense_4h_to_h"])),
}


@pytest.mark.parametrize("case", list(OFT_IMPORTS))
def test_oft_import_computes_what_peft_computes(case, bases, tmp_path):
    family, kw = OFT_IMPORTS[case]
    base, folder = bases[family]
    expected, peft_dir = save_peft(base, tmp_path, peft.OFTConfig(task_type="CAUSAL_LM", **kw))
    assert (expected - logits(base)).abs().max() > 1e-3
    adapter = import_peft_adapter(peft_dir, folder, tmp_path / "imported.safetensors")
    config = read_adapter_config(adapter)
    assert (config.method, config.upper_triangle, config.block_dropout) == ("oft", True, kw.get("module_dropout", 0))
    assert config.layers == kw.get("layers_to_transform")
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), expected, **TOL)


def test_hra_import_of_an_ether_export(bases, tmp_path):
    """GPT-NeoX: an HRA on the fused query_key_value, in ETHER's block form, is ETHER on query, key and value."""
    base, folder = bases["gpt_neox"]
    k, r = 8, 4
    hra = peft.HRAConfig(task_type="CAUSAL_LM", r=r, target_modules=["query_key_value", "dense"])
    model = peft.get_peft_model(copy.deepcopy(base), hra)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if "hra_u" in _:
                p.zero_()
                for b, j in enumerate(torch.randperm(r, generator=g).tolist()):  # any column order
                    p[b * k:(b + 1) * k, j] = torch.randn(k, generator=g)
    model.save_pretrained(tmp_path / "peft")
    adapter = import_peft_adapter(tmp_path / "peft", folder, tmp_path / "a.pth")
    config = read_adapter_config(adapter)
    assert (config.method, config.nb, config.targets) == ("ether", r, ["query", "key", "value", "projection"])
    torch.testing.assert_close(logits(load_finetuned(folder, adapter)), logits(model.eval()), **TOL)


@pytest.mark.parametrize("config, kind", [
    (dict(method="oft", nb=4, targets=["query", "value", "mlp"]), "OFT"),
    (dict(method="ether", nb=4, targets=LLAMA_ALL), "HRA"),
])
def test_an_oft_or_hra_folder_as_adapter_path_loads_and_merges_as_its_import(config, kind, bases, tmp_path, capsys):
    """chat, generate and eval (load_finetuned) and the merge scripts import a PEFT folder in memory."""
    _, folder = bases["llama"]
    model = lit_adapted(folder, **config)
    out = export_peft_adapter(save_adapters(model, tmp_path / "a.safetensors"), folder, tmp_path / "peft")
    imported = import_peft_adapter(out, folder, tmp_path / "back.safetensors")
    capsys.readouterr()
    expected = logits(load_finetuned(folder, imported))
    torch.testing.assert_close(expected, logits(model), **TOL)
    assert torch.equal(logits(load_finetuned(folder, out)), expected)
    assert f"Imported the PEFT {kind} adapter {str(out)!r} in memory" in capsys.readouterr().err
    merged = load_script("merge_ether").main(ether_path=out, checkpoint_dir=folder, out_dir=tmp_path / "merged")
    torch.testing.assert_close(logits(GPT.from_checkpoint(merged).eval()), expected, **TOL)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("config", [
    dict(method="oft", block_size=8, upper_triangle=True, targets=["query", "value", "mlp"]),
    dict(method="oft", nb=4, upper_triangle=True, neumann_terms=4, block_share=True, targets=["key", "head"]),
    dict(method="oft", nb=4, upper_triangle=True, coft=True, eps=0.05, targets=["projection"]),
    dict(method="ether", nb=4, targets=LLAMA_ALL),
], ids=["oft", "oft_neumann_share", "oft_coft", "ether"])
def test_import_of_export_gives_the_adapter_back(config, bases, tmp_path):
    _, folder = bases["llama"]
    adapter = save_adapters(lit_adapted(folder, **config), tmp_path / "a.safetensors")
    back = import_peft_adapter(export_peft_adapter(adapter, folder, tmp_path / "peft"), folder, tmp_path / "b.pth")
    before, after = read_adapter_config(adapter).to_dict(), read_adapter_config(back).to_dict()
    assert after.pop("eps") == pytest.approx(before.pop("eps"), rel=1e-6)  # PEFT's radius is a float32
    assert after == before
    before, after = load_adapter_file(adapter)["state_dict"], load_adapter_file(back)["state_dict"]
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_full_r_oft_round_trip_gives_the_same_logits(bases, tmp_path):
    """Full R blocks come back as the strict upper triangle of 2 S: other tensors, the same rotations."""
    _, folder = bases["llama"]
    model = lit_adapted(folder, method="oft", nb=4, targets=["query", "value"])
    adapter = save_adapters(model, tmp_path / "a.pth")
    back = import_peft_adapter(export_peft_adapter(adapter, folder, tmp_path / "peft"), folder, tmp_path / "b.pth")
    assert read_adapter_config(back).upper_triangle
    torch.testing.assert_close(logits(load_finetuned(folder, back)), logits(model), **TOL)


@pytest.mark.parametrize("case", ["gpt_neox", "llama_neumann5"])
def test_export_of_oft_import_gives_the_peft_tensors_back(case, bases, tmp_path):
    family, kw = OFT_IMPORTS[case]
    base, folder = bases[family]
    _, peft_dir = save_peft(base, tmp_path, peft.OFTConfig(task_type="CAUSAL_LM", **kw))
    out = export_peft_adapter(import_peft_adapter(peft_dir, folder, tmp_path / "a.pth"), folder, tmp_path / "again")
    from safetensors.torch import load_file

    before, after = load_file(peft_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ---------------------------------------------------------------------------------------------- refusals
def one_sentence(message: str) -> str:
    assert "\n" not in message and message.endswith("."), message
    return message


EXPORT_REFUSALS = {
    "etherplus": ("llama", dict(method="etherplus", nb=4), ["etherplus", "not products of reflections",
                                                            "merge_ether.py"]),
    "etherplusHH": ("llama", dict(method="etherplusHH", nb=4), ["etherplusHH", "merge_ether.py"]),
    "oft_flip_side": ("llama", dict(method="oft", nb=4, flip_side=True), ["flip_side=True", "OFT", "input"]),
    "ether_flip_side": ("llama", dict(method="ether", nb=4, flip_side=True), ["flip_side=True", "HRA", "input"]),
    "gpt2_conv1d": ("gpt2", dict(method="oft", nb=4), ["'transformer.h.0.attn.c_attn'", "Conv1D", "Linear"]),
    "gpt2_conv1d_mlp": ("gpt2", dict(method="ether", nb=4, targets=["mlp"]), ["'transformer.h.0.mlp.c_fc'", "HRA"]),
    "neox_fused": ("gpt_neox", dict(method="ether", nb=4), ["query/key/value", "'gpt_neox.layers.0.attention."
                                                            "query_key_value'", "equal transforms"]),
    "neumann1": ("llama", dict(method="oft", nb=4, neumann_terms=1), ["neumann_terms=1", "num_cayley_neumann"]),
    "hra_mixed_nb": ("llama", dict(method="ether", block_size=8, targets=["query", "mlp"]),
                     ["nb (blocks) 4", "6", "HRA r", "nb instead of block_size"]),
    "coft_mixed_nb": ("llama", dict(method="oft", block_size=8, coft=True, targets=["query", "mlp"]),
                      ["COFT radius", "nb (not block_size)"]),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refuses_in_one_sentence(case, bases, tmp_path):
    family, config, words = EXPORT_REFUSALS[case]
    _, folder = bases[family]
    model = GPT.from_checkpoint(folder)
    apply_adapters(model, AdapterConfig(**config))
    adapter = save_adapters(model, tmp_path / "a.pth")
    with pytest.raises(ValueError) as e:
        export_peft_adapter(adapter, folder, tmp_path / "peft")
    message = one_sentence(str(e.value))
    assert "a.pth" in message and all(w in message for w in words), message
    assert not (tmp_path / "peft" / "adapter_config.json").exists()


@pytest.fixture
def llama_oft(bases, tmp_path):
    base, folder = bases["llama"]
    _, peft_dir = save_peft(base, tmp_path, peft.OFTConfig(task_type="CAUSAL_LM", oft_block_size=8,
                                                           target_modules=["q_proj", "v_proj"]))
    return peft_dir, folder


@pytest.mark.parametrize("changes, words", [
    (dict(num_cayley_neumann_terms=2), ["num_cayley_neumann_terms=2", "I + 2Q"]),
    (dict(peft_version="0.17.1"), ["0.17.1", "0.18"]),
    (dict(peft_version=None), ["no peft_version", "0.18"]),
    (dict(bias="oft_only"), ["bias='oft_only'", "biases", "OFT"]),
    (dict(modules_to_save=["lm_head"]), ["modules_to_save", "OFT"]),
    (dict(r=4), ["exactly one of r and oft_block_size"]),
    (dict(oft_block_size=None), ["oft_block_size", "0.14"]),
    (dict(peft_type="BOFT"), ["BOFT", "LORA, OFT and HRA"]),
])
def test_oft_import_refuses_in_one_sentence(changes, words, llama_oft, tmp_path):
    peft_dir, folder = llama_oft
    if changes.get("oft_block_size", 0) is None:
        path = peft_dir / "adapter_config.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "oft_block_size"}))
    else:
        edit_config(peft_dir, **changes)
    with pytest.raises(ValueError) as e:
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")
    message = one_sentence(str(e.value))
    assert "adapter_config.json" in message and all(w in message for w in words), message
    assert not (tmp_path / "out.pth").exists()


def test_hra_import_refuses_full_width_reflections(bases, tmp_path):
    """What PEFT trains: dense vectors, whose product no block-diagonal ETHER equals."""
    base, folder = bases["llama"]
    _, peft_dir = save_peft(base, tmp_path, peft.HRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError) as e:
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")
    message = one_sentence(str(e.value))
    assert all(w in message for w in ["hra_u", "vector 0 is nonzero in blocks 0 and 1", "merge_and_unload"]), message
    # r not dividing the width: no equal blocks
    _, peft_dir = save_peft(base, tmp_path / "r5", peft.HRAConfig(task_type="CAUSAL_LM", r=5,
                                                                  target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"r=5 vectors for 32 inputs, which ETHER cannot split"):
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")


def test_import_refuses_gpt2_tied_head(bases, tmp_path):
    """PEFT's OFT wraps GPT-2's lm_head (a Linear; the rest are Conv1D), whose weight is the token embedding's."""
    base, folder = bases["gpt2"]
    _, peft_dir = save_peft(base, tmp_path, peft.OFTConfig(task_type="CAUSAL_LM", oft_block_size=8,
                                                           target_modules=["lm_head"]))
    with pytest.raises(ValueError) as e:
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")
    message = one_sentence(str(e.value))
    assert all(w in message for w in ["'lm_head'", "ties to the token embeddings", "retrain without it"]), message


def test_import_checks_the_head_copy_peft_saves(bases, tmp_path):
    """With lm_head in target_modules PEFT saves the base head too (and loads it back): it must be the base's."""
    base, folder = bases["llama"]
    _, peft_dir = save_peft(base, tmp_path, peft.OFTConfig(task_type="CAUSAL_LM", oft_block_size=8,
                                                           target_modules=["lm_head"]))
    from safetensors.torch import load_file, save_file

    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    tensors["base_model.model.lm_head.base_layer.weight"] += 1.0
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as e:
        import_peft_adapter(peft_dir, folder, tmp_path / "out.pth")
    message = one_sentence(str(e.value))
    assert all(w in message for w in ["lm_head.base_layer.weight", "differs from the head"]), message


def test_oft_import_refuses_another_base(llama_oft, bases, tmp_path):
    peft_dir, _ = llama_oft
    _, neox = bases["gpt_neox"]
    with pytest.raises(ValueError, match=r"adapts 'model\.layers\.0\.self_attn\.q_proj', which the transformers"):
        import_peft_adapter(peft_dir, neox, tmp_path / "out.pth")


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_exports_oft_and_says_so_in_help(bases, tmp_path, capsys):
    _, folder = bases["llama"]
    model = lit_adapted(folder, method="oft", nb=4, targets=["query", "value"])
    adapter = save_adapters(model, tmp_path / "a.pth")
    script = load_script("convert_peft_adapter")
    script.main(["export", "--adapter_path", str(adapter), "--checkpoint_dir", str(folder), "--output_dir",
                 str(tmp_path / "peft")])
    torch.testing.assert_close(logits(peft_model(hf_export(folder, tmp_path), tmp_path / "peft")), logits(model),
                               **TOL)
    # the next step it prints runs as pasted
    hint = re.search(r"`python scripts/convert_lit_checkpoint\.py ([^`]*)`", capsys.readouterr().err)
    from lit_gpt.cli import run_cli

    run_cli(load_script("convert_lit_checkpoint").main, args=shlex.split(hint.group(1)))
    assert (tmp_path / "peft-base-hf" / "config.json").is_file()
    script.main(["import", "--peft_dir", str(tmp_path / "peft"), "--checkpoint_dir", str(folder), "--adapter_path",
                 str(tmp_path / "back.pth")])
    assert "merge_ether.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    assert all(w in text for w in ["OFT", "HRA", "ETHER"]), text


def test_a_re_export_stopped_part_way_leaves_the_earlier_export_whole(bases, tmp_path, monkeypatch):
    """The prompt_style.yaml of an earlier export in the folder was deleted before the new export's files were
    written: a re-export stopped part way left the earlier adapter without its prompt format."""
    import safetensors.torch

    _, folder = bases["llama"]
    first = save_adapters(lit_adapted(folder, method="oft", nb=4, targets=["query"]), tmp_path / "a.safetensors",
                          prompt_style={"prompt_style": "alpaca", "system_prompt": None})
    out = export_peft_adapter(first, folder, tmp_path / "peft")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "prompt_style.yaml" in before
    second = save_adapters(lit_adapted(folder, method="ether", nb=4, targets=["value"]), tmp_path / "b.safetensors",
                           prompt_style={"prompt_style": "chatml", "system_prompt": "Be brief."})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_peft_adapter(second, folder, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    export_peft_adapter(second, folder, out)
    assert "chatml" in (out / "prompt_style.yaml").read_text()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "HRA"
