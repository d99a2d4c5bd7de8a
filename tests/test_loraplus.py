"""LoRA+ (`finetune/lora.py --loraplus_lr_ratio`): the tensors PEFT's `create_loraplus_optimizer` gives the higher
rate get `--train.learning_rate` times the ratio, in a run and after a resume.

The tiny model, tokenizer and prepared data of the runs are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import copy
import csv
import warnings

import pytest
import torch
import transformers

from lit_gpt.adapters import AdapterConfig, apply_adapters
from lit_gpt.args import TrainArgs
from lit_gpt.training import loraplus_parameters, optimizer_groups, run_name, use_optimiser_flags
from lit_gpt.utils import load_file
from test_final_folder import train
from test_training import tiny_ckpt  # noqa: F401 (a fixture)


def test_the_higher_rate_goes_to_what_peft_gives_it():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32)
    hf = transformers.LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, modules_to_save=["norm"]))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_plus = sum(p.numel() for g in optimizer.param_groups if g["lr"] == 16e-3 for p in g["params"])
    ours = apply_adapters(hf, AdapterConfig(method="lora", r=2, targets=["q_proj", "v_proj", "down_proj"], dora=True,
                                            train_modules=["re:.*norm"]))  # (PEFT's "norm" selects every norm)
    assert sum(p.numel() for p in loraplus_parameters(ours)) == peft_plus > 0

    groups = optimizer_groups(ours, TrainArgs(learning_rate=1e-3), loraplus_lr_ratio=16)
    assert [g.get("lr") for g in groups] == [None, 16e-3]
    assert sum(p.numel() for p in groups[1]["params"]) == peft_plus
    assert len(optimizer_groups(ours, TrainArgs())) == 1  # unset: one rate
    # a resume's flags: the group of the higher rate by its tensors, whatever the checkpoint said
    adamw = torch.optim.AdamW(groups, lr=1e-3)
    use_optimiser_flags(adamw, TrainArgs(learning_rate=2e-3), {id(p) for p in loraplus_parameters(ours)}, 4)
    assert [g["lr"] for g in adamw.param_groups] == [2e-3, 8e-3]


def test_a_run_steps_b_at_the_higher_rate_and_resumes_with_it(tiny_ckpt, tmp_path, capsys):  # noqa: F811
    """AdamW's first step moves every tensor with a gradient by its rate (times the sign of the gradient): B by the
    ratio times what a plain run moves it; A, whose gradient is zero while B is, not at all."""
    def first_step(ratio, out):
        train("lora", out, tiny_ckpt, steps=1, lr=1e-3, lora_dropout=0.0, loraplus_lr_ratio=ratio)
        return load_file(out / "lit_model_lora_finetuned.pth")["state_dict"]

    plain, plus = first_step(None, tmp_path / "plain"), first_step(4, tmp_path / "plus")
    for key, value in plain.items():
        if key.endswith(".B"):
            torch.testing.assert_close(plus[key], 4 * value, rtol=1e-4, atol=1e-9)
            assert value.abs().max() > 0
        else:
            assert torch.equal(plus[key], value), key
    # a run without it resumed with it (one AdamW group in the checkpoint, two now)
    out = tmp_path / "resumed"
    train("lora", out, tiny_ckpt, steps=1, save_interval=1, lr=1e-3)
    capsys.readouterr()
    train("lora", out, tiny_ckpt, steps=2, save_interval=1, lr=1e-3, loraplus_lr_ratio=4, resume=True)
    assert "--loraplus_lr_ratio null -> 4" in capsys.readouterr().out
    with open(out / "logs" / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f) if row.get("loss")][-1] == "2"


@pytest.mark.parametrize("ratio", [0, -1.0, float("inf")])
def test_a_ratio_that_is_not_positive_is_one_sentence(ratio, tiny_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=rf"^--loraplus_lr_ratio {ratio}: pass a positive number \(the LoRA\+ paper's "
                                         r"and PEFT's suggestion is 16\), or leave it unset for one learning rate\.$"):
        train("lora", tmp_path / "run", tiny_ckpt, loraplus_lr_ratio=ratio)


def test_the_run_name_keeps_the_ratio_with_the_rates():
    """`--resume auto` offers a run that differs in its rates only (`other_runs`): the ratio sits with them."""
    config = AdapterConfig(method="lora")
    plain, plus = run_name("lora", config, TrainArgs()), run_name("lora", config, TrainArgs(), 16)
    assert plus == plain.replace("_bs", "-plus16_bs") and plus.rsplit("_lr", 1)[0] == plain.rsplit("_lr", 1)[0]
