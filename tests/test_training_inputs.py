"""What the training entrypoints do with bad or surprising input: the run directory records what merge/chat need,
--resume refuses a checkpoint of another run, numbers and directories are checked before a model loads, data made
for another tokenizer is refused, NaN/inf never reaches a file, and logs/metrics.csv survives kills and resumes.

The tiny model, tokenizer and prepared data are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT, Config
from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.utils import load_file
from test_training import REPO, common_flags, run_cli, tiny_ckpt  # noqa: F401 (tiny_ckpt is a fixture)


def csv_rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def setup_ether(data_dir: Path, out_dir: Path, ckpt: "Path | None" = None, train: "dict | None" = None,
                eval: "dict | None" = None, **kwargs):
    import ether

    t = dict(learning_rate=1e-2, max_steps=1, global_batch_size=1, micro_batch_size=1, lr_warmup_steps=1)
    e = dict(interval=0, max_iters=1, max_new_tokens=0)
    kwargs = dict(dict(ether_nb=4, precision="32-true"), **kwargs)
    return ether.setup(io=IOArgs(train_data_dir=data_dir, checkpoint_dir=ckpt, out_dir=out_dir),
                       train=TrainArgs(**dict(t, **(train or {}))), eval=EvalArgs(**dict(e, **(eval or {}))), **kwargs)


# ---------------------------------------------------------------------------------------------- a finished run
@pytest.fixture(scope="module")
def finished_run(tiny_ckpt, tmp_path_factory) -> Path:
    """Three steps of ETHER through the CLI, with the data and checkpoint given as paths relative to the repo."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    rel_data = os.path.relpath(tiny_ckpt / "data", REPO)
    r = run_cli("ether.py", *common_flags(tiny_ckpt, out, 3, **{"--io.train_data_dir": rel_data,
                                                                "--io.checkpoint_dir": os.path.relpath(tiny_ckpt, REPO),
                                                                "--train.global_batch_size": "1"}),
                "--ether_nb", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_hyperparameters_record_the_absolute_base_the_prompt_style_and_only_flags(finished_run, tiny_ckpt):
    text = (finished_run / "hyperparameters.yaml").read_text()
    hp = yaml.safe_load(text)
    assert hp["base_checkpoint_dir"] == str(tiny_ckpt.resolve())  # merge/chat work from any directory
    assert hp["io"]["checkpoint_dir"] == os.path.relpath(tiny_ckpt, REPO)  # as the user gave it
    assert hp["prompt_style"] == {"prompt_style": "alpaca", "system_prompt": None}
    assert "AdapterConfig" not in hp and "<class" not in text
    assert hp["adapter_config"]["nb"] == 4 and hp["method"] == "ether"
    # and the adapter file, for when it is copied away from the run (merge and chat read it there)
    assert load_file(finished_run / "lit_model_ether_finetuned.pth")["prompt_style"] == hp["prompt_style"]


def test_the_logged_lr_is_the_one_each_step_used_and_the_last_step_is_checkpointed(finished_run):
    from lit_gpt.training import lr_lambda

    rows = [r for r in csv_rows(finished_run) if r["loss"]]
    schedule = lr_lambda(warmup_steps=2, max_steps=3, min_ratio=0.0)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:  # step k trains with the scheduler's value for index k - 1
        assert float(r["lr"]) == pytest.approx(1e-3 * schedule(int(r["step"]) - 1))
    assert float(rows[-1]["lr"]) > 0
    assert (finished_run / "checkpoints" / "step-000003.pth").is_file()


def test_the_schedule_is_linear_warm_up_then_cosine_to_min_lr():
    """The numbers written out (2 warm-up steps, 10 steps, min_lr a tenth of the rate), not the code's own formula:
    step k (index k - 1) warms up to (k)/(warmup + 1) of the rate, then the cosine falls to min_lr at the end."""
    from lit_gpt.training import lr_lambda

    f = lr_lambda(warmup_steps=2, max_steps=10, min_ratio=0.1)
    expected = {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)), 10: 0.1}
    assert {i: f(i) for i in expected} == pytest.approx(expected)
    assert f(9) > 0.1 and f(12) == pytest.approx(0.1)  # (a resumed run past its end stays at min_lr)


def test_the_logged_loss_is_the_mean_over_the_micro_batches(tiny_ckpt, tmp_path):
    """Four identical examples in a step of four micro-batches: the logged loss of step 1 is the base model's loss
    on one of them (a sum over the micro-batches would log four times it)."""
    import prepare_json

    from lit_gpt import GPT

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 8))
    data = tmp_path / "same"
    prepare_json.prepare(json_path=rows, destination_path=data, checkpoint_dir=tiny_ckpt, max_seq_length=64,
                         test_split_fraction=0.25)
    sample = torch.load(data / "train.pt", weights_only=True)[0]
    with torch.no_grad():
        base = float(GPT.from_checkpoint(tiny_ckpt)(sample["input_ids"][None], labels=sample["labels"][None]))
    # (ETHER+ starts as the identity, so step 1's loss is the base model's)
    setup_ether(data, tmp_path / "run", ckpt=tiny_ckpt, train=dict(max_steps=1, global_batch_size=4),
                Htype="etherplus")
    assert float(csv_rows(tmp_path / "run")[0]["loss"]) == pytest.approx(base, rel=1e-5)


def test_resume_refuses_another_run_and_keeps_the_run_dir(finished_run, tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    hparams = (run / "hyperparameters.yaml").read_bytes()
    metrics = (run / "logs" / "metrics.csv").read_bytes()
    step3 = run / "checkpoints" / "step-000003.pth"
    saved = load_file(step3, mmap=False)
    assert saved["method"] == "ether" and saved["adapter_config"]["nb"] == 4

    flags = common_flags(tiny_ckpt, run, 3, **{"--train.global_batch_size": "1"})
    r = run_cli("ether.py", *flags, "--ether_nb", "8", "--resume", "auto")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "nb was 4, now 8 (--ether_nb)" in last and str(step3) in last
    assert (run / "hyperparameters.yaml").read_bytes() == hparams  # a rejected resume rewrites nothing

    r = run_cli("lora.py", *common_flags(tiny_ckpt, tmp_path / "lora", 3), "--resume", str(step3))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "checkpoint of method 'ether', but this run trains 'lora'" in r.stderr.strip().splitlines()[-1]

    # `true` means `auto`; a finished run says so and touches nothing
    r = run_cli("ether.py", *flags, "--ether_nb", "4", "--resume", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished" in r.stdout
    assert (run / "logs" / "metrics.csv").read_bytes() == metrics
    assert (run / "hyperparameters.yaml").read_bytes() == hparams

    # training on: the rows of steps 1-3 are kept (Lightning's CSVLogger deleted them), 4 and 5 appended
    before = csv_rows(run)
    flags = common_flags(tiny_ckpt, run, 5, **{"--train.global_batch_size": "1"})
    r = run_cli("ether.py", *flags, "--ether_nb", "4", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resumed from {step3} at step 3" in r.stdout
    after = csv_rows(run)
    assert [row["loss"] for row in after[: len(before)]] == [row["loss"] for row in before]
    assert [int(row["step"]) for row in after if row["loss"]] == [1, 2, 3, 4, 5]


def test_resume_flag_values_and_paths(tmp_path):
    from lit_gpt.training import normalize_resume, resolve_resume

    assert normalize_resume(True) == normalize_resume("auto") == normalize_resume("true") == "auto"
    assert normalize_resume(False) is None and normalize_resume("false") is None and normalize_resume(None) is None
    assert normalize_resume("out/checkpoints/step-000004.pth") == Path("out/checkpoints/step-000004.pth")
    with pytest.raises(FileNotFoundError, match="--resume '.*nope.pth' does not exist: pass a checkpoints/step"):
        resolve_resume(tmp_path / "nope.pth", tmp_path)
    with pytest.raises(ValueError, match="is a directory: pass one of its checkpoints/step-\\*.pth files"):
        resolve_resume(tmp_path, tmp_path)


def test_loading_a_checkpoint_with_other_trainable_tensors_is_refused():
    from lit_gpt.adapters import AdapterConfig, adapter_state_dict, apply_adapters
    from lit_gpt.training import check_trainable_keys

    cfg = Config(name="t", n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    ether = apply_adapters(GPT(cfg), AdapterConfig(method="ether", nb=4))
    lora = apply_adapters(GPT(cfg), AdapterConfig(method="lora", r=2))
    check_trainable_keys(ether, adapter_state_dict(ether), Path("ok.pth"))
    with pytest.raises(ValueError, match=r"--resume 'x.pth' lacks 2 trainable tensor\(s\) of this run .* and holds "
                                         r"4 this run does not train"):
        check_trainable_keys(ether, adapter_state_dict(lora), Path("x.pth"))


# ---------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("group,field,value,flag", [
    ("train", "save_interval", 0, "--train.save_interval 0"),
    ("train", "log_interval", 0, "--train.log_interval 0"),
    ("train", "micro_batch_size", 0, "--train.micro_batch_size 0"),
    ("train", "global_batch_size", 0, "--train.global_batch_size 0"),
    ("train", "learning_rate", 0.0, "--train.learning_rate 0.0"),
    ("train", "max_steps", -1, "--train.max_steps -1"),
    ("train", "max_steps", 0, "--train.max_steps 0"),
    ("train", "epochs", 0, "--train.epochs 0"),
    ("train", "lr_warmup_steps", -5, "--train.lr_warmup_steps -5"),
    ("train", "min_lr", 1.0, "--train.min_lr 1.0"),
    ("train", "beta2", 1.0, "--train.beta2 1.0"),
    ("train", "max_norm", -1.0, "--train.max_norm -1.0"),
    ("train", "weight_decay", float("nan"), "--train.weight_decay nan"),
    ("eval", "max_iters", -1, "--eval.max_iters -1"),
    ("run", "num_nodes", 0, "--num_nodes 0"),
    ("run", "seed", -1, "--seed -1"),
    ("run", "devices", 0, "--devices 0"),
])
def test_bad_numbers_fail_naming_the_flag_before_anything_loads(tiny_ckpt, tmp_path, monkeypatch, group, field,
                                                                 value, flag):
    from lit_gpt import training

    def no_model(*args, **kwargs):
        raise AssertionError("no model may load before the numbers are checked")

    monkeypatch.setattr(training, "load_model_weights", no_model)
    kwargs = {"train": {field: value}} if group == "train" else {"eval": {field: value}} if group == "eval" else {
        field: value}
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")) as e:
        setup_ether(tmp_path / "no-data", tmp_path / "out", **kwargs)  # checked even before the data directory
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_batch_size_that_does_not_divide_names_devices_and_nodes():
    from lit_gpt.training import check_numbers

    train = TrainArgs(global_batch_size=8, micro_batch_size=8)
    check_numbers(train, EvalArgs(), 1, 1, this_machine=False)
    with pytest.raises(ValueError) as e:
        check_numbers(train, EvalArgs(), 1, 2, this_machine=False)
    assert str(e.value) == ("--train.global_batch_size 8 must be a multiple of --train.micro_batch_size × "
                            "--devices × --num_nodes = 8 × 1 × 2 = 16.")
    with pytest.raises(ValueError, match=r"multiple of --train.micro_batch_size × --devices = 4 × 3 = 12\.$"):
        check_numbers(TrainArgs(global_batch_size=16, micro_batch_size=4), EvalArgs(), 3, 1, this_machine=False)


def test_oft_eps_without_coft_and_a_tied_head_name_their_flags(tiny_ckpt, tmp_path):
    from lit_gpt.adapters import AdapterConfig
    from lit_gpt.training import check_tied_head

    with pytest.raises(ValueError, match="--oft_eps 0.1 only applies to constrained OFT: add --oft_coft true"):
        setup_ether(tiny_ckpt / "data", tmp_path / "out", Htype="oft", oft_eps=0.1)
    tied = Config(name="tied", n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16, tie_embeddings=True)
    with pytest.raises(ValueError, match="tied ties its output head .* drop --lora_head true"):
        check_tied_head(tied, AdapterConfig(method="lora", targets=["query", "head"]), "lora")
    with pytest.raises(ValueError, match="drop --ether_head true"):
        check_tied_head(tied, AdapterConfig(method="oft", nb=4, targets=["head"]), "oft")


def test_adapter_errors_name_the_flags_of_the_script_that_set_them(tiny_ckpt, tmp_path):
    """`AdapterConfig` names its fields (`nb`); the finetune scripts' sentences name their flags (`--ether_nb`)."""
    import lora

    from lit_gpt.adapters import AdapterConfig

    with pytest.raises(ValueError, match=r"^--ether_nb 5 does not divide the 64 input features of "
                                         r"transformer\.h\.0\.attn\.qkv \(query rows\): choose an --ether_nb that "
                                         r"divides 64\.$"):
        setup_ether(tiny_ckpt / "data", tmp_path / "out", ether_nb=5, dry_run=True)
    with pytest.raises(ValueError, match=r"^--ether_dropout must be a probability in \[0, 1\), got 1\.5\.$"):
        setup_ether(tiny_ckpt / "data", tmp_path / "out", ether_dropout=1.5, dry_run=True)
    with pytest.raises(ValueError, match=r"^--oft_coft is an OFT option; --Htype etherplus does not use it\.$"):
        setup_ether(tiny_ckpt / "data", tmp_path / "out", Htype="etherplus", oft_coft=True, dry_run=True)
    with pytest.raises(ValueError, match=r"^The LoRA rank --lora_r must be a positive integer, got 0\.$"):
        lora.setup(io=IOArgs(train_data_dir=tiny_ckpt / "data"), lora_r=0, dry_run=True)
    # the library, outside a script, names the fields
    with pytest.raises(ValueError, match=r"^nb must be a positive number of blocks, got 0\.$"):
        AdapterConfig(nb=0)
    with pytest.raises(ValueError, match="^--precision garbage: choose one of 64-true, 32-true, bf16-mixed, 16-mixed, "
                                         "bf16-true, 16-true"):
        setup_ether(tiny_ckpt / "data", tmp_path / "out", precision="garbage")


def test_a_max_seq_length_that_cuts_off_every_answer_is_refused_and_some_are_warned_of(tiny_ckpt, tmp_path,
                                                                                        capsys):
    from lit_gpt.data import SFTDataset
    from lit_gpt.training import check_answers_fit

    with pytest.raises(ValueError) as e:
        setup_ether(tiny_ckpt / "data", tmp_path / "out", train=dict(max_seq_length=8))
    assert re.fullmatch(r"73 of the 73 examples in '.*train\.pt' have no answer token within --train\.max_seq_length 8 "
                        r"\(the longest of their prompts has \d+ tokens\), so training would learn nothing \(a loss "
                        r"of 0 at every step\): raise --train\.max_seq_length\.", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()

    def example(prompt: int, answer: int) -> dict:
        ids = torch.arange(prompt + answer)
        return {"input_ids": ids, "labels": torch.cat([torch.full((prompt,), -100), ids[prompt:]])}

    data = SFTDataset([example(3, 2), example(9, 2), example(4, 0)])
    check_answers_fit(data, 12, Path("d"), flag_given=True)  # (an empty answer is one that train.pt never holds)
    assert capsys.readouterr().out == ("warning: 1 of the 3 examples in 'd/train.pt' have no answer token within "
                                       "--train.max_seq_length 12 (the longest of their prompts has 4 tokens); they "
                                       "train nothing.\n")
    check_answers_fit(data, 9, Path("d"), flag_given=False)
    assert "2 of the 3 examples in 'd/train.pt' have no answer token within the model's block_size (9 tokens)" \
           in capsys.readouterr().out


@pytest.mark.parametrize("marker", [-1, -7])
def test_data_prepared_with_another_ignore_index_trains_as_with_the_default(tiny_ckpt, tmp_path, marker):
    """`prepare_*.py --ignore_index N` marks the prompt with N: training skips those positions as it skips -100
    (before, -1 crashed the loss with a traceback). A token id as the marker is refused when preparing, and data an
    earlier version prepared with one is refused by training (its answer tokens with that id cannot be told from
    the prompt)."""
    import prepare_json

    other = tmp_path / "other-marker"
    prepare_json.prepare(json_path=tiny_ckpt / "rows.json", destination_path=other, checkpoint_dir=tiny_ckpt,
                         max_seq_length=256, ignore_index=marker)
    assert any(bool((s["labels"] == marker).any()) for s in torch.load(other / "train.pt", weights_only=True))
    train = dict(max_steps=3, learning_rate=1e-2)
    setup_ether(tiny_ckpt / "data", tmp_path / "default", ckpt=tiny_ckpt, train=train)
    setup_ether(other, tmp_path / "marked", ckpt=tiny_ckpt, train=train)
    assert [r["loss"] for r in csv_rows(tmp_path / "marked")] == [r["loss"] for r in csv_rows(tmp_path / "default")]
    if marker == -1:
        config = other / "prepare_config.yaml"
        config.write_text(config.read_text().replace("ignore_index: -1", "ignore_index: 0"))
        with pytest.raises(ValueError, match=r"other-marker' was prepared with --ignore_index 0, a token id: .*prepare "
                                             "it again with the default --ignore_index -100"):
            setup_ether(other, tmp_path / "token-marker", ckpt=tiny_ckpt, train=train)


def test_a_resume_with_another_data_order_names_the_flags(tiny_ckpt):
    from lit_gpt.data import SFTDataset
    from lit_gpt.training import TrainArgs, check_data_order, make_loader

    data = SFTDataset.from_dir(tiny_ckpt / "data")
    state = make_loader(data, TrainArgs(micro_batch_size=1), 1337, 0, 2, 0, None).state_dict()
    state["num_samples"] += 1
    with pytest.raises(ValueError, match=r"^--resume 'c\.pth' cannot go on with the same order of the training data "
                                         r"\(--seed was 1337, now 7; the size of --io.train_data_dir's train.pt was "
                                         r"\d+, now \d+\): resume with the flags the run was started with"):
        check_data_order(make_loader(data, TrainArgs(micro_batch_size=1), 7, 0, 1, 0, None), state, Path("c.pth"))
    # another number of processes or micro-batch size is no other order
    check_data_order(make_loader(data, TrainArgs(micro_batch_size=2), 1337, 0, 1, 0, None),
                     dict(state, num_samples=len(data)), Path("c.pth"))


# ---------------------------------------------------------------------------------------------- directories
def test_wrong_directories_name_the_flag(tiny_ckpt, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"--io.train_data_dir '.*nonexist' does not exist: pass a directory "
                                                r"written by a scripts/prepare_\*.py script"):
        setup_ether(tmp_path / "nonexist", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--io.train_data_dir '.*empty' has no train.pt"):
        setup_ether(tmp_path / "empty", tmp_path / "out")
    # data moved away from its model: the checkpoint dir was inferred from the data's parent, so say that
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(tiny_ckpt / "data", moved)
    with pytest.raises(FileNotFoundError) as e:
        setup_ether(moved, tmp_path / "out")
    assert str(e.value) == (
        f"No --io.checkpoint_dir was given, so the base model was looked for in {str(moved.parent)!r}, the parent of "
        f"--io.train_data_dir, which has no lit_model.pth or model_config.yaml: pass --io.checkpoint_dir with the "
        f"model the data was prepared for (the data's prepare_config.yaml names {str(tiny_ckpt)!r})."
    )
    monkeypatch.chdir(tmp_path)  # running with no flags says which one is required
    with pytest.raises(ValueError, match="--io.train_data_dir is required: pass a directory written by a scripts/"):
        setup_ether(IOArgs().train_data_dir, None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()
    # the model folder itself (its prepared data is a folder inside it): named as such, with the folders to pass
    with pytest.raises(ValueError) as e:
        setup_ether(tiny_ckpt, tmp_path / "out")
    assert str(e.value) == (f"--io.train_data_dir {str(tiny_ckpt)!r} is a model checkpoint, not prepared data: pass "
                            "one of its prepared data folders (data/).")
    with pytest.raises(ValueError, match="--dry_run plans for a model: name it with --model_name"):
        setup_ether(None, None, dry_run=True)


# ---------------------------------------------------------------------------------------------- data vs model
def test_data_tokenized_for_another_model_is_refused(tiny_ckpt, tmp_path):
    from lit_gpt.data.prepare import tokenizer_fingerprint
    from lit_gpt.tokenizer import Tokenizer

    config = yaml.safe_load((tiny_ckpt / "data" / "prepare_config.yaml").read_text())
    assert config["tokenizer_fingerprint"] == tokenizer_fingerprint(Tokenizer(tiny_ckpt))

    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt / "data", other)
    config["tokenizer_fingerprint"] = "sha256:0123456789abcdef"
    config["checkpoint_dir"] = "checkpoints/some/other-model"
    (other / "prepare_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError) as e:
        setup_ether(other, tmp_path / "out", ckpt=tiny_ckpt)
    msg = str(e.value)
    assert "'checkpoints/some/other-model' (fingerprint sha256:0123456789abcdef)" in msg
    assert f"not that of the base model {str(tiny_ckpt)!r}" in msg and "--checkpoint_dir" in msg

    del config["tokenizer_fingerprint"]  # data prepared before the fingerprint existed: the vocab size still tells
    config["vocab_size"] = 49152
    (other / "prepare_config.yaml").write_text(yaml.safe_dump(config))
    ours = Tokenizer(tiny_ckpt).vocab_size
    with pytest.raises(ValueError, match=rf"\(vocab_size 49152\), not that of the base model .* \(vocab_size {ours}\)"):
        setup_ether(other, tmp_path / "out", ckpt=tiny_ckpt)

    # no prepare_config at all: a token id past the embedding table is still caught before the forward's IndexError
    (other / "prepare_config.yaml").unlink()
    samples = torch.load(other / "train.pt", weights_only=True)
    samples[5]["input_ids"][3] = 10_000
    torch.save(samples, other / "train.pt")
    with pytest.raises(ValueError, match=r"holds token id 10000, but the base model .* has only 448 token embeddings"):
        setup_ether(other, tmp_path / "out", ckpt=tiny_ckpt)
    assert not (tmp_path / "out").exists()


def test_an_empty_test_split_skips_validation(tiny_ckpt, tmp_path, capsys):
    data = tmp_path / "no-test"
    shutil.copytree(tiny_ckpt / "data", data)
    torch.save([], data / "test.pt")
    out = tmp_path / "run"
    setup_ether(data, out, ckpt=tiny_ckpt, eval={"interval": 1, "max_new_tokens": 2}, train={"max_steps": 2})
    assert f"No validation: {str(data / 'test.pt')!r} holds no examples." in capsys.readouterr().out
    rows = csv_rows(out)
    assert "val_loss" not in rows[0] and len(rows) == 2  # no "val loss 0.0000 / ppl 1.0" row


def test_the_final_validation_covers_the_whole_set_and_says_how_many_examples(tiny_ckpt, tmp_path, capsys):
    """The last step's loss was that of the first --eval.max_iters examples (100 by default: 1/20 of Alpaca's split),
    unlike litgpt's final validation, and no line said how many. --eval.initial_validation validates at step 0."""
    n = len(torch.load(tiny_ckpt / "data" / "test.pt", weights_only=True))
    assert n > 2
    runs = {}
    for name, eval in (("final", dict(interval=1, max_iters=2, initial_validation=True)),
                       ("all", dict(interval=1, max_iters=n, final_validation=False))):
        setup_ether(tiny_ckpt / "data", tmp_path / name, ckpt=tiny_ckpt, eval=eval, train={"max_steps": 2})
        runs[name] = {int(r["step"]): (float(r["val_loss"]), float(r["val_ppl"]))
                      for r in csv_rows(tmp_path / name) if r.get("val_loss")}
        captured = capsys.readouterr()
        runs[name + " out"] = captured.out + captured.err
    assert sorted(runs["final"]) == [0, 1, 2] and sorted(runs["all"]) == [1, 2]
    assert runs["final"][2] == runs["all"][2]  # the whole set, as the run validating every example
    assert runs["final"][1] != runs["all"][1]  # the periodic one: the first 2
    assert f"step 1: val loss {runs['final'][1][0]:.4f} (first 2 of {n} validation examples)" in runs["final out"]
    assert f"step 2: val loss {runs['final'][2][0]:.4f} (all {n} validation examples)" in runs["final out"]
    assert f"step 0: val loss {runs['final'][0][0]:.4f} (first 2 of {n}" in runs["final out"]
    for loss, ppl in runs["final"].values():
        assert ppl == pytest.approx(math.exp(loss))  # (it was exp(min(loss, 50)): one number for every loss above)
    assert "Training for 2 optimizer steps of 1 example (--train.max_steps; it overrides --train.epochs)" \
        in runs["final out"]


# ---------------------------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("extra", [dict(Htype="ether"), dict(Htype="oft")], ids=["ether", "oft"])
def test_float16_adapter_training_keeps_the_trainable_weights_in_float32(tiny_ckpt, tmp_path, capsys, extra):
    """16-true: float16 weights gave AdamW float16 state (eps and small squared gradients round to 0): the adapter
    was NaN after the first step. The adapter's weights, gradients and AdamW state are now float32, the frozen model
    float16."""
    from lit_gpt.training import _half_keeping_trainable_float32

    seen = {}
    real = _half_keeping_trainable_float32()

    class Spy(real):
        def convert_module(self, module):
            module = super().convert_module(module)
            seen.update({n: p.dtype for n, p in module.named_parameters()})
            return module

    import lit_gpt.training as training

    orig = training._half_keeping_trainable_float32
    training._half_keeping_trainable_float32 = lambda: Spy
    try:
        out = tmp_path / "fp16"
        setup_ether(tiny_ckpt / "data", out, precision="16-true", eval={"interval": 2},
                    train={"max_steps": 4, "save_interval": 2, "learning_rate": 1e-3}, **extra)
    finally:
        training._half_keeping_trainable_float32 = orig
    assert "the adapter's weights, gradients and AdamW state are float32" in capsys.readouterr().out
    trainable = {n for n in seen if n.rsplit(".", 1)[-1] in ("u", "v", "R", "R_upper")}
    assert trainable and {seen[n] for n in trainable} == {torch.float32}
    assert {seen[n] for n in seen if n not in trainable} == {torch.float16}
    weights = load_file(out / "lit_model_ether_finetuned.pth")["state_dict"]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    ckpt = load_file(out / "checkpoints" / "step-000004.pth", mmap=False)
    moments = [s["exp_avg_sq"] for s in ckpt["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in moments)
    losses = [float(r["loss"]) for r in csv_rows(out) if r.get("loss")]
    assert len(losses) == 4 and all(map(math.isfinite, losses))


def test_float16_lora_trains_with_float32_factors(tiny_ckpt, tmp_path):
    import lora

    out = tmp_path / "lora16"
    lora.setup(io=IOArgs(train_data_dir=tiny_ckpt / "data", out_dir=out), lora_r=4, precision="16-true",
               train=TrainArgs(learning_rate=1e-2, max_steps=3, global_batch_size=1, micro_batch_size=1,
                               lr_warmup_steps=1), eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0))
    Bs = [v for k, v in load_file(out / "lit_model_lora_finetuned.pth")["state_dict"].items() if k.endswith(".B")]
    assert Bs and all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in Bs)
    assert any(b.abs().sum() > 0 for b in Bs)  # B starts at 0: it moved, so the factors' gradients arrived


def test_bfloat16_adapter_float32_keeps_the_small_adam_steps_bfloat16_weights_drop(tiny_ckpt, tmp_path, capsys):
    """bf16-true: each Adam step moves a weight by about the learning rate (1e-5 here), below half a bfloat16
    spacing for almost every weight, so bfloat16 adapter weights barely move in 5 steps; with --adapter_float32 they
    are float32 (weights, AdamW state, final file) and every one moves, while the frozen model stays bfloat16."""
    from lit_gpt.adapters import plan_report
    from lit_gpt.config import Config

    moved, runs = {}, {}
    for f32 in (False, True):
        out = runs[f32] = tmp_path / f"f32-{f32}"
        setup_ether(tiny_ckpt / "data", out, precision="bf16-true", adapter_float32=f32, Htype="etherplus",
                    train={"max_steps": 6, "save_interval": 1, "learning_rate": 1e-5, "lr_warmup_steps": 1})
        first = load_file(out / "checkpoints" / "step-000001.pth", mmap=False)["model"]
        last = load_file(out / "lit_model_ether_finetuned.pth", mmap=False)["state_dict"]
        assert first and {v.dtype for v in last.values()} == {torch.float32 if f32 else torch.bfloat16}
        changed = sum(int((last[k].float() != first[k].float()).sum()) for k in first)
        moved[f32] = changed / sum(v.numel() for v in first.values())
    assert moved[False] < 0.2 and moved[True] > 0.99, moved
    out = capsys.readouterr().out
    assert ("--precision bf16-true: the adapter's weights, gradients and AdamW state are float32 (--adapter_float32: "
            "no Adam step is rounded away); the frozen model and the activations are bfloat16.") in out
    # the run's summary: time, throughput and peak memory of the optimisation
    assert re.search(r"Trained steps 1-6 in [\d.]+ s of optimisation \([\d,]+ tokens/s, padding included\); "
                     r"peak memory [\d.]+ GiB \(the process's resident set\)\.", out)
    ckpt = load_file(runs[True] / "checkpoints" / "step-000006.pth", mmap=False)
    assert {s["exp_avg_sq"].dtype for s in ckpt["optimizer"]["state"].values()} == {torch.float32}
    # the plan counts 4 bytes for each trainable weight
    cfg = Config.from_checkpoint(tiny_ckpt)
    from lit_gpt.adapters import AdapterConfig

    adapter = AdapterConfig(method="etherplus", nb=4, targets=["query", "value"])
    assert "the trainable ones float32, 4 bytes" in plan_report(cfg, adapter, "bf16-true", adapter_float32=True)
    assert "float32" not in plan_report(cfg, adapter, "bf16-true")


def test_float16_full_fine_tuning_is_refused_before_anything_is_written(tiny_ckpt, tmp_path):
    out = tmp_path / "full16"
    r = run_cli("full.py", *common_flags(tiny_ckpt, out, 2, **{"--precision": "16-true"}))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --precision 16-true cannot train every weight")
    assert "16-mixed" in r.stderr and not out.exists()


def test_a_non_finite_validation_loss_stops_the_run(tiny_ckpt, tmp_path, monkeypatch):
    import lit_gpt.training as training
    from lit_gpt.training import NonFiniteLossError

    monkeypatch.setattr(training, "validate", lambda *a, **k: float("nan"))
    # one step: the only sign is the validation loss; before, the run exited 0 with a NaN adapter
    with pytest.raises(NonFiniteLossError, match="The validation loss became nan at step 1"):
        setup_ether(tiny_ckpt / "data", tmp_path / "nan")
    assert not (tmp_path / "nan" / "lit_model_ether_finetuned.pth").exists()


def test_a_non_finite_gradient_norm_is_the_same_one_line_error(tiny_ckpt, tmp_path, monkeypatch):
    import lightning

    from lit_gpt.training import NonFiniteLossError

    def clip(self, *args, **kwargs):
        raise RuntimeError("The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot "
                           "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
                           "set `error_if_nonfinite=False`")

    monkeypatch.setattr(lightning.Fabric, "clip_gradients", clip)
    with pytest.raises(NonFiniteLossError, match="The gradient norm became non-finite at step 1; no good checkpoint"):
        setup_ether(tiny_ckpt / "data", tmp_path / "out", train={"max_norm": 1.0})


def test_checkpoint_finiteness_check_names_the_tensor():
    from lit_gpt.training import NonFiniteLossError, check_finite

    check_finite({"a": torch.ones(2)}, "x.pth", 3, None, "32-true")
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(b\) at step 3, so x.pth was not written; the last "
                                                 r"good checkpoint is c.pth\. Lower --train.learning_rate"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "x.pth", 3, Path("c.pth"),
                     "32-true")


# ---------------------------------------------------------------------------------------------- metrics.csv
def test_metrics_csv_is_on_disk_after_every_row_and_kept_up_to_the_resumed_step(tmp_path):
    from lit_gpt.training import MetricsCSV

    path = tmp_path / "logs" / "metrics.csv"
    log = MetricsCSV(path, keep_until_step=0)
    for step in (1, 2, 3):
        log.log({"loss": float(step), "lr": 0.1}, step)
        assert len(list(csv.DictReader(path.open()))) == step  # no buffering: a kill -9 loses nothing logged
    log.log({"val_loss": 9.0}, 3)  # a new column rewrites the header and keeps the rows
    rows = list(csv.DictReader(path.open()))
    assert [r["loss"] for r in rows] == ["1.0", "2.0", "3.0", ""] and rows[3]["val_loss"] == "9.0"

    log = MetricsCSV(path, keep_until_step=2)  # resumed at step 2: steps 3.. are redone
    assert [r["step"] for r in csv.DictReader(path.open())] == ["1", "2"]
    log.log({"loss": 33.0, "lr": 0.1}, 3)
    assert [(r["step"], r["loss"]) for r in csv.DictReader(path.open())][-1] == ("3", "33.0")
    MetricsCSV(path, keep_until_step=0)  # a fresh run in the same directory starts an empty log
    assert list(csv.DictReader(path.open())) == []


def test_hyperparameters_yaml_keeps_no_stray_objects(monkeypatch):
    import inspect

    import ether

    from lit_gpt import training

    # ether.setup imports AdapterConfig inside the function: its flags are captured before that line
    source = inspect.getsource(ether.setup)
    assert source.index("flags = dict(locals())") < source.index("from lit_gpt.adapters import AdapterConfig")
    captured = {}
    monkeypatch.setattr(training, "finetune", lambda **kwargs: captured.update(kwargs["cli_args"]))
    training.run_entrypoint("ether", None, {
        "dry_run": False, "io": IOArgs(), "train": TrainArgs(), "eval": EvalArgs(), "precision": None, "devices": 1,
        "num_nodes": 1, "seed": 1, "resume": False, "AdapterConfig": Config, "json": json})
    assert "AdapterConfig" not in captured and "json" not in captured and captured["seed"] == 1


def test_an_unknown_precision_lists_what_the_script_takes():
    from lit_gpt.adapters import AdapterConfig
    from lit_gpt.training import check_precision

    with pytest.raises(ValueError) as adapter:
        check_precision("bf15-true", AdapterConfig(method="ether", nb=4))
    with pytest.raises(ValueError) as full:  # full fine-tuning refuses 16-true: not offered
        check_precision("bf15-true", None)
    assert "bf16-true, 16-true (" in str(adapter.value) and "16-true" not in str(full.value).replace("bf16-true", "")


def test_precisions_fsdp_cannot_shard_are_refused_with_several_devices(monkeypatch):
    """FSDP2 keeps sharded weights in one dtype: 16-mixed and 64-true fail inside Lightning, naming its strategy
    class, not a flag; full.py's advice for 16-true must not send the user there."""
    from lit_gpt import training
    from lit_gpt.adapters import AdapterConfig
    from lit_gpt.training import check_precision

    adapter = AdapterConfig(method="ether", nb=4)
    for precision in ("16-mixed", "16", "64-true"):
        check_precision(precision, adapter, world_size=1)
        with pytest.raises(ValueError, match=rf"^--precision {precision} does not work with --devices × --num_nodes "
                                             r"= 2: FSDP2 .* choose 32-true, bf16-true, bf16-mixed or 16-true\.$"):
            check_precision(precision, adapter, world_size=2)
    with pytest.raises(ValueError, match="choose 32-true, bf16-true, bf16-mixed.$"):
        check_precision("16-mixed", None, world_size=4)
    for precision in ("32-true", "32", "bf16-true", "bf16-mixed", "bf16", "16-true"):
        check_precision(precision, adapter, world_size=2)
    with pytest.raises(ValueError, match="or 16-mixed") as one:
        check_precision("16-true", None, world_size=1)
    with pytest.raises(ValueError, match="bfloat16, or 32-true.$") as several:
        check_precision("16-true", None, world_size=2)
    assert "16-mixed" in str(one.value) and "16-mixed" not in str(several.value)
    # the default on a GPU without bfloat16: 16-mixed alone, 32-true sharded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert training.default_precision(1) == "16-mixed" and training.default_precision(2) == "32-true"


def test_a_launcher_that_started_another_number_of_processes_is_refused(monkeypatch):
    """torchrun --nproc_per_node 2 without --devices 2: each process would take itself for a whole run."""
    from lit_gpt.training import check_launched_processes

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launched_processes(1, 1)  # Fabric's own launcher leaves WORLD_SIZE set in the process that launched
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun sets besides
    check_launched_processes(2, 1)
    with pytest.raises(ValueError, match=r"^The launcher started 2 processes \(WORLD_SIZE=2\), but --devices 1 × "
                                         r"--num_nodes 1 = 1: pass --devices 2 \(the processes per machine\)\.$"):
        check_launched_processes(1, 1)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="= 2: pass --devices 4 "):
        check_launched_processes(1, 2)
    monkeypatch.delenv("WORLD_SIZE")
    check_launched_processes(1, 1)


def test_validation_data_in_another_format_is_warned_about(tiny_ckpt, tmp_path, capsys):
    """--io.val_data_dir prepared with another prompt style or system prompt than the training data: its val loss
    measures a format the model is not trained on, which went unsaid (data of another tokenizer is refused)."""
    import ether

    val = tmp_path / "val"
    shutil.copytree(tiny_ckpt / "data", val)
    prepared = yaml.safe_load((val / "prepare_config.yaml").read_text())

    def run(name: str) -> str:
        capsys.readouterr()
        ether.setup(io=IOArgs(train_data_dir=tiny_ckpt / "data", val_data_dir=val, checkpoint_dir=tiny_ckpt,
                              out_dir=tmp_path / name),
                    train=TrainArgs(max_steps=1, global_batch_size=1, micro_batch_size=1, lr_warmup_steps=0),
                    eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0), ether_nb=4, precision="32-true")
        return capsys.readouterr().err

    assert "warning" not in run("same")
    (val / "prepare_config.yaml").write_text(yaml.safe_dump(dict(prepared, prompt_style="chatml",
                                                                 system_prompt="Be terse.")))
    assert (f"warning: --io.val_data_dir {str(val)!r} was prepared in another format than --io.train_data_dir "
            f"{str(tiny_ckpt / 'data')!r} (prompt_style 'chatml', not 'alpaca'; system_prompt 'Be terse.', not None): "
            "its val loss measures a format the model is not trained on; prepare the validation rows with the "
            "training data's settings.\n") in run("other")


# ---------------------------------------------------------------------------------------------- --*_targets
def test_targets_flag_takes_names_all_linear_and_peft_names_and_refuses_a_contradiction():
    from lit_gpt.training import targets_from_flags

    unset = dict(query=None, key=None, value=None, projection=None, mlp=None, head=None)
    assert targets_from_flags("lora", None, **unset) == ["query", "value"]  # the layer flags' defaults
    assert targets_from_flags("lora", None, **dict(unset, query=False, mlp=True)) == ["value", "mlp"]
    assert targets_from_flags("lora", "all-linear", **unset) == ["query", "key", "value", "projection", "mlp"]
    assert targets_from_flags("lora", ["all-linear", "head"], **unset) == [
        "query", "key", "value", "projection", "mlp", "head"]
    # PEFT's names, commas, any order and case: the canonical order of our names
    assert targets_from_flags("ether", "mlp, V_PROJ,q_proj", **unset) == ["query", "value", "mlp"]
    assert targets_from_flags("ether", ["gate_proj", "up_proj", "down_proj", "lm_head"], **unset) == ["mlp", "head"]
    # one MLP layer is not a target here: mlp adapts all of them, which PEFT's gate_proj alone would not
    with pytest.raises(ValueError, match=r"^--ether_targets: gate_proj, up_proj is only part of the MLP here, whose "
                                         r"target, mlp, adapts all of its linear layers \(gate_proj, up_proj, "
                                         r"down_proj\): pass mlp \(or all of them\), or name ours for some \(the "
                                         r"gate projection, gate_proj or w1, is mlp\.fc_1;"):
        targets_from_flags("ether", "q_proj,up_proj,gate_proj", **unset)
    assert targets_from_flags("ether", "c_attn", **unset) == ["query", "key", "value"]
    # a layer flag that agrees (a config file's query/value true) is fine; one that contradicts is one sentence
    assert targets_from_flags("lora", "all-linear", **dict(unset, query=True, head=False)) == [
        "query", "key", "value", "projection", "mlp"]
    with pytest.raises(ValueError, match=r"^--ether_mlp false contradicts --ether_targets all-linear, which adapts "
                                         r"the mlp layers: drop one of the two \(set --ether_mlp null to unset it "
                                         r"from a config file\)\.$"):
        targets_from_flags("ether", "all-linear", **dict(unset, mlp=False))
    with pytest.raises(ValueError, match=r"^--lora_head true contradicts --lora_targets query, which leaves out"):
        targets_from_flags("lora", "query", **dict(unset, head=True))
    with pytest.raises(ValueError, match=r"^--lora_targets: 'wq' is not a layer name here: pass all-linear or some "
                                         r"of query, key, value, projection, mlp, head \(transformers' q_proj"):
        targets_from_flags("lora", "query,wq", **unset)
    with pytest.raises(ValueError, match=r"^--lora_targets names no layer"):
        targets_from_flags("lora", " , ", **unset)
    with pytest.raises(ValueError, match=r"^No layer is adapted: enable at least one of --lora_query, .*--lora_head, "
                                         r"or pass --lora_targets\.$"):
        targets_from_flags("lora", None, **dict(unset, query=False, value=False))


def test_all_linear_from_the_command_line_adapts_what_the_five_flags_do(tiny_ckpt, capsys, monkeypatch):
    """`--lora_targets all-linear` (PEFT's target_modules="all-linear") plans the same trainable parameters as the
    five layer flags, through the script's parser; a config's agreeing flag is accepted beside it."""
    import lora

    from lit_gpt.cli import run_cli as run_in_process

    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    counts = {}
    for name, flags in (("flags", ["--lora_key", "true", "--lora_projection", "true", "--lora_mlp", "true"]),
                        ("targets", ["--lora_targets", "all-linear", "--lora_query", "true"]),
                        ("peft", ["--lora_targets", "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"]),
                        ("default", [])):
        run_in_process(lora.setup, args=["--io.checkpoint_dir", str(tiny_ckpt), "--dry_run", "true", *flags])
        counts[name] = re.search(r"trainable parameters: ([\d,]+)", capsys.readouterr().out).group(1)
    assert counts["flags"] == counts["targets"] == counts["peft"] != counts["default"]
    with pytest.raises(SystemExit) as e:
        run_in_process(lora.setup, args=["--io.checkpoint_dir", str(tiny_ckpt), "--dry_run", "true",
                                         "--lora_targets", "all-linear", "--lora_mlp", "false"])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith("error: --lora_mlp false contradicts --lora_targets all-linear")


def test_a_run_with_targets_records_them_and_its_adapter(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    setup_ether(tiny_ckpt / "data", out, ether_targets="q_proj,v_proj,mlp")
    hp = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert hp["ether_targets"] == "q_proj,v_proj,mlp" and hp["adapter_config"]["targets"] == ["query", "value", "mlp"]
    saved = load_file(out / "lit_model_ether_finetuned.pth")
    assert saved["adapter_config"]["targets"] == ["query", "value", "mlp"]
    layers = {k.split(".adapters.")[0].split(".", 3)[-1] for k in saved["state_dict"]}
    assert layers == {"attn.qkv", "mlp.fc_1", "mlp.fc_2", "mlp.proj"}  # not attn.proj


# ---------------------------------------------------------------------------------------------- warm-up fraction
def test_the_warm_up_fraction_is_a_fraction_of_an_epochs_steps():
    assert TrainArgs(lr_warmup_steps=7).warmup_steps(1000) == 7
    t = TrainArgs(lr_warmup_fraction=0.1, lr_warmup_steps=7, global_batch_size=8, epochs=3)
    assert t.warmup_steps(1000) == 13  # ceil(0.1 × 1000 / 8): one epoch's 125 steps, not the run's 375
    assert TrainArgs(lr_warmup_fraction=0.1, global_batch_size=8, epoch_size=400).warmup_steps(1000) == 5
    assert TrainArgs(lr_warmup_fraction=0.5, global_batch_size=1).warmup_steps(4) == 2  # (exact: not rounded up)
    assert TrainArgs(lr_warmup_fraction=0.0).warmup_steps(100) == 0
    with pytest.raises(ValueError, match=r"^--train\.lr_warmup_fraction 1\.5: pass a fraction of an epoch from 0 to "
                                         r"1 \(e\.g\. 0\.03\), or leave it unset to use --train\.lr_warmup_steps\.$"):
        TrainArgs(lr_warmup_fraction=1.5).validate()


def test_a_run_warms_up_for_its_fraction_of_an_epoch(tiny_ckpt, tmp_path, capsys):
    from lit_gpt.training import lr_lambda

    n = len(torch.load(tiny_ckpt / "data" / "train.pt", weights_only=True))
    out, fraction = tmp_path / "run", 2.5 / n  # 3 warm-up steps of the 4, whatever the fixture's size
    setup_ether(tiny_ckpt / "data", out, train=dict(max_steps=4, lr_warmup_steps=100, lr_warmup_fraction=fraction))
    warmup = 3
    assert f"--train.lr_warmup_fraction {fraction:g} of an epoch: 3 warm-up steps" in capsys.readouterr().out
    rows = [r for r in csv_rows(out) if r["loss"]]
    schedule = lr_lambda(warmup_steps=warmup, max_steps=4, min_ratio=0.0)
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-2 * schedule(i) for i in range(4)])
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["train"]["lr_warmup_fraction"] == fraction


def test_warm_up_steps_and_fraction_together_are_refused_and_steps_on_resume_replace_the_fraction(tiny_ckpt,
                                                                                                 tmp_path, capsys,
                                                                                                 monkeypatch):
    import ether

    from lit_gpt.cli import run_cli as run_in_process

    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_in_process(ether.setup, args=["--io.train_data_dir", str(tiny_ckpt / "data"), "--dry_run", "true",
                                          "--train.lr_warmup_steps", "5", "--train.lr_warmup_fraction", "0.1"],
                       finetune_script="finetune/ether.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --train.lr_warmup_steps 5 and --train.lr_warmup_fraction 0.1 both set "
                                       "the warm-up: pass one of the two.\n")
    # a run warmed up by a fraction, resumed with --train.lr_warmup_steps: the steps given now are the warm-up
    run = tmp_path / "run"
    common = ["--io.train_data_dir", str(tiny_ckpt / "data"), "--io.out_dir", str(run), "--ether_nb", "4",
              "--precision", "32-true", "--eval.interval", "0", "--eval.max_iters", "1", "--eval.final_validation",
              "false", "--train.global_batch_size", "1", "--train.save_interval", "1"]
    run_in_process(ether.setup, args=[*common, "--train.max_steps", "2", "--train.lr_warmup_fraction", "1.0"],
                   finetune_script="finetune/ether.py")
    run_in_process(ether.setup, args=["--resume", "auto", "--io.out_dir", str(run), "--train.max_steps", "4",
                                      "--train.lr_warmup_steps", "0"], finetune_script="finetune/ether.py")
    assert "--train.lr_warmup_fraction 1.0 -> None" in capsys.readouterr().out
    rows = [r for r in csv_rows(run) if r["loss"]]
    from lit_gpt.training import lr_lambda

    schedule = lr_lambda(warmup_steps=0, max_steps=4, min_ratio=0.0)  # no warm-up from step 3 on
    assert [float(r["lr"]) for r in rows[2:]] == pytest.approx([1e-3 * schedule(i) for i in (2, 3)])
