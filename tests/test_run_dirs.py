"""A run directory holds one run: a new run never mixes into another's (whose checkpoints `--resume auto` would take
for its own), a resume goes on in the directory of the run it resumes, and a branch from an earlier checkpoint sets
the old branch's later files aside instead of leaving them for `--resume auto` (or deleting them).

The tiny model, tokenizer and prepared data are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt.utils import load_file
from test_training import final_tensors, tiny_ckpt  # noqa: F401 (tiny_ckpt is a fixture)
from test_training_inputs import csv_rows, setup_ether

TRAIN = dict(learning_rate=1e-2, max_steps=6, save_interval=2, lr_warmup_steps=1)


def in_log_dir(tiny_ckpt: Path, log_dir: Path, train: dict, **kwargs):
    """A run whose directory is the default one under `log_dir` (named after the method, lr and batch size)."""
    import ether

    from lit_gpt.args import EvalArgs, IOArgs, TrainArgs

    t = dict(global_batch_size=1, micro_batch_size=1, **train)
    return ether.setup(io=IOArgs(train_data_dir=tiny_ckpt / "data", checkpoint_dir=tiny_ckpt, log_dir=log_dir),
                       train=TrainArgs(**t), eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0), ether_nb=4,
                       precision="32-true", **kwargs)


def steps_of(run: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pth"))


@pytest.fixture
def finished(tiny_ckpt, tmp_path) -> Path:
    run = tmp_path / "run"
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=TRAIN)
    assert steps_of(run) == [2, 4, 6] and (run / "lit_model_ether_finetuned.pth").is_file()
    return run


def test_a_new_run_in_the_directory_of_another_is_refused(finished, tiny_ckpt, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as e:
        setup_ether(tiny_ckpt / "data", finished, ckpt=tiny_ckpt, train=TRAIN)
    assert str(e.value) == (
        f"{str(finished)!r} already holds a run (checkpoints up to step 6 and lit_model_ether_finetuned.pth): continue "
        "it with --resume auto (a checkpoint: --resume PATH), or pass another --io.out_dir for a new run (or delete "
        "that folder to start it over).")
    # resuming a checkpoint of another run into it is a new run too
    other = tmp_path / "other"
    setup_ether(tiny_ckpt / "data", other, ckpt=tiny_ckpt, train=dict(TRAIN, max_steps=2))
    with pytest.raises(ValueError, match="already holds a run .*: resume .*step-000002.pth' into a new --io.out_dir"):
        setup_ether(tiny_ckpt / "data", finished, ckpt=tiny_ckpt, train=TRAIN,
                    resume=str(other / "checkpoints" / "step-000002.pth"))
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == before  # untouched
    # a folder that only has the logs of a run that died before its first checkpoint is free to use
    (tmp_path / "died" / "logs").mkdir(parents=True)
    setup_ether(tiny_ckpt / "data", tmp_path / "died", ckpt=tiny_ckpt, train=dict(TRAIN, max_steps=1))


def test_a_finished_run_without_checkpoints_is_not_redone_by_resume_auto(finished, tiny_ckpt):
    """A full fine-tune does not checkpoint its last step, and users delete checkpoints/ to free disk: `--resume
    auto` (a requeue script passes it every time) would find nothing and train the finished run again over it."""
    import shutil

    shutil.rmtree(finished / "checkpoints")
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    for resume in (None, "auto"):
        with pytest.raises(ValueError) as e:
            setup_ether(tiny_ckpt / "data", finished, ckpt=tiny_ckpt, train=TRAIN, resume=resume)
        assert str(e.value) == (
            f"{str(finished)!r} holds a finished run (lit_model_ether_finetuned.pth) and no checkpoint to go on from: "
            "pass another --io.out_dir for a new run (or delete that folder to start it over).")
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == before


def test_a_run_directory_that_is_a_file_is_refused_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch):
    from lit_gpt import training

    monkeypatch.setattr(training, "load_model_weights", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"^--io\.out_dir '.*a-file' is an existing file; pass a folder to write "):
        setup_ether(tiny_ckpt / "data", tmp_path / "a-file", ckpt=tiny_ckpt)
    with pytest.raises(ValueError, match=r"^--io\.out_dir '.*a-file/run' cannot be created because '.*a-file' is a "
                                         r"file; pass a folder"):
        setup_ether(tiny_ckpt / "data", tmp_path / "a-file" / "run", ckpt=tiny_ckpt)
    with pytest.raises(ValueError, match=r"^--io\.log_dir '.*a-file' is an existing file; pass a folder"):
        in_log_dir(tiny_ckpt, tmp_path / "a-file", TRAIN)


def test_a_branch_from_an_earlier_checkpoint_sets_the_later_files_aside(finished, tiny_ckpt, capsys):
    """Resuming step 2 with a new learning rate: steps 4 and 6 and the final file of the first branch move to
    superseded/<time>/ (with its metrics and flags); `--resume auto` after a crash then goes on with this branch,
    and the finished branch is the one in the run directory."""
    whole = final_tensors(finished)
    branch = dict(TRAIN, learning_rate=3e-2)
    setup_ether(tiny_ckpt / "data", finished, ckpt=tiny_ckpt, train=branch,
                resume=str(finished / "checkpoints" / "step-000002.pth"))
    out = capsys.readouterr().out
    aside, = (finished / "superseded").iterdir()
    assert f"Resuming step 2 of a run that went further: its later checkpoints, final file and metrics are now in " \
           f"{aside}." in out
    assert steps_of(aside) == [4, 6] and steps_of(finished) == [2, 4, 6]
    kept = final_tensors(aside)
    assert set(kept) == set(whole) and all(torch.equal(kept[k], whole[k]) for k in whole)  # the first branch's
    assert "6" in {r["step"] for r in csv.DictReader((aside / "metrics.csv").open(newline=""))}
    assert yaml.safe_load((aside / "hyperparameters.yaml").read_text())["train"]["learning_rate"] == 1e-2
    assert yaml.safe_load((finished / "hyperparameters.yaml").read_text())["train"]["learning_rate"] == 3e-2
    assert not any(torch.equal(final_tensors(finished)[k], whole[k]) for k in whole)  # this branch's
    setup_ether(tiny_ckpt / "data", finished, ckpt=tiny_ckpt, train=branch, resume="auto")
    assert "already finished" in capsys.readouterr().out


def test_a_resume_goes_on_in_the_directory_of_its_checkpoint(tiny_ckpt, tmp_path, capsys):
    """The default run directory names the learning rate: resuming a checkpoint with a new one stays in the
    checkpoint's directory, and `--resume auto` that finds nothing there says where the run with the old rate is."""
    logs = tmp_path / "logs"
    in_log_dir(tiny_ckpt, logs, dict(TRAIN, max_steps=4))
    run, = logs.iterdir()
    assert "_lr0.01_" in run.name
    capsys.readouterr()
    in_log_dir(tiny_ckpt, logs, dict(TRAIN, learning_rate=5e-3), resume="auto")
    out = capsys.readouterr().out
    assert ("starting from step 0 (the default --io.out_dir names the learning rate, LoRA+ ratio and batch size; to "
            "resume the "
            f"run with new ones, pass its folder as --io.out_dir: {run})") in out
    fresh = next(d for d in logs.iterdir() if d != run)
    in_log_dir(tiny_ckpt, logs, dict(TRAIN, learning_rate=2e-3), resume=str(run / "checkpoints" / "step-000004.pth"))
    assert sorted(logs.iterdir()) == sorted([run, fresh])  # no third directory
    assert steps_of(run) == [2, 4, 6]
    assert [int(r["step"]) for r in csv_rows(run) if r["loss"]] == [1, 2, 3, 4, 5, 6]
    previous, = (run / "logs").glob("hyperparameters.until-step-*.yaml")  # the flags of steps 1-4, kept
    assert previous.name == "hyperparameters.until-step-000004.yaml"
    assert yaml.safe_load(previous.read_text())["train"]["learning_rate"] == 1e-2
    assert load_file(run / "checkpoints" / "step-000006.pth", mmap=False)["train"]["learning_rate"] == 2e-3


def test_partly_written_files_of_a_killed_writer_are_removed_on_resume(finished, tiny_ckpt, capsys):
    """A save killed outright (OOM killer, a scheduler's kill after its grace period) leaves atomic_path's temporary
    file, as large as a checkpoint; the next start in the run directory removes it, and only such files."""
    partial = finished / "checkpoints" / ".step-000008.pth.k3x9_q.tmp"
    partial.write_bytes(b"\0" * 2**20)
    users = [finished / "checkpoints" / ".notes.tmp", finished / ".step-000008.pth.tmp"]
    for path in users:
        path.write_text("the user's")
    capsys.readouterr()
    setup_ether(tiny_ckpt / "data", finished, ckpt=tiny_ckpt, train=dict(TRAIN, max_steps=8), resume="auto")
    assert not partial.exists() and all(p.is_file() for p in users)
    assert ("Removed 1 partly written file of a process killed while saving (checkpoints/.step-000008.pth.k3x9_q.tmp,"
            " 1.0 MiB).") in capsys.readouterr().out
    assert steps_of(finished) == [2, 4, 6, 8]
