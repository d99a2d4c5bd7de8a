"""The command line as a user meets it: a run's hyperparameters.yaml fed back with `--config`, flag errors as one
line, a warning for an export without a tokenizer, and one clear sentence for a task dataset an offline machine
cannot fetch."""

import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.cli import run_cli, run_config_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "finetune"))
sys.path.insert(0, str(REPO / "eval"))

import ether  # noqa: E402
import full  # noqa: E402
import lm_eval_harness  # noqa: E402
import lora  # noqa: E402
from test_merge import make_base  # noqa: E402
from test_training import tiny_ckpt  # noqa: E402, F401  (a fixture)

RUN_FLAGS = dict(Htype="etherplus", ether_nb=4, ether_mlp=True, seed=7, precision="32-true")


@pytest.fixture(scope="module")
def ether_run(tiny_ckpt):  # noqa: F811
    """A finished 2-step ETHER+ run started in the checkpoint's parent folder with relative paths (what a user
    typing `--io.train_data_dir tiny-llama/data` gets): (the folder it was started in, its hyperparameters.yaml)."""
    started_in = tiny_ckpt.parent
    cwd = os.getcwd()
    os.chdir(started_in)
    try:
        ether.setup(
            io=IOArgs(train_data_dir=Path(tiny_ckpt.name) / "data"),
            train=TrainArgs(learning_rate=1e-2, max_steps=2, global_batch_size=2, micro_batch_size=1,
                            lr_warmup_steps=1),
            eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0),
            **RUN_FLAGS,
        )
    finally:
        os.chdir(cwd)
    (hparams,) = (started_in / "logs").glob("*/hyperparameters.yaml")
    return started_in, hparams


def parsed_flags(monkeypatch, script_module, script: str, *args: str) -> dict:
    """The flags `run_cli` hands the script's function for `args` (the training itself is not run)."""
    captured = {}
    monkeypatch.setattr(script_module, "run_entrypoint", lambda method, adapter, flags: captured.update(flags))
    run_cli(script_module.setup, finetune_script=script, args=list(args))
    return captured


# ---------------------------------------------------------------------------------------------- --config <run>
def test_a_runs_hyperparameters_parse_back_to_its_flags(ether_run, monkeypatch, tmp_path):
    started_in, hparams_path = ether_run
    hp = yaml.safe_load(hparams_path.read_text())
    # derived keys the file records besides the flags (jsonargparse refused the file because of them)
    assert {"method", "adapter_config", "base_checkpoint_dir", "prompt_style", "io"} <= set(hp)

    for cwd in (started_in, tmp_path):  # from where the run was started, and from elsewhere
        monkeypatch.chdir(cwd)
        flags = parsed_flags(monkeypatch, ether, "finetune/ether.py", "--config", str(hparams_path))
        for key, value in hp.items():
            if key in ("train", "eval"):
                assert asdict(flags[key]) == value, key
            elif key != "io" and key in flags:
                assert flags[key] == value, key
        assert flags["Htype"] == "etherplus" and flags["ether_mlp"] is True and flags["seed"] == 7
        io = flags["io"]
        # the paths mean what they meant for the run; those the run derived are derived again
        assert (cwd / io.train_data_dir).resolve() == (started_in / hp["io"]["train_data_dir"]).resolve()
        assert (cwd / io.log_dir).resolve() == (started_in / "logs").resolve()
        assert io.val_data_dir is None and io.checkpoint_dir is None and io.out_dir is None
        if cwd == started_in:
            assert str(io.train_data_dir) == hp["io"]["train_data_dir"]  # kept as the user typed it

    # flags after --config override the file's values; the rest stay the file's
    flags = parsed_flags(monkeypatch, ether, "finetune/ether.py", f"--config={hparams_path}",
                         "--train.learning_rate", "0.002", "--io.out_dir", str(tmp_path / "new"))
    assert flags["train"].learning_rate == 0.002 and flags["train"].max_steps == 2
    assert flags["io"].out_dir == tmp_path / "new" and flags["ether_nb"] == 4


def test_a_file_without_started_in_anchors_its_paths_in_the_checkpoint_path(ether_run, tmp_path, monkeypatch):
    """Runs made before `started_in` was recorded: the folder is the absolute base path less the relative one."""
    started_in, hparams_path = ether_run
    hp = yaml.safe_load(hparams_path.read_text())
    assert hp.pop("started_in") == str(started_in)
    hp["io"]["checkpoint_dir"] = hp["io"]["checkpoint_dir"] + "/"  # as typed: not the derived default
    older = tmp_path / "hyperparameters.yaml"
    older.write_text(yaml.safe_dump(hp, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    io = parsed_flags(monkeypatch, ether, "finetune/ether.py", "--config", str(older))["io"]
    assert io.checkpoint_dir.resolve() == Path(hp["base_checkpoint_dir"])
    assert io.train_data_dir.resolve() == (started_in / hp["io"]["train_data_dir"]).resolve()


def test_a_default_precision_is_recorded_as_default_and_chosen_again(tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A run left to the device's default precision records `precision: null` (and the precision it used apart),
    so its file replayed on another machine picks that machine's default instead of the CPU's 32-true."""
    from lit_gpt.training import default_precision
    from test_training_inputs import setup_ether

    setup_ether(tiny_ckpt / "data", tmp_path / "run", ckpt=tiny_ckpt, precision=None)
    hparams_path = tmp_path / "run" / "hyperparameters.yaml"
    hp = yaml.safe_load(hparams_path.read_text())
    assert hp["precision"] is None and hp["precision_used"] == default_precision()
    assert parsed_flags(monkeypatch, ether, "finetune/ether.py", "--config", str(hparams_path))["precision"] is None
    flags = parsed_flags(monkeypatch, ether, "finetune/ether.py", "--config", str(hparams_path),
                         "--precision", "bf16-true")
    assert flags["precision"] == "bf16-true"


def test_an_explicit_out_dir_is_kept(ether_run, tmp_path, monkeypatch):
    """Only an out_dir equal to the default (log_dir / run name) is left to derive again."""
    _, hparams_path = ether_run
    hp = yaml.safe_load(hparams_path.read_text())
    hp["io"]["out_dir"] = str(tmp_path / "mine")
    edited = tmp_path / "hyperparameters.yaml"
    edited.write_text(yaml.safe_dump(hp, sort_keys=False))
    flags = parsed_flags(monkeypatch, ether, "finetune/ether.py", "--config", str(edited))
    assert flags["io"].out_dir == tmp_path / "mine"


@pytest.mark.slow
def test_a_runs_hyperparameters_rerun_with_other_flags(ether_run, tmp_path):
    """`python finetune/ether.py --config <run>/hyperparameters.yaml --io.out_dir ... --train.max_steps 1` from
    another folder trains, and records the same flags but the two changed."""
    started_in, hparams_path = ether_run
    out = tmp_path / "rerun"
    r = subprocess.run([sys.executable, str(REPO / "finetune" / "ether.py"), "--config", str(hparams_path),
                        "--io.out_dir", str(out), "--train.max_steps", "1"], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, LIT_GPT_NO_PROGRESS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "lit_model_ether_finetuned.pth").is_file()
    before = yaml.safe_load(hparams_path.read_text())
    after = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert after["train"].pop("max_steps") == 1 and before["train"].pop("max_steps") == 2
    io_before, io_after = before.pop("io"), after.pop("io")
    assert before.pop("started_in") == str(started_in) and after.pop("started_in") == str(tmp_path)
    assert after == before  # flags, method, adapter config, base checkpoint, prompt style
    assert io_after["out_dir"] == str(out)
    for key in ("train_data_dir", "val_data_dir", "checkpoint_dir"):
        assert Path(io_after[key]) == (started_in / io_before[key]).resolve(), key


@pytest.mark.parametrize("module,script", [(lora, "finetune/lora.py"), (full, "finetune/full.py")])
def test_another_scripts_run_is_refused_in_one_sentence(ether_run, module, script, capsys, monkeypatch):
    _, hparams_path = ether_run
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(module.setup, finetune_script=script, args=["--config", str(hparams_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --config {str(hparams_path)!r} is the hyperparameters.yaml of a run written by finetune/ether.py "
        f"(method etherplus): pass it to finetune/ether.py, not {script}.\n"
    )


def test_resume_of_a_run_whose_hyperparameters_are_cut_names_the_file(tmp_path, capsys, monkeypatch):
    """Before, the broken file was skipped without a word and the resume asked for --io.train_data_dir, which the
    run had recorded."""
    hparams = tmp_path / "run" / "hyperparameters.yaml"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    hparams.write_text("method: etherplus\nio:\n  train_data_dir: 'da")
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(ether.setup, finetune_script="finetune/ether.py",
                args=["--resume", str(tmp_path / "run" / "checkpoints" / "step-000001.pth")])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {str(hparams)!r} is not valid YAML (found unexpected end of stream at line 3, column 22): fix it, or "
        "pass the run's flags yourself in a --config file to resume.\n"
    )


def test_a_lora_runs_file_given_to_ether_names_lora(tmp_path, capsys, monkeypatch):
    path = tmp_path / "hyperparameters.yaml"
    path.write_text(yaml.safe_dump({"lora_r": 4, "method": "lora", "io": {"train_data_dir": "data"}}))
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        run_cli(ether.setup, finetune_script="finetune/ether.py", args=["--config", str(path)])
    err = capsys.readouterr().err
    assert "written by finetune/lora.py (method lora): pass it to finetune/lora.py, not finetune/ether.py" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("path", sorted((REPO / "config_hub" / "finetune").glob("*/*.yaml")), ids=str)
def test_config_hub_yamls_are_passed_on_as_they_are(path, monkeypatch):
    module, script = (lora, "finetune/lora.py") if path.stem.endswith("lora") else (ether, "finetune/ether.py")
    args = ["--config", str(path), "--train.max_steps", "3"]
    assert run_config_args(args, module.setup, script) == args
    flags = parsed_flags(monkeypatch, module, script, *args)
    assert flags["train"].max_steps == 3
    assert flags["train"].learning_rate == float(yaml.safe_load(path.read_text())["train"]["learning_rate"])


# ---------------------------------------------------------------------------------------------- one-line errors
ETHER_ERRORS = [
    (["--devices", "two"], "--devices: expected an integer, got 'two'"),
    (["--devices", "auto"], "--devices: expected an integer, got 'auto': there is no automatic choice here, pass a "
                            "number"),
    (["--Htype", "foo"], "--Htype: expected ether, etherplus, etherplusHH or oft, got 'foo'"),
    (["--train.learning_rate", "abc"], "--train.learning_rate: expected a number, got 'abc'"),
    (["--oft_eps", "x"], "--oft_eps: expected a number, got 'x'"),  # Optional[float]: a union
    (["--train.max_steps=1.5"], "--train.max_steps: expected an integer, got '1.5'"),
    (["--flip_side", "maybe"], "--flip_side: expected true or false, got 'maybe'"),
    (["--train", '{"learning_rate": "abc"}'], "--train.learning_rate: expected a number, got 'abc'"),
    (["--nosuch", "1"], "unrecognized arguments: --nosuch 1"),
    # a likely slip gets the flag it was meant as: `-` for `_`, a close spelling, another finetune script's option
    (["--train.learning-rate", "1e-3"], "unrecognized arguments: --train.learning-rate 1e-3; did you mean "
                                        "--train.learning_rate?"),
    (["--ether_bn=4"], "unrecognized arguments: --ether_bn=4; did you mean --ether_nb?"),
    (["--lora_r", "8"], "unrecognized arguments: --lora_r 8; --lora_r is an option of finetune/lora.py"),
    # no abbreviations: argparse took `--train.lr 3` as --train.lr_warmup_steps 3 without a word
    (["--train.lr", "3"], "unrecognized arguments: --train.lr 3; did you mean --train.learning_rate?"),
    (["--train.lr_warm", "3"], "unrecognized arguments: --train.lr_warm 3; did you mean --train.lr_warmup_fraction "
                               "or --train.lr_warmup_steps?"),
    # the names HF Trainer and litgpt give some of the flags
    (["--warmup-steps", "3"], "unrecognized arguments: --warmup-steps 3; did you mean --train.lr_warmup_steps?"),
    (["--eval_steps=5"], "unrecognized arguments: --eval_steps=5; did you mean --eval.interval?"),
    # lit-gpt's and nanoGPT's training iterations, not --eval.max_iters (validation examples)
    (["--max_iters", "1000"], "unrecognized arguments: --max_iters 1000; did you mean --train.max_steps?"),
    (["--train.max_time", "3600"], "unrecognized arguments: --train.max_time 3600; there is no time limit: a "
                                   "scheduler's SIGTERM or SIGUSR1 (SLURM's --signal=USR1@90) stops the run after a "
                                   "step with a checkpoint, and --resume auto goes on"),
    (["--r", "16"], "unrecognized arguments: --r 16"),  # not `--resume`
    (["--target-modules", "q_proj"], "unrecognized arguments: --target-modules q_proj; did you mean --ether_targets?"),
    # an ambiguous abbreviation: every flag it may stand for, not the one difflib finds closest
    (["--train.max", "3"], "unrecognized arguments: --train.max 3; did you mean --train.max_norm, "
                           "--train.max_seq_length or --train.max_steps?"),
    (["--eval.max", "3"], "unrecognized arguments: --eval.max 3; did you mean --eval.max_iters or "
                          "--eval.max_new_tokens?"),
]
LORA_ERRORS = [  # PEFT's names of LoRA's settings
    (["--r", "16"], "unrecognized arguments: --r 16; did you mean --lora_r?"),
    (["--alpha=32"], "unrecognized arguments: --alpha=32; did you mean --lora_alpha?"),
    (["--use_rslora", "true"], "unrecognized arguments: --use_rslora true; rsLoRA's scale alpha / sqrt(r) is "
                               "--lora_alpha alpha × sqrt(r) here"),
    # a nested flag typed without its group (the difflib ratio of --epochs and --train.epochs is 0.73)
    (["--epochs", "3"], "unrecognized arguments: --epochs 3; did you mean --train.epochs?"),
    (["--max_steps", "5"], "unrecognized arguments: --max_steps 5; did you mean --train.max_steps?"),
    # litgpt's and HF Trainer's settings that have no flag here: what to do instead
    (["--train.gradient_accumulation_steps", "4"], "unrecognized arguments: --train.gradient_accumulation_steps 4; "
     "the accumulation follows from --train.global_batch_size / (--train.micro_batch_size × devices): set the global "
     "batch size"),
    (["--warmup_ratio", "0.03"], "unrecognized arguments: --warmup_ratio 0.03; HF's warmup_ratio is a fraction of "
                                 "the whole run: --train.lr_warmup_fraction takes a fraction of one epoch "
                                 "(warmup_ratio × epochs), or --train.lr_warmup_steps steps"),
    # PEFT's target_modules: the script's own --*_targets
    (["--target_modules", "all-linear"], "unrecognized arguments: --target_modules all-linear; did you mean "
                                         "--lora_targets?"),
    (["--logger", "wandb"], "unrecognized arguments: --logger wandb; did you mean --logger_name?"),
    (["--bf16", "true"], "unrecognized arguments: --bf16 true; did you mean --precision?"),
    (["--data.json_path", "d.json"], "unrecognized arguments: --data.json_path d.json; the data is prepared first "
                                     "with a scripts/prepare_*.py script, whose folder is --io.train_data_dir"),
    (["--use_dora", "true"], "unrecognized arguments: --use_dora true; DoRA is --lora_dora true (finetune/lora.py)"),
    # litgpt's positional checkpoint
    (["checkpoints/x/y"], "unrecognized arguments: checkpoints/x/y; values are given with their flag here: pass "
                          "--io.checkpoint_dir checkpoints/x/y"),
]
EVAL_ERRORS = [
    (["--checkpoint_dir", "x", "--output_path", "r.json"], "unrecognized arguments: --output_path r.json; did you "
                                                           "mean --save_filepath?"),
    (["x/y", "--eval_tasks", "arc_easy"], "unrecognized arguments: x/y; values are given with their flag here: pass "
                                          "--checkpoint_dir x/y"),
    (["--checkpoint_dir", "x", "--metadata", "notjson"],
     "--metadata: expected a JSON/YAML mapping such as '{\"key\": \"value\"}', got 'notjson'"),
    (["--checkpoint_dir", "x", "--precision", "17"],
     "--precision: expected 32-true, bf16-true, 16-true, bf16-mixed or 16-mixed, got '17'"),
]


@pytest.mark.parametrize("fn,args,expected", [(ether.setup, a, e) for a, e in ETHER_ERRORS]
                         + [(lora.setup, a, e) for a, e in LORA_ERRORS]
                         + [(lm_eval_harness.main, a, e) for a, e in EVAL_ERRORS])
def test_flag_errors_are_one_line(fn, args, expected, capsys, monkeypatch):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(fn, args=args)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {expected} (see --help)\n"


def test_eval_without_a_checkpoint_or_an_adapter_is_one_line(capsys, monkeypatch):
    """--checkpoint_dir is optional next to --adapter_path (the base its run recorded), required without it."""
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(lm_eval_harness.main, args=[])
    assert e.value.code == 1
    assert capsys.readouterr().err == ("error: --checkpoint_dir is required: pass a lit checkpoint directory (a merged "
                                       "model, or the base model of an --adapter_path).\n")


@pytest.mark.parametrize("name,text,expected", [
    ("c.yaml", "devices: two\n", "--devices: expected an integer, got 'two'"),
    # a misspelt key gets the option it was meant as, at the top or in a group, and the file is named
    ("c.yaml", "ether_bn: 4\n", "Option 'ether_bn' in --config {config} is not accepted: did you mean --ether_nb?"),
    ("c.yaml", "train:\n  max_seq_len: 128\n",
     "Option 'train.max_seq_len' in --config {config} is not accepted: did you mean --train.max_seq_length?"),
    ("c.yaml", "train:\n  max_steps: 2\nether_nb: 8\n  ether_dropout: 0.1\n",
     "--config {config} is not valid YAML: mapping values are not allowed in this context at line 4, column 16"),
    # a data preparation script's options (its --print_config), or the record of a prepared folder
    ("prep.yaml", "json_path: rows.json\ndestination_path: null\n",
     "--config {config} sets json_path, an option of scripts/prepare_json.py: run it with scripts/prepare_json.py"),
    ("prepare_config.yaml", "dataset: rows\nprompt_style: alpaca\nsplits:\n  train:\n    rows: 3\n",
     "--config {config} is the record of how the data in {folder} was prepared, not options of this script: pass "
     "that folder as --io.train_data_dir"),
])
def test_a_bad_value_or_key_in_a_config_file_is_one_line(tmp_path, capsys, monkeypatch, name, text, expected):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit):
        run_cli(ether.setup, args=["--config", str(tmp_path / name)])
    expected = expected.format(config=repr(str(tmp_path / name)), folder=repr(str(tmp_path)))
    assert capsys.readouterr().err == f"error: {expected} (see --help)\n"


@pytest.mark.parametrize("fn,recipe,expected", [
    (lora.setup, "ether.yaml", "sets Htype, an option of finetune/ether.py: run it with finetune/ether.py"),
    (full.setup, "lora.yaml", "sets lora_r, an option of finetune/lora.py: run it with finetune/lora.py"),
])
def test_a_recipe_given_to_another_finetune_script_names_the_script(fn, recipe, expected, capsys, monkeypatch):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    path = str(REPO / "config_hub" / "finetune" / "smollm2-135m" / recipe)
    with pytest.raises(SystemExit) as e:
        run_cli(fn, args=["--config", path])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: --config {path!r} {expected} (see --help)\n"


def test_lit_gpt_debug_shows_jsonargparses_whole_message(capsys, monkeypatch):
    monkeypatch.setenv("LIT_GPT_DEBUG", "1")
    with pytest.raises(SystemExit) as e:
        run_cli(ether.setup, args=["--oft_eps", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Does not validate against any of the Union subtypes" in err and "Given value: x" in err


def test_the_script_prints_one_line():
    r = subprocess.run([sys.executable, "finetune/ether.py", "--devices", "two"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "LIT_GPT_DEBUG"})
    assert r.returncode == 2 and r.stderr == "error: --devices: expected an integer, got 'two' (see --help)\n"


# ---------------------------------------------------------------------------------------------- export tokenizer
def test_export_without_tokenizer_files_warns(tmp_path, capsys):
    from lit_gpt.convert_hf import convert_lit_checkpoint

    base = make_base(tmp_path / "base")
    convert_lit_checkpoint(base, tmp_path / "hf")
    assert "warning" not in capsys.readouterr().err

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("lit_model.pth", "model_config.yaml", "generation_config.json"):
        shutil.copy(base / name, bare)
    convert_lit_checkpoint(bare, tmp_path / "hf-bare")
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the checkpoint folder {str(bare)!r} has no tokenizer files") and err.count(
        "\n") == 1
    assert "AutoTokenizer" in err and "tokenizer.json, tokenizer.model" in err and "tokenizer_config.json" in err
    assert "copy the tokenizer files from the original model folder" in err and str(tmp_path / "hf-bare") in err

    shutil.copy(base / "tokenizer.json", bare)  # a vocabulary, but no tokenizer_config.json
    convert_lit_checkpoint(bare, tmp_path / "hf-no-config")
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the checkpoint folder {str(bare)!r} has tokenizer.json but no "
                          "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------- offline eval data
class _UnreachableHub:
    """A TaskManager whose task data `datasets` cannot fetch (what an offline machine gets)."""

    def __init__(self, reason: str):
        self.reason = reason

    def load(self, names):
        raise ConnectionError(f"Couldn't reach 'allenai/ai2_arc' on the Hub ({self.reason})")


def test_an_unreachable_hub_is_one_sentence_naming_task_dataset_and_fix(monkeypatch):
    for key in lm_eval_harness.OFFLINE_SWITCHES:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(lm_eval_harness.TaskDataError) as e:
        lm_eval_harness._load_tasks(_UnreachableHub("LocalEntryNotFoundError"), ["arc_easy"])
    message = str(e.value)
    assert "\n" not in message and message.startswith("Could not load the data of task(s) arc_easy: the dataset "
                                                      "'allenai/ai2_arc' is not in the Hugging Face datasets cache")
    assert "offline" in message and "HF_HUB_OFFLINE=1" in message and "--include_path" in message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lm_eval_harness.TaskDataError) as e:
        lm_eval_harness._load_tasks(_UnreachableHub("OfflineModeIsEnabled"), ["arc_easy"], ["HF_HUB_OFFLINE"])
    assert "the dataset 'allenai/ai2_arc' is not in the Hugging Face datasets cache, and HF_HUB_OFFLINE=1 turns " \
           "off" in str(e.value)


def test_a_litgpt_finetune_config_gets_every_change_it_needs_in_one_sentence(tmp_path, capsys, monkeypatch):
    """A litgpt YAML took six runs, one refused key each, before the real fix (prepare the data) appeared."""
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    config = tmp_path / "lora.yaml"
    config.write_text("checkpoint_dir: checkpoints/org/model\nout_dir: out/lora\nprecision: bf16-true\nquantize:\n"
                      "lora_r: 8\ndata:\n  class_path: litgpt.data.JSON\n  init_args:\n    json_path: data.json\n"
                      "train:\n  global_batch_size: 16\n  max_tokens:\n  epochs: 1\nlogger_name: csv\n")
    with pytest.raises(SystemExit) as e:
        run_cli(lora.setup, args=["--config", str(config)], finetune_script="finetune/lora.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --config {str(config)!r} is a litgpt config (litgpt.data.JSON): prepare its data with `python "
        "scripts/prepare_json.py --json_path data.json --checkpoint_dir checkpoints/org/model` and pass the folder it "
        "writes as io.train_data_dir; move checkpoint_dir and out_dir under io: (io.checkpoint_dir, io.out_dir); "
        "delete train.max_tokens (no setting here; see --help).\n")
