"""`AdapterConfig.layers` (PEFT's `layers_to_transform`; `--lora_layers` / `--ether_layers`): only the targets inside
the given transformer blocks take adapters, on a `lit_gpt.GPT` and on any model, the block read from a module's name
as PEFT reads it. The PEFT round trips are in `test_peft_format.py`.

The tiny model, tokenizer and prepared data of the run are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import re

import pytest
import torch
import transformers

from lit_gpt import GPT
from lit_gpt.adapters import (
    AdapterConfig, adapted_layers, adapter_config_of, apply_adapters, load_adapters, merge_adapters, plan_report,
    save_adapters,
)
from lit_gpt.adapters.base import block_index
from lit_gpt.training import layers_from_flag, run_name, targets_from_flags
from lit_gpt.args import TrainArgs
from lit_gpt.utils import load_file
from test_adapters import randomize_adapters, tiny_config
from test_final_folder import train
from test_training import tiny_ckpt  # noqa: F401 (a fixture)


def names(model) -> list[str]:
    return [n for n, _ in adapted_layers(model)]


def test_block_index_is_pefts():
    # PEFT's rule without layers_pattern: the first number between dots after the first name
    assert block_index("model.layers.3.mlp.experts.0.up_proj") == 3
    assert block_index("transformer.h.12.attn.qkv") == 12
    assert block_index("lm_head") is None and block_index("0.weight") is None and block_index("body.0") is None


@pytest.mark.parametrize("method, opts", [("lora", {"r": 2}), ("etherplusHH", {"nb": 2}), ("oft", {"nb": 4})])
def test_only_the_blocks_given_are_adapted_and_the_file_rebuilds_them(method, opts, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(n_layer=3)
    model = apply_adapters(GPT(config), AdapterConfig(method=method, targets=["query", "mlp"], layers=[2, 0], **opts))
    assert names(model) == [f"transformer.h.{i}.{m}" for i in (0, 2) for m in ("attn.qkv", "mlp.fc_1", "mlp.fc_2",
                                                                               "mlp.proj")]
    randomize_adapters(model)
    x = torch.randint(0, config.vocab_size, (1, 8))
    expected = model.eval()(x)
    path = save_adapters(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    again = load_adapters(GPT(config), path).eval()  # the file's config puts the adapters where they were
    assert names(again) == names(model) and adapter_config_of(again).layers == [0, 2]
    torch.testing.assert_close(again(x), expected)
    torch.testing.assert_close(merge_adapters(again)(x), expected, atol=1e-5, rtol=1e-5)


def test_a_file_for_other_blocks_names_them(tmp_path):
    saved = apply_adapters(GPT(tiny_config()), AdapterConfig(method="lora", layers=[0]))
    path = save_adapters(saved, tmp_path / "a.pth")
    model = apply_adapters(GPT(tiny_config()), AdapterConfig(method="lora", layers=[1]))
    with pytest.raises(ValueError, match=r"trained with other targets or blocks, or on another base model \(it says "
                                         r".*targets \['query', 'value'\] in block 0; this model has targets "
                                         r"\['query', 'value'\] in block 1\)\.$"):
        load_adapters(model, path)


def test_any_model_by_pefts_block_numbers():
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=32)
    hf = transformers.LlamaForCausalLM(cfg)
    apply_adapters(hf, AdapterConfig(method="lora", targets=["q_proj", "down_proj"], layers=[1]))
    assert names(hf) == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_a_layer_named_in_full_is_adapted_whatever_the_blocks():
    """As PEFT adapts a module target_modules names exactly: the head (in no block), a full name in another block."""
    model = apply_adapters(GPT(tiny_config(n_layer=3)), AdapterConfig(
        method="lora", targets=["query", "head", "transformer.h.0.attn.proj", "mlp.proj"], layers=[2]))
    assert sorted(names(model)) == ["lm_head", "transformer.h.0.attn.proj", "transformer.h.2.attn.qkv",
                                    "transformer.h.2.mlp.proj"]


@pytest.mark.parametrize("targets, layers, message", [
    (["query"], [3, 4], r"^layers 3-4: the model has blocks 0-1, so blocks 3-4 do not exist: pass indices from 0 to "
                        r"1\.$"),
    (["transformer.h.1.*"], [0], r"^The adapter target 'transformer\.h\.1\.\*' selects layers only in block 1, so "
                                 r"layers 0 leaves none of them: drop it from the targets, or change layers\.$"),
])
def test_blocks_that_leave_a_target_empty_are_one_sentence(targets, layers, message):
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=message):
        apply_adapters(model, AdapterConfig(method="lora", targets=targets, layers=layers))
    assert names(model) == []
    with pytest.raises(ValueError, match=r"^layers 0: the model has no numbered blocks .*: leave layers unset\.$"):
        apply_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2)), AdapterConfig(method="lora", targets=["0"],
                                                                               layers=[0]))


@pytest.mark.parametrize("layers", [[], [-1], [True], "0", [0.5]])
def test_bad_layers_values_are_one_sentence(layers):  # (the flag's sentence says "leave it unset" for None)
    with pytest.raises(ValueError, match=r"^layers must be a non-empty list of block indices \(integers from 0\), or "
                                         r"None for every block, got .*\.$"):
        AdapterConfig(layers=layers)


def test_the_flag_takes_indices_ranges_and_lists():
    assert layers_from_flag("0-2, 5,1", "--lora_layers") == [0, 1, 2, 5]
    assert layers_from_flag(7, "--lora_layers") == [7] and layers_from_flag([3, 1], "--lora_layers") == [1, 3]
    assert layers_from_flag(None, "--lora_layers") is None
    for bad in ("3-1", " ", "a", "-1", [True]):
        with pytest.raises(ValueError, match=r"^--ether_layers .*: pass indices from 0 and inclusive ranges separated "
                                             r"by commas \(e\.g\. --ether_layers 0-3,8\), or leave it unset"):
            layers_from_flag(bad, "--ether_layers")
    with pytest.raises(ValueError, match=r"^--ether_layers 0-1000000000: block 1000000000 is past the blocks of any "
                                         r"model"):  # at once, without building the range
        layers_from_flag("0-1000000000", "--ether_layers")
    config = AdapterConfig(method="lora", layers=[5, 0, 1, 2, 1])
    assert config.layers == [0, 1, 2, 5] and "targets query, value in blocks 0-2,5)" in config.describe()
    assert "_layers0-2.5_" in run_name("lora", config, TrainArgs())


def test_the_targets_flag_takes_module_names_and_patterns_too():
    pattern = r"re:transformer\.h\.\d{1,2}\.attn\.proj"  # (its comma is not a separator)
    targets = targets_from_flags("lora", f"mlp.proj,value,{pattern},q_proj")
    assert targets == ["query", "value", "mlp.proj", pattern]
    name = run_name("lora", AdapterConfig(method="lora", targets=targets), TrainArgs())
    assert "_query-value-mlp.proj-re" in name and not set("\\/*{}:") & set(name)
    per_layer = 8 * (4096 + 4096) + 8 * (11008 + 4096)  # LoRA r 8 on q and on the MLP's down projection
    assert f"trainable parameters: {32 * per_layer:,}\n" in plan_report(
        "Llama-2-7b-hf", AdapterConfig(method="lora", r=8, targets=targets_from_flags("lora", "query,mlp.proj")))
    with pytest.raises(ValueError, match=r"^--lora_targets: 'quary' is not a layer name here: .*, module names such "
                                         r"as attn\.proj or mlp\.gate, or 're:<regex>' patterns\.$"):
        targets_from_flags("lora", "query,quary")


def test_dry_run_counts_the_blocks_given():
    assert "trainable parameters: 2,097,152\n" in plan_report(  # half of the table's 4,194,304
        "Llama-2-7b-hf", AdapterConfig(method="lora", r=8, layers=list(range(16))), "bf16-true")
    assert "trainable parameters: 32,768\n" in plan_report(  # a 32nd of the table's 1,048,576
        "Llama-2-7b-hf", AdapterConfig(method="etherplusHH", nb=32, layers=[31]), "bf16-true")


def test_a_run_adapts_its_blocks_and_merges(tiny_ckpt, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    train("lora", out, tiny_ckpt, lora_targets="all-linear", lora_layers="1", merge=True)
    assert "targets query, key, value, projection, mlp in block 1" in capsys.readouterr().out
    saved = load_file(out / "lit_model_lora_finetuned.pth")
    assert saved["adapter_config"]["layers"] == [1]
    assert {re.match(r"transformer\.h\.(\d+)\.", k).group(1) for k in saved["state_dict"]} == {"1"}
    assert (out / "merged" / "lit_model.pth").is_file()
