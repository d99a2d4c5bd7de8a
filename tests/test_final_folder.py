"""After training, a run leaves a model folder chat, generate and eval take at once: a full fine-tuning run its
`final/` (litgpt's `finetune_full` layout), an adapter run with `--merge true` its `merged/`, the very folder
`scripts/merge_*.py` writes. The folders survive resumes and interrupted writes whole.

The tiny model, tokenizer and prepared data are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT, Tokenizer
from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.data import prompt_style_from_name
from lit_gpt.generate import generate
from lit_gpt.merge import load_finetuned, merge_checkpoint
from lit_gpt.training import write_final_folder
from lit_gpt.utils import check_checkpoint_dir, load_file
from test_after_training import load_script
from test_training import REPO, run_cli, tiny_ckpt  # noqa: F401 (tiny_ckpt is a fixture)

FINETUNED = "lit_model_finetuned.pth"
GREEDY = ["--temperature", "0", "--max_new_tokens", "6", "--precision", "32-true", "--device", "cpu"]


def train(script: str, out: Path, ckpt: Path, steps: int = 2, save_interval: int = 1000, lr: float = 1e-2, **kwargs):
    module = importlib.import_module(script)
    return module.setup(io=IOArgs(train_data_dir=ckpt / "data", out_dir=out),
                        train=TrainArgs(learning_rate=lr, max_steps=steps, save_interval=save_interval,
                                        global_batch_size=1, micro_batch_size=1, lr_warmup_steps=1),
                        eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0), precision="32-true", **kwargs)


def folder_contents(folder: Path) -> dict:
    """Every file of a checkpoint folder: the tensors of lit_model.pth, the text of the others."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            key = str(p.relative_to(folder))
            out[key] = load_file(p, mmap=False) if p.suffix == ".pth" else p.read_text()
    return out


def assert_same_folder(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        else:
            assert a[key] == b[key], key


def copy_of(run: Path, dest: Path, base: Path) -> Path:
    """A copy of a full run, its final/ written again for the copy's weights (hard-linked, naming them)."""
    shutil.copytree(run, dest)
    write_final_folder(dest, dest / FINETUNED, base, log=lambda s: None)
    return dest


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def full_run(tiny_ckpt, tmp_path_factory) -> Path:
    """Four steps of full fine-tuning, with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("full") / "run"
    train("full", out, tiny_ckpt, steps=4, save_interval=2)
    return out


# ---------------------------------------------------------------------------------------------- final/
def test_a_full_run_leaves_final_the_folder_merge_writes_with_the_weights_once_on_disk(full_run, tiny_ckpt, tmp_path):
    final = full_run / "final"
    assert (final / "lit_model.pth").samefile(full_run / FINETUNED)  # a hard link: the weights take their space once
    hp = yaml.safe_load((full_run / "hyperparameters.yaml").read_text())
    trained = hp["prompt_style"]["prompt_style"]
    assert trained == "alpaca"
    assert yaml.safe_load((final / "prompt_style.yaml").read_text()) == {"prompt_style": trained}
    # exactly what the merge routine writes for the run's weights
    merged = merge_checkpoint(full_run / FINETUNED, out_dir=tmp_path / "merged", probe=False, log=lambda s: None)
    assert_same_folder(folder_contents(final), folder_contents(merged))
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json", "prompt_style.yaml",
            "merge_info.yaml"} <= set(os.listdir(final))

    # a checkpoint on its own: the logits of the base with the fine-tuned state dict, not the base's
    tokens = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = GPT.from_checkpoint(final).eval()(tokens)
        expected = load_finetuned(tiny_ckpt, full_run / FINETUNED)(tokens)
        base = GPT.from_checkpoint(tiny_ckpt).eval()(tokens)
    assert torch.equal(ours, expected) and not torch.allclose(ours, base)


@pytest.mark.slow
def test_generate_and_chat_take_final_and_prompt_with_the_trained_format(full_run, tiny_ckpt):
    prompt = "Add 2 and 3."
    model, tokenizer = load_finetuned(tiny_ckpt, full_run / FINETUNED), Tokenizer(tiny_ckpt)
    ids = tokenizer.encode(prompt_style_from_name("alpaca").apply(prompt))  # the format the data was prepared in
    answer = tokenizer.decode(generate(model, ids, 6, temperature=0, eos_id=tokenizer.stop_ids, include_prompt=False))
    final = str(full_run / "final")
    r = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint_dir", final, "--prompt", prompt, *GREEDY],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer + "\n"
    r = subprocess.run([sys.executable, "chat/base.py", "--checkpoint_dir", final, *GREEDY], input=prompt + "\n",
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer + "\n"


def test_the_run_folder_given_as_a_model_names_its_model_folder(full_run):
    with pytest.raises(ValueError) as e:
        check_checkpoint_dir(full_run)  # what chat/base.py, eval and GPT.from_checkpoint check
    assert str(e.value) == (f"{str(full_run)!r} is a fine-tuning run, not a model: pass its model folder, "
                            f"{str(full_run / 'final')!r}, instead.")
    sys.path.insert(0, str(REPO / "scripts"))
    import generate as generate_script

    with pytest.raises(ValueError, match=rf"pass its model folder, --checkpoint_dir {full_run / 'final'}\.$"):
        generate_script.check_model_dir(full_run)


def test_litgpts_positional_run_folder_is_answered_with_its_model_folder(full_run, capsys, monkeypatch):
    """`litgpt chat out/finetune/full/final` spelt without the flag, or with the run folder: chat's error names the
    --checkpoint_dir of the run's final/ (not its weights file as an adapter)."""
    from lit_gpt.cli import run_cli as run_in_process

    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    sys.path.insert(0, str(REPO / "scripts"))
    import generate as generate_script

    with pytest.raises(SystemExit):
        run_in_process(generate_script.main, args=[str(full_run)])
    assert capsys.readouterr().err == (f"error: unrecognized arguments: {full_run}; values are given with their flag "
                                       f"here: pass --checkpoint_dir {full_run / 'final'} (see --help)\n")
    # and the run's hyperparameters.yaml given as --config (a run's settings are not the model's)
    hparams = full_run / "hyperparameters.yaml"
    with pytest.raises(SystemExit):
        run_in_process(generate_script.main, args=["--config", str(hparams)],
                       run_config_fix=generate_script.RUN_CONFIG_FIX)
    assert capsys.readouterr().err == (f"error: --config {str(hparams)!r} is a training run's hyperparameters.yaml, "
                                       "which only finetune/full.py takes (to repeat or vary the run): pass its model "
                                       f"folder, --checkpoint_dir {full_run / 'final'}.\n")


# ---------------------------------------------------------------------------------------------- resumes
def test_resuming_a_finished_full_run_replaces_final_whole_and_keeps_what_else_is_in_it(full_run, tiny_ckpt,
                                                                                         tmp_path):
    run = copy_of(full_run, tmp_path / "run", tiny_ckpt)
    before = folder_contents(run / "final")
    (run / "final" / "eval").mkdir()
    (run / "final" / "eval" / "results.json").write_text("{}")  # what eval wrote for the model folder
    (run / "final" / "stale.txt").write_text("")
    train("full", run, tiny_ckpt, steps=4, save_interval=2, resume="auto")  # no last-step checkpoint: 3-4 again
    after = folder_contents(run / "final")
    assert after.pop("eval/results.json") == "{}" and after.pop("stale.txt") == ""
    assert_same_folder(after, before)  # the same steps again: the same weights
    assert (run / "final" / "lit_model.pth").samefile(run / FINETUNED)
    assert leftovers(run) == []


def test_a_branch_from_an_earlier_checkpoint_sets_final_aside_with_the_final_file(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    train("full", run, tiny_ckpt, steps=6, save_interval=2)
    old = folder_contents(run / "final")
    # a branch: another learning rate from step 2 on
    train("full", run, tiny_ckpt, steps=6, save_interval=2, lr=3e-2,
          resume=str(run / "checkpoints" / "step-000002.pth"))
    [aside] = (run / "superseded").iterdir()
    assert (aside / "final" / "lit_model.pth").samefile(aside / FINETUNED)
    assert_same_folder(folder_contents(aside / "final"), old)
    new = folder_contents(run / "final")
    assert not torch.equal(new["lit_model.pth"]["lm_head.weight"], old["lit_model.pth"]["lm_head.weight"])


# ---------------------------------------------------------------------------------------------- interrupted writes
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_write_that_fails_part_way_leaves_no_half_folder(full_run, tiny_ckpt, tmp_path, monkeypatch, failure):
    run = copy_of(full_run, tmp_path / "run", tiny_ckpt)
    before = folder_contents(run / "final")

    def fail(*args, **kwargs):  # the tokenizer files are copied after the weights and the config are written
        raise failure

    monkeypatch.setattr("lit_gpt.merge.shutil.copyfile", fail)
    with pytest.raises(type(failure)):
        write_final_folder(run, run / FINETUNED, tiny_ckpt)
    assert_same_folder(folder_contents(run / "final"), before)  # the earlier folder, whole
    assert leftovers(run) == []
    shutil.rmtree(run / "final")
    with pytest.raises(type(failure)):
        write_final_folder(run, run / FINETUNED, tiny_ckpt)
    assert not (run / "final").exists() and leftovers(run) == []  # no folder rather than half of one


def test_a_killed_writers_leftovers_are_cleared_and_a_folder_caught_between_renames_comes_back(full_run, tiny_ckpt,
                                                                                                 tmp_path):
    run = copy_of(full_run, tmp_path / "run", tiny_ckpt)
    before = folder_contents(run / "final")
    (run / "final" / "eval").mkdir()
    (run / "final" / "eval" / "results.json").write_text("{}")
    # SIGKILL while a new folder was written, then one between the two renames of a swap (the earlier folder aside)
    (run / ".final.k1ll3d.new").mkdir()
    (run / ".final.k1ll3d.new" / "lit_model.pth").write_bytes(b"half")
    os.replace(run / "final", run / ".final.sw4p.old")
    write_final_folder(run, run / FINETUNED, tiny_ckpt)
    after = folder_contents(run / "final")
    assert after.pop("eval/results.json") == "{}"  # the earlier folder came back, then was replaced as usual
    assert_same_folder(after, before)
    assert leftovers(run) == []


# ---------------------------------------------------------------------------------------------- --merge
@pytest.mark.parametrize("script,kwargs", [("ether", dict(ether_nb=4, Htype="etherplus")), ("lora", dict(lora_r=4))])
def test_merge_true_writes_what_the_merge_script_writes_afterwards(tiny_ckpt, tmp_path, script, kwargs):
    run = tmp_path / "run"
    train(script, run, tiny_ckpt, merge=True, **kwargs)
    assert yaml.safe_load((run / "hyperparameters.yaml").read_text())["merge"] is True
    ours = folder_contents(run / "merged")
    shutil.rmtree(run / "merged")
    # what the merge script runs with its default flags (the script as a whole: the --resume test below)
    merge_script = load_script(f"scripts/merge_{script}.py")
    assert merge_script.main(adapter_path=run / f"lit_model_{script}_finetuned.pth") == run / "merged"
    assert_same_folder(ours, folder_contents(run / "merged"))


def test_merge_is_off_by_default_and_does_nothing_on_a_dry_run(tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    train("ether", run, tiny_ckpt, ether_nb=4)
    assert not (run / "merged").exists() and not (run / "final").exists()
    train("ether", tmp_path / "dry", tiny_ckpt, ether_nb=4, merge=True, dry_run=True)
    assert not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_merge_true_with_resume_merges_a_finished_run_once(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    train("ether", run, tiny_ckpt, ether_nb=4)
    assert not (run / "merged").exists()
    # the run's recorded flags, --merge true on top: the finished run is not trained again, only merged
    r = run_cli("ether.py", "--resume", "auto", "--io.out_dir", str(run), "--merge", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished" in r.stdout and f"wrote {str(run / 'merged')!r}" in r.stdout + r.stderr
    assert check_checkpoint_dir(run / "merged")
    stamp = (run / "merged" / "lit_model.pth").stat().st_mtime_ns
    r = run_cli("ether.py", "--resume", "auto", "--io.out_dir", str(run), "--merge", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already holds the merge" in r.stdout + r.stderr
    assert (run / "merged" / "lit_model.pth").stat().st_mtime_ns == stamp


def test_a_merge_of_an_earlier_final_file_is_not_offered_as_the_run_s_model(tiny_ckpt, tmp_path, capsys):
    """A run merged with --merge true, then trained on with --merge false (a resume with more steps, another rate):
    merged/ holds the earlier adapter's merge. The run folder's hints no longer name it, and the run says so."""
    from lit_gpt.utils import run_model_folder

    run = tmp_path / "run"
    train("ether", run, tiny_ckpt, steps=2, save_interval=1, ether_nb=4, merge=True)
    assert run_model_folder(run) == run / "merged"
    capsys.readouterr()
    train("ether", run, tiny_ckpt, steps=3, save_interval=1, ether_nb=4, resume="auto")
    err = capsys.readouterr().err
    final = run / "lit_model_ether_finetuned.pth"
    assert (f"warning: {run / 'merged'} holds a merge of the run's earlier {final.name}, not of this one: merge again "
            f"(--resume auto --merge true, or python scripts/merge_ether.py --adapter_path {final}).") in err
    assert run_model_folder(run) is None
    with pytest.raises(ValueError, match="pass --adapter_path"):  # not the stale merged/
        load_script("scripts/generate.py").check_model_dir(run)
