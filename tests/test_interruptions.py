"""What interrupts a run costs nothing but the steps since its last checkpoint: Ctrl-C and SIGTERM (a scheduler's
preemption) stop it after the step in progress, with a checkpoint of that step, on every rank, and `--resume auto` then
ends where an uninterrupted run would; a checkpoint rank 0 cannot write (a full disk) stops every rank with one
sentence naming the file and the intact checkpoint before it.

The tiny model, tokenizer and prepared data are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_gpt.utils import load_file
from test_training import REPO, common_flags, final_tensors, tiny_ckpt  # noqa: F401 (tiny_ckpt is a fixture)
from test_training_inputs import setup_ether

TRAIN = dict(learning_rate=1e-2, max_steps=6, save_interval=100, lr_warmup_steps=1)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*.pth"))


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_ends_where_an_unstopped_run_does(
        tiny_ckpt, tmp_path, monkeypatch, capfd):
    from lit_gpt import training

    setup_ether(tiny_ckpt / "data", tmp_path / "whole", ckpt=tiny_ckpt, train=TRAIN)

    update = training._progress.update

    def update_and_signal(self, m):  # SIGTERM arrives while step 2 is being logged: step 3 is the last one
        update(self, m)
        if m["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training._progress, "update", update_and_signal)
    previous = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "stopped"
    capfd.readouterr()
    with pytest.raises(training.TrainingStopped) as stopped:
        setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=TRAIN)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the caller's again
    out = capfd.readouterr()
    assert "SIGTERM received: the run stops after the step in progress" in out.err
    assert f"Stopped by SIGTERM after step 3 of 6, with a checkpoint of it: {run / 'checkpoints' / 'step-000003.pth'}"\
           in out.out
    assert checkpoints(run) == ["step-000003.pth"] and not (run / "lit_model_ether_finetuned.pth").exists()

    monkeypatch.setattr(training._progress, "update", update)
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=TRAIN, resume="auto")
    a, b = final_tensors(tmp_path / "whole"), final_tensors(run)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metric_rows(run: Path, key: str) -> list[tuple[int, float]]:
    import csv

    with open(run / "logs" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.parametrize("when", ["in-the-step-before", "in-the-validation", "in-the-final-validation"])
def test_a_stop_at_a_validation_step_leaves_it_to_the_resume(tiny_ckpt, tmp_path, monkeypatch, capfd, when):
    """A stop does not wait for a validation due at its step (a long one could outlast a scheduler's grace period):
    the checkpoint says that validation did not run, and `--resume auto` runs it before anything else; the logs end
    as an unstopped run's, each validation once (the final one too: a stop during it leaves no final file until the
    resume writes it)."""
    from lit_gpt import training

    train, eval = dict(TRAIN), dict(interval=2, max_iters=4)  # 4 batches per validation: steps 2, 4 and 6
    setup_ether(tiny_ckpt / "data", tmp_path / "whole", ckpt=tiny_ckpt, train=train, eval=eval)

    at_step = 6 if when == "in-the-final-validation" else 2
    update, stop_requested, calls = training._progress.update, training.stop_requested, []

    def update_and_signal(self, m):  # logging step 1: step 2's all-reduce carries it
        update(self, m)
        if m["step"] == 1 and when == "in-the-step-before":
            os.kill(os.getpid(), signal.SIGTERM)

    def signal_in_the_validation(fabric, stop):  # after the first batch of step `at_step`'s
        calls.append(stop)
        if len(calls) == 2 + 4 * (at_step // 2 - 1) and when != "in-the-step-before":
            os.kill(os.getpid(), signal.SIGTERM)
        return stop_requested(fabric, stop)

    monkeypatch.setattr(training._progress, "update", update_and_signal)
    monkeypatch.setattr(training, "stop_requested", signal_in_the_validation)
    run = tmp_path / "stopped"
    with pytest.raises(training.TrainingStopped):
        setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=train, eval=eval)
    assert f"Stopped by SIGTERM after step {at_step} of 6" in capfd.readouterr().out
    assert checkpoints(run) == [f"step-{at_step:06d}.pth"] and not (run / "lit_model_ether_finetuned.pth").exists()
    assert load_file(run / "checkpoints" / f"step-{at_step:06d}.pth", mmap=False)["validated"] is False
    assert [s for s, _ in metric_rows(run, "val_loss")] == list(range(2, at_step, 2))  # not the one cut short

    monkeypatch.setattr(training._progress, "update", update)
    monkeypatch.setattr(training, "stop_requested", stop_requested)
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=train, eval=eval, resume="auto")
    assert f"step {at_step}: val loss" in capfd.readouterr().err
    assert metric_rows(run, "val_loss") == pytest.approx(metric_rows(tmp_path / "whole", "val_loss"), abs=1e-6)
    assert metric_rows(run, "loss") == metric_rows(tmp_path / "whole", "loss")
    a, b = final_tensors(tmp_path / "whole"), final_tensors(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and once finished, it says so (the last-step checkpoint, as any finished run's, is after the final validation)
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=train, eval=eval, resume="auto")
    assert "already finished" in capfd.readouterr().out


def test_the_stop_signals_and_a_second_one(capfd):
    """SIGUSR1 (SLURM's `--signal=USR1@90` warning before the time limit) asks for a stop as SIGTERM and Ctrl-C do;
    the same signal again acts at once (a second Ctrl-C raises KeyboardInterrupt); leaving restores the handlers."""
    from lit_gpt.training import StopRequest

    before = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    assert signal.SIGUSR1 in before
    def handled(stop, sig) -> bool:
        """Send `sig` to this process and wait (boundedly) until its handler ran: in a process with other threads
        (torch's) the signal may arrive on one of them, and Python runs the handler a little later."""
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 10
        while stop.signum != sig and time.monotonic() < deadline:
            time.sleep(0.01)
        return stop.signum == sig

    with StopRequest(announce=False) as stop:
        assert handled(stop, signal.SIGUSR1)
    with StopRequest() as stop:
        assert handled(stop, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # (interrupted as soon as the handler runs)
    assert {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS} == before
    assert capfd.readouterr().err.count("SIGINT received: the run stops after the step in progress") == 1


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "finetune" / "ether.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, LIT_GPT_NO_PROGRESS="1", **env))


def signal_when_logged(proc: subprocess.Popen, run: Path, sig: int, timeout: float = 120) -> tuple[str, str]:
    """Send `sig` to `proc` once the run has logged a step; then its output."""
    metrics = run / "logs" / "metrics.csv"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the run logged no step: {err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def stopped_step(out: str, sig: str) -> int:
    line = next(line for line in out.splitlines() if line.startswith(f"Stopped by {sig} after step"))
    return int(line.split("after step ")[1].split()[0])


@pytest.mark.slow
def test_ctrl_c_from_the_command_line_stops_with_a_checkpoint_and_exit_130(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    flags = common_flags(tiny_ckpt, run, 100000, **{"--train.global_batch_size": "1"})
    proc = start([*flags, "--ether_nb", "4"], {})
    out, err = signal_when_logged(proc, run, signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = stopped_step(out, "SIGINT")
    assert checkpoints(run) == [f"step-{step:06d}.pth"]
    assert load_file(run / "checkpoints" / f"step-{step:06d}.pth", mmap=False)["step"] == step
    # (--resume auto from it: the in-process test above)


@pytest.mark.slow
def test_sigterm_to_rank_0_stops_both_fsdp_processes_after_the_same_step(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    # a validation of 4 batches per rank after every step: the signal lands in a step or in a validation, and either
    # way rank 1 learns it in an all-reduce (the step's loss, or the one before each validation batch)
    flags = common_flags(tiny_ckpt, run, 100000, **{"--devices": "2", "--train.global_batch_size": "2",
                                                     "--eval.interval": "1", "--eval.max_iters": "4"})
    proc = start([*flags, "--ether_nb", "4"], dict(CUDA_VISIBLE_DEVICES=""))
    out, err = signal_when_logged(proc, run, signal.SIGTERM)  # to rank 0 only
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    step = stopped_step(out, "SIGTERM")
    assert checkpoints(run) == [f"step-{step:06d}.pth"]
    saved = load_file(run / "checkpoints" / f"step-{step:06d}.pth", mmap=False)
    assert saved["step"] == step and saved["model"]  # gathered from both shards
    assert saved["validated"] is False  # (a step due for validation, as every step is here)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds rank 1 through /proc")
def test_a_rank_killed_outright_stops_the_other_in_one_line_naming_the_checkpoint(tiny_ckpt, tmp_path):
    """The OOM killer ends rank 1 without a word: rank 0 learns it in the next collective, and says so in one line
    with the intact checkpoint, instead of gloo's traceback of a hundred lines."""
    run = tmp_path / "run"
    flags = common_flags(tiny_ckpt, run, 100000, **{"--devices": "2", "--train.global_batch_size": "2",
                                                     "--train.save_interval": "1"})
    proc = start([*flags, "--ether_nb", "4"], dict(CUDA_VISIBLE_DEVICES=""))
    metrics, deadline = run / "logs" / "metrics.csv", time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    rank1 = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").is_file()
             and _parent_pid(p) == proc.pid]
    assert len(rank1) == 1, "rank 1 not found"
    os.kill(rank1[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Another process of the run ended without a word while rank 0 waited for it: "
                           "rank 1 was killed by SIGKILL, as the system's out-of-memory killer does; the last "
                           "complete checkpoint, "), last
    named = Path(last.split("checkpoint, ")[1].split(", is intact")[0])
    assert named.is_file() and load_file(named, mmap=False)["model"]


_WATCHED = """
import subprocess, sys, time
from lightning.fabric.strategies.launchers import subprocess_script
from lit_gpt.training import launch
subprocess_script._ChildProcessObserver.__init__.__defaults__ = (0.05,)  # Lightning polls every 5 s

class Fabric:  # what fabric.launch() does for rank 0 of a two-device run, with a rank 1 that is killed at once
    def launch(self):
        killed = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
        self.other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        subprocess_script._launch_process_observer([killed, self.other])

fabric = Fabric()
launch(fabric, grace=float(sys.argv[1]))
fabric.other.wait(timeout=20)
print("other:", fabric.other.returncode, flush=True)
time.sleep(float(sys.argv[2]))  # rank 0 learning of it in a collective, then exiting
"""


@pytest.mark.skipif(sys.platform == "win32", reason="Lightning's watcher sends SIGTERM there")
@pytest.mark.parametrize("grace, exits_after, code", [(30, 0.5, 0), (0.3, 60, -signal.SIGKILL)])
def test_the_watcher_of_a_killed_rank_lets_rank_0_exit_on_its_own_then_kills_it(grace, exits_after, code):
    """Lightning's watcher kills the other processes at once, and rank 0 only after `grace` seconds: time to name
    the intact checkpoint (before, a watcher's poll right after the death ended rank 0 with -9 and no word)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _WATCHED, str(grace), str(exits_after)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert f"other: {-signal.SIGKILL}" in proc.stdout  # the other processes: not kept waiting
    assert time.monotonic() - started < 50


@pytest.mark.skipif(sys.platform == "win32", reason="processes end by POSIX signals here")
def test_rank_0_says_how_the_processes_it_launched_ended(monkeypatch):
    """What rank 0's one line says of the other ranks (their exit code or signal), from the processes Fabric's
    launcher started; nothing when none has ended within the wait, nor of one the launcher's watcher killed."""
    from types import SimpleNamespace

    from lit_gpt import training
    from lit_gpt.training import how_peers_ended

    def fabric(*codes):
        procs = [subprocess.Popen([sys.executable, "-c", code]) for code in codes]
        return SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=procs)), node_rank=0), procs

    f, procs = fabric("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "import time; time.sleep(30)",
                      "raise SystemExit(3)")
    for p in (procs[0], procs[2]):
        p.wait(timeout=30)
    assert how_peers_ended(f) == ("rank 1 was killed by SIGSEGV, a crash whose stack is printed above; "
                                  "rank 3 exited with code 3, after the error printed above")
    procs[1].kill()
    procs[1].wait()
    monkeypatch.setattr(training, "_STOPPED_BY_WATCHER", {procs[1].pid})  # (killed by the watcher, not by the OS)
    assert how_peers_ended(f).startswith("rank 1 was killed by SIGSEGV, a crash whose stack is printed above; rank 3")
    assert how_peers_ended(fabric()[0]) is None
    assert how_peers_ended(SimpleNamespace(strategy=SimpleNamespace())) is None  # (one device: no launcher)
    f, procs = fabric("import time; time.sleep(30)")
    started = time.monotonic()
    assert how_peers_ended(f, wait=0.3) is None and time.monotonic() - started < 5
    procs[0].kill()
    procs[0].wait()


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX signal's exit code")
def test_a_crash_in_a_training_process_prints_its_python_stack():
    """`launch` turns on faulthandler in every process of a run (each runs it): a segmentation fault in a rank
    shows where it happened instead of ending the process without a word."""
    script = ("import ctypes; from lit_gpt.training import launch\n"
              "class Fabric:\n    def launch(self): pass\n"
              "launch(Fabric())\nctypes.string_at(0)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGSEGV and "Fatal Python error: Segmentation fault" in proc.stderr, proc.stderr


def _parent_pid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.parametrize("error, shown", [
    (OSError(28, os.strerror(28), "out/results.json"), "Could not write 'out/results.json': " + os.strerror(28)),
    (OSError(30, os.strerror(30), "out"), "Could not write 'out': " + os.strerror(30)),
    ("WriteError(5)", "Could not write 'out/lit_model.pth': " + os.strerror(5)),
])
def test_a_disk_error_outside_training_is_one_line_and_exit_1(error, shown, capsys):
    """A plain OSError from a full disk or a read-only file system (Path.write_text, mkdir), and atomic_path's
    WriteError for any errno: one line naming the path, not a traceback."""
    from lit_gpt.cli import run_cli
    from lit_gpt.utils import WriteError

    if error == "WriteError(5)":
        error = WriteError(5, os.strerror(5), "out/lit_model.pth")

    def main(steps: int = 1) -> None:
        raise error

    with pytest.raises(SystemExit) as e:
        run_cli(main, args=[])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"error: {shown}; ") and err.count("\n") == 1, err


def test_run_cli_gives_the_sigterm_action_back(capsys):
    """run_cli makes SIGTERM raise Terminated while it runs a script; after it (a notebook, a wrapper that prepares
    and then trains in-process), the action is the caller's again: training's ranks rely on the default."""
    from lit_gpt.cli import run_cli

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        seen = []
        run_cli(lambda steps=1: seen.append(signal.getsignal(signal.SIGTERM)), args=[])
        assert seen and seen[0] is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_outside_training_is_one_line_and_exit_130(capsys):
    """Ctrl-C while a script loads or prepares (or a second one during training): no traceback."""
    from lit_gpt.cli import run_cli

    def setup(steps: int = 1) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(setup, args=[])
    assert e.value.code == 130 and capsys.readouterr().err == "\ninterrupted\n"


WRITER = """
import signal, sys, time
from pathlib import Path
from lit_gpt.cli import run_cli
from lit_gpt.utils import atomic_path

def main(out: Path, finetune: bool = False) -> None:
    print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"x" * 1000)
        (out.parent / "ready").touch()
        time.sleep(60)

run_cli(main, finetune_script="finetune/x.py" if "--finetune" in sys.argv else None,
        args=[a for a in sys.argv[1:] if a != "--finetune"])
"""


@pytest.mark.parametrize("finetune", [False, True])
def test_sigterm_outside_training_removes_the_file_being_written(finetune, tmp_path):
    """SIGTERM (`timeout`, `kill`) used to end a converter, merge or prepare script without its `finally` blocks,
    leaving a temporary file as large as the output beside it. The finetune scripts keep the default action until
    training takes the signal over (their launched ranks must die at once when blocked in a collective)."""
    out = tmp_path / "out" / "weights.bin"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "--out", str(out)] + (["--finetune"] if finetune else []),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (out.parent / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    left = sorted(p.name for p in out.parent.iterdir())
    if finetune:
        assert proc.returncode == -signal.SIGTERM and stdout == "True\n" and stderr == ""
        assert len(left) == 2 and left[0].startswith(".weights.bin.")  # (the next write of it removes it)
    else:
        assert (proc.returncode, stdout, stderr) == (128 + signal.SIGTERM, "False\n", "\nterminated\n")
        assert left == ["ready"]


# ---------------------------------------------------------------------------------------------- failed writes
def test_a_full_disk_at_a_checkpoint_names_it_and_the_intact_one_before(tiny_ckpt, tmp_path, monkeypatch):
    import errno

    from lit_gpt import training

    save = training.atomic_save

    def full_disk_at_step_4(obj, path):
        if Path(path).name == "step-000004.pth":
            with training.atomic_path(path) as tmp:  # a partial file, then the write fails
                tmp.write_bytes(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, path)

    monkeypatch.setattr(training, "atomic_save", full_disk_at_step_4)
    run = tmp_path / "run"
    with pytest.raises(training.RunWriteError) as e:
        setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=dict(TRAIN, save_interval=2))
    ckpts = run / "checkpoints"
    assert str(e.value) == (f"Could not write {ckpts / 'step-000004.pth'}: No space left on device; the last complete "
                            f"checkpoint, {ckpts / 'step-000002.pth'}, is intact: free space (or fix the folder), "
                            "then run the same command with --resume auto.")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002.pth"]  # no partial file left

    monkeypatch.setattr(training, "atomic_save", save)
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=dict(TRAIN, save_interval=2), resume="auto")
    assert (run / "lit_model_ether_finetuned.pth").is_file()


def test_a_rename_failing_inside_a_set_of_files_leaves_it_incomplete_not_mixed(tmp_path, monkeypatch):
    """`atomic_paths` (prepared data + its config, a converted checkpoint, a PEFT folder): when the second rename
    fails after the first went through, the first file is removed again, so readers find the set incomplete (training
    refuses a missing train.pt by name) instead of a new train.pt beside the old run's test.pt and config."""
    import errno

    from lit_gpt.utils import atomic_paths

    names = ["train.pt", "test.pt", "prepare_config.yaml"]
    for name in names:
        (tmp_path / name).write_text("old run")
    replace, calls = os.replace, []

    def full_disk_at_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_at_the_second)
    with pytest.raises(OSError, match="No space left"):
        with atomic_paths(*(tmp_path / n for n in names)) as temps:
            for tmp in temps:
                tmp.write_text("new run")
    assert [Path(c).name for c in calls] == ["train.pt", "test.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepare_config.yaml", "test.pt"]  # no temporary file
    assert {p.read_text() for p in tmp_path.iterdir()} == {"old run"}


@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_write_stops_both_fsdp_processes_in_one_line(tiny_ckpt, tmp_path):
    """Rank 0 writes, rank 1 waits for it: rank 1 must learn of the failure, not wait at the next collective."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints folder goes")
    flags = common_flags(tiny_ckpt, run, 4, **{"--devices": "2", "--train.global_batch_size": "2",
                                               "--train.save_interval": "2"})
    r = subprocess.run([sys.executable, str(REPO / "finetune" / "ether.py"), *flags, "--ether_nb", "4"], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, LIT_GPT_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: Could not write {run / 'checkpoints' / 'step-000002.pth'}: File exists "
                      f"({run / 'checkpoints'}); nothing was lost: free space (or fix the folder), then run the same "
                      "command with --resume auto."]


def test_a_metrics_row_that_cannot_be_written_costs_the_csv_not_the_run(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import errno

    from lit_gpt import training
    from test_resume_semantics import csv_rows

    log = training.MetricsCSV.log

    def full_disk_from_step_3(self, metrics, step):
        if step >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        log(self, metrics, step)

    monkeypatch.setattr(training.MetricsCSV, "log", full_disk_from_step_3)
    run = tmp_path / "run"
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=TRAIN)
    out = capsys.readouterr().out
    warning = (f"warning: could not write {run / 'logs' / 'metrics.csv'} (No space left on device): it stops at the "
               "rows before step 3; the other logs (--logger_name) and the checkpoints go on.")
    assert out.count(warning) == 1
    assert [int(r["step"]) for r in csv_rows(run)] == [1, 2]
    assert (run / "lit_model_ether_finetuned.pth").is_file()



@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("launched", [True, False], ids=["rank_of_a_launcher", "plain_process"])
def test_a_launched_rank_dies_with_its_launcher(launched):
    """`kill` of a run still starting killed only the launching process (rank 0): Fabric's launcher forwards no
    signal before training, and rank 1 waited for it until the process group's 30-minute timeout.

    A supervisor adopts the orphan (a subreaper, as init would), so that what ends it is the rank's own request."""
    rank = ("from lit_gpt.training import die_with_launcher; die_with_launcher(); print('ready', flush=True); "
            "import time; time.sleep(60)")
    launcher = (
        "import os, subprocess, sys\n"
        f"rank = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, "
        "stderr=subprocess.DEVNULL, text=True)\n"
        "assert rank.stdout.readline().strip() == 'ready'\n"
        "print(rank.pid, flush=True)\n"
        "os._exit(0)\n"  # the launcher dies without a word
    )
    supervisor = (
        "import ctypes, os, signal, subprocess, sys, time\n"
        "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"  # PR_SET_CHILD_SUBREAPER
        f"env = {{k: v for k, v in os.environ.items() if k != 'LOCAL_RANK'}}\n"
        f"env.update({{'LOCAL_RANK': '1'}} if {launched} else {{}})\n"
        f"out = subprocess.run([sys.executable, '-c', {launcher!r}], env=env, capture_output=True, text=True)\n"
        "pid = int(out.stdout)\n"
        "deadline = time.time() + 8\n"
        "while time.time() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):\n"
        "    time.sleep(0.1)\n"
        "alive = time.time() >= deadline\n"
        "print('alive' if alive else 'dead')\n"
        "os.kill(pid, signal.SIGKILL) if alive else None\n"
    )
    r = subprocess.run([sys.executable, "-c", supervisor], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("dead" if launched else "alive")
