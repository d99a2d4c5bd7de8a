"""A disk that cannot take a file (full, over quota, past the process's file size limit): every writer says so in one
sentence naming the file, and nothing is left half-written. torch's writer reports a short write as a RuntimeError
("unexpected pos"), safetensors as "os error N": neither is an OSError, so the one-sentence handlers of a full disk
(training's checkpoints, the prepared data, run_cli) never saw them; the tests of those handlers raise a plain
OSError. Here the writers fail for real, under RLIMIT_FSIZE."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_training import tiny_ckpt  # noqa: F401 (tiny_ckpt is a fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE is POSIX")


def small_file_limit(limit: int = 100_000):
    """A `preexec_fn`: files past `limit` bytes fail with EFBIG (not the SIGXFSZ that would kill the process)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


WRITERS = """
import os, sys, torch
from lit_gpt import utils
if sys.argv[2] == "full":  # what statvfs says of a disk the write just filled
    os.statvfs = lambda path: os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
for name in ("a.pth", "a.safetensors"):
    try:
        utils.atomic_save({"w": torch.zeros(100_000)}, os.path.join(sys.argv[1], name))
    except OSError as e:
        print(type(e).__name__, e.errno, str(e))
print(sorted(os.listdir(sys.argv[1])))
"""


@pytest.mark.parametrize("disk", ["full", "limit"])
def test_torch_and_safetensors_writes_that_fail_for_space_raise_one_sentence(disk, tmp_path):
    r = subprocess.run([sys.executable, "-c", WRITERS, str(tmp_path), disk], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), preexec_fn=small_file_limit(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    pth, st, left = r.stdout.splitlines()
    fix = "; free space there (or write elsewhere)" if disk == "full" else "; write elsewhere"
    reason = "No space left on device" if disk == "full" else "Input/output error"  # torch's writer: no errno
    assert pth == (f"WriteError {28 if disk == 'full' else 5} Could not write {str(tmp_path / 'a.pth')!r}: {reason}"
                   f"{fix} and run the command again (nothing was half-written under the file's name).")
    assert st.startswith(f"WriteError 27 Could not write {str(tmp_path / 'a.safetensors')!r}: File too large; write")
    assert left == "[]"  # no temporary file, nothing under the final names


def test_an_export_that_cannot_be_written_is_one_line(tiny_ckpt, tmp_path):
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(tiny_ckpt),
                        "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=small_file_limit(20_000), timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: Could not write {str(out / 'model.safetensors')!r}: File too large; write elsewhere")
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*.tmp"))


def test_an_output_on_a_read_only_file_system_is_refused_before_the_work(tmp_path, monkeypatch):
    """merge, the exports and the GGUF import wrote only after the long weight pass, then failed with a traceback
    (EROFS); the output checks looked for a file in the way, not for a folder that cannot be written. (Root may
    write where permissions say no, so a read-only mount is what a shared cluster folder looks like even to root.)"""
    from lit_gpt.utils import check_output_dir, check_output_file

    real = os.statvfs
    read_only = str(tmp_path / "ro")
    (tmp_path / "ro").mkdir()

    def statvfs(path):
        s = real(path)
        flag = s.f_flag | (os.ST_RDONLY if str(path) == read_only else 0)
        return os.statvfs_result((*s[:8], flag, s[9]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(ValueError, match=f"^--out_dir '{read_only}/merged' cannot be written: '{read_only}' is on a "
                                         "read-only file system; pass a folder you can write to.$"):
        check_output_dir(tmp_path / "ro" / "merged", "--out_dir")
    with pytest.raises(ValueError, match="--save_filepath .* cannot be written: .* is on a read-only file system"):
        check_output_file(tmp_path / "ro" / "r" / "results.json", "--save_filepath")
    assert check_output_dir(tmp_path / "rw" / "merged", "--out_dir") == tmp_path / "rw" / "merged"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_of_the_file(tmp_path):
    """SIGKILL (the OOM killer) leaves a writer no time to clean up: a stopped GGUF import left its 538 MB temporary
    weights behind, hidden, and no rerun removed them. The next write of the same file removes what writers that are
    gone left; a live writer's file, another file's, or one not named by us, stays."""
    from lit_gpt.utils import atomic_write_text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = ("import sys, time; sys.path.insert(0, '.')\nfrom lit_gpt.utils import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_text('x'); print(tmp.name, flush=True); time.sleep(60)")
    live = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "weights.pth")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = tmp_path / live.stdout.readline().strip()
        host = live_tmp.name.split(".h", 1)[1][:8]
        stale = tmp_path / f".weights.pth.h{host}p{dead.pid}_abc123.tmp"
        kept = [tmp_path / f".weights.pth.h{host}p{dead.pid}x.tmp",  # not a name of ours
                tmp_path / f".other.pth.h{host}p{dead.pid}_abc123.tmp",  # another file's
                tmp_path / f".weights.pth.h{'0' * 8 if host != '0' * 8 else '1' * 8}p{dead.pid}_abc123.tmp"]
        for p in (stale, *kept):
            p.write_text("partial")
        atomic_write_text(tmp_path / "weights.pth", "done")
        assert not stale.exists() and all(p.exists() for p in kept) and live_tmp.exists()
        assert (tmp_path / "weights.pth").read_text() == "done"
        # the name atomic_path gave it, once its writer is killed: the parser reads our own names
        live.kill()
        live.wait()
        atomic_write_text(tmp_path / "weights.pth", "again")
        assert not live_tmp.exists()
    finally:
        live.kill()


def test_another_users_live_writer_keeps_its_temporary_file(tmp_path, monkeypatch):
    """`os.kill(pid, 0)` of another user's process raises PermissionError: it is alive, and its file is kept (the
    tests run as root, where it never raises)."""
    import errno

    from lit_gpt import utils

    other_pid = os.getpid() + 100_000
    other = tmp_path / f".w.pth.h{utils._HOST}p{other_pid}_abc.tmp"
    other.write_text("partial")
    kill = os.kill

    def kill_as_another_user(pid, sig):
        if pid == other_pid:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill_as_another_user)
    utils.atomic_write_text(tmp_path / "w.pth", "done")
    assert other.exists()


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_or_quota_says_to_free_space(code):
    import errno

    from lit_gpt.utils import WriteError

    number = getattr(errno, code)
    message = str(WriteError(number, os.strerror(number), "x.pth"))
    assert message.startswith(f"Could not write 'x.pth': {os.strerror(number)}; free space there (or write elsewhere)")
