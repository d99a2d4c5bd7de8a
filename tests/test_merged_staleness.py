"""A model folder made by merging (a run's `merged/`, scripts/merge_*.py's output) knows what it was merged from by
content: merge_info.yaml records the source file's SHA-256 (size and first and last MiB for a file over 256 MiB).
A run moved or renamed with its merged/, or copied without its mtimes, keeps it; a merged/ named directly as
--checkpoint_dir after its run was trained on (a resume) is loaded with one warning saying how to re-merge; eval's
results JSON names the merge it scored; an older merge_info.yaml without the hash keeps the path + mtime rule."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lit_gpt.utils as utils
from lit_gpt.adapters import AdapterConfig
from lit_gpt.cli import run_cli
from lit_gpt.merge import load_finetuned, merge_checkpoint
from lit_gpt.training import finish_finished_run
from lit_gpt.utils import (
    atomic_save,
    check_checkpoint_dir,
    file_identity,
    load_file,
    merged_from,
    run_model_folder,
    stale_merge_warning,
)
from test_after_training import load_script
from test_merge import make_base, make_run

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "lit_model_ether_finetuned.pth"
IDENTITY = utils.IDENTITY_KEYS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("stale") / "tiny-llama")


def merged_run(base: Path, run: Path) -> tuple[Path, Path]:
    """A run folder with its adapter file and that file's merge in `merged/` (what --merge true leaves)."""
    adapter = make_run(run, base, AdapterConfig(method="ether", nb=4))
    merge_checkpoint(adapter, precision="32-true", log=lambda s: None)
    return adapter, run / "merged"


def train_on(adapter: Path, base: Path, scratch: Path) -> None:
    """What a resume with --merge false does to the run: a new adapter file (other weights) in its place."""
    other = make_run(scratch, base, AdapterConfig(method="ether", nb=4), seed=7)
    os.replace(other, adapter)


def stderr_of(fn, *args, **kwargs) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        fn(*args, **kwargs)
    return err.getvalue()


def strip_identity(merged: Path) -> None:
    """merge_info.yaml as merges before the content record wrote it (source as an absolute path only)."""
    info = yaml.safe_load((merged / "merge_info.yaml").read_text())
    (merged / "merge_info.yaml").write_text(yaml.safe_dump({k: v for k, v in info.items() if k not in IDENTITY},
                                                           sort_keys=False))


# ---------------------------------------------------------------------------------------------- the record
def test_merge_info_records_the_source_by_content(base, tmp_path):
    adapter, merged = merged_run(base, tmp_path / "run")
    info = yaml.safe_load((merged / "merge_info.yaml").read_text())
    assert info["source"] == str(adapter.resolve())
    assert info["source_sha256"] == file_identity(adapter)["source_sha256"]
    # the same tensors saved again (torch.save names the archive's folder after the temporary file): the same source
    atomic_save(load_file(adapter, mmap=False), adapter)
    assert file_identity(adapter) == {"source_sha256": info["source_sha256"]}
    assert merged_from(merged, adapter)
    # a file that is not a torch.save archive (a .safetensors adapter): its bytes
    other = tmp_path / "a.safetensors"
    other.write_bytes(b"not an archive")
    assert file_identity(other) == {"source_sha256": hashlib.sha256(b"not an archive").hexdigest()}


def test_a_large_file_is_identified_without_reading_it_whole(tmp_path, monkeypatch):
    """Past the limit (256 MiB; 2 MiB here) a torch.save archive by its index (each entry's size and CRC-32), any
    other file by its size and first and last MiB."""
    monkeypatch.setattr(utils, "_WHOLE_HASH_LIMIT", 2 << 20)
    full = tmp_path / "lit_model_finetuned.pth"
    sd = {"a": torch.randn(1 << 19), "b": torch.randn(1 << 18)}  # 3 MiB of float32
    atomic_save(sd, full)
    ident = file_identity(full)
    assert set(ident) == {"source_size", "source_sha256_zip_index"}
    atomic_save({k: v.clone() for k, v in sd.items()}, full)
    assert file_identity(full) == ident  # saved again
    sd["a"][len(sd["a"]) // 2] += 1  # one number in the middle of a tensor
    atomic_save(sd, full)
    assert file_identity(full) != ident and file_identity(full)["source_size"] == ident["source_size"]

    raw = tmp_path / "big.bin"
    data = bytearray(os.urandom(3 << 20))
    raw.write_bytes(data)
    ident = file_identity(raw)
    ends = hashlib.sha256(bytes(data[:1 << 20]) + bytes(data[-(1 << 20):])).hexdigest()
    assert ident == {"source_size": 3 << 20, "source_sha256_first_last_mib": ends}
    for at in (0, len(data) - 1):  # a change at either end is seen, also in a file rewritten in place
        changed = bytearray(data)
        changed[at] ^= 1
        raw.write_bytes(changed)
        os.utime(raw, ns=(1, 1))  # (the same mtime: not a cached answer)
        assert file_identity(raw) != ident
    raw.write_bytes(data[:1 << 20])  # small again: hashed whole
    assert file_identity(raw) == {"source_sha256": hashlib.sha256(bytes(data[:1 << 20])).hexdigest()}


# ---------------------------------------------------------------------------------------------- 1. moved runs
def test_a_moved_run_keeps_its_merged_folder_and_a_resume_does_not_merge_again(base, tmp_path):
    adapter, merged = merged_run(base, tmp_path / "a")
    assert run_model_folder(tmp_path / "a") == merged
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    os.rename(tmp_path / "a", moved)  # `mv a elsewhere/b`: the recorded absolute source is gone
    assert not adapter.exists()
    assert run_model_folder(moved) == moved / "merged"
    with pytest.raises(ValueError, match=r"pass its model folder, --checkpoint_dir .*elsewhere/b/merged\."):
        load_script("scripts/generate.py").check_model_dir(moved)
    stamp = (moved / "merged" / "lit_model.pth").stat().st_mtime_ns
    logs = []
    finish_finished_run(moved, moved / ADAPTER, base, adapter=True, merge=True, log=logs.append)
    assert logs == [f"{moved / 'merged'} already holds the merge of {ADAPTER}."]
    assert (moved / "merged" / "lit_model.pth").stat().st_mtime_ns == stamp
    # the merged folder still refuses its own adapter on top of it (it would be applied twice)
    with pytest.raises(ValueError, match="already has .* merged into it"):
        load_finetuned(moved / "merged", moved / ADAPTER)


def test_a_copy_without_mtimes_keeps_its_merged_folder(base, tmp_path):
    """`cp -r` / `scp -r`: the adapter can end up newer than the merged weights; its content is the same."""
    merged_run(base, tmp_path / "a")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "a", copy, copy_function=shutil.copyfile)
    future = (copy / "merged" / "lit_model.pth").stat().st_mtime + 100
    os.utime(copy / ADAPTER, (future, future))
    assert merged_from(copy / "merged", copy / ADAPTER)
    assert run_model_folder(copy) == copy / "merged"
    assert stale_merge_warning(copy / "merged") is None
    # a copy of its adapter, anywhere, is still refused on top of it (it would be applied twice)
    shutil.copyfile(copy / ADAPTER, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="already has .* merged into it"):
        load_finetuned(copy / "merged", tmp_path / "x.pth")


#------------------------------------------------------------------------------------------ 2. stale, named directly
def test_a_stale_merged_folder_named_directly_is_loaded_with_one_warning(base, tmp_path, capsys):
    adapter, merged = merged_run(base, tmp_path / "run")
    assert stderr_of(check_checkpoint_dir, merged) == ""  # current: nothing to say
    train_on(adapter, base, tmp_path / "scratch")
    assert run_model_folder(tmp_path / "run") is None
    capsys.readouterr()
    generate = load_script("scripts/generate.py")
    run_cli(generate.main, args=["--checkpoint_dir", str(merged), "--prompt", "hi", "--max_new_tokens", "2",
                                 "--precision", "32-true", "--device", "cpu", "--temperature", "0"])
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {str(merged)!r} is a merge of an earlier version of {str(adapter.resolve())!r} (its "
        f"merge_info.yaml), which has changed since; it is loaded as it is: re-merge it with `python "
        f"scripts/merge_ether.py --adapter_path "
        f"{adapter.resolve()}`, or load that file unmerged with `--checkpoint_dir {base.resolve()} --adapter_path "
        f"{adapter.resolve()}`."
    ], err
    assert out.strip()  # and it generated
    # the command it names makes the folder current again
    load_script("scripts/merge_ether.py").main(adapter_path=adapter)
    assert merged_from(merged, adapter) and stale_merge_warning(merged) is None


def test_the_warning_names_the_out_dir_and_base_of_a_merge_made_elsewhere(base, tmp_path):
    lone = tmp_path / "lone" / ADAPTER  # an adapter file on its own (no run around it), merged into another folder
    lone.parent.mkdir()
    shutil.copyfile(make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4)), lone)
    merged = merge_checkpoint(lone, checkpoint_dir=base, out_dir=tmp_path / "models" / "m", precision="32-true",
                              log=lambda s: None)
    train_on(lone, base, tmp_path / "scratch")
    message = stale_merge_warning(merged)
    assert (f"`python scripts/merge_ether.py --adapter_path {lone} --checkpoint_dir {base.resolve()} --out_dir "
            f"{merged}`") in message


@pytest.mark.slow
def test_chat_warns_once_about_a_stale_merged_folder(base, tmp_path):
    adapter, merged = merged_run(base, tmp_path / "run")
    train_on(adapter, base, tmp_path / "scratch")
    r = subprocess.run([sys.executable, "chat/base.py", "--checkpoint_dir", str(merged), "--temperature", "0",
                        "--max_new_tokens", "2", "--precision", "32-true", "--device", "cpu"],
                       input="hi\n", capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if "warning" in line] == [stale_merge_warning(merged)]


def test_no_warning_when_the_source_is_gone_or_the_folder_is_no_merge(base, tmp_path):
    adapter, merged = merged_run(base, tmp_path / "run")
    adapter.unlink()  # an adapter deleted (or a merged/ copied away alone): nothing to compare with
    assert stale_merge_warning(merged) is None
    assert stale_merge_warning(base) is None


# ---------------------------------------------------------------------------------------------- eval's record
@pytest.mark.slow
def test_eval_results_name_the_merge_they_scored(base, tmp_path, monkeypatch):
    adapter, merged = merged_run(base, tmp_path / "run")
    train_on(adapter, base, tmp_path / "scratch")
    monkeypatch.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    harness = load_script("eval/lm_eval_harness.py")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        harness.main(checkpoint_dir=merged, include_path=REPO / "tests" / "eval_tasks", eval_tasks="lit_ppl",
                     limit=2, batch_size=2, device="cpu", precision="32-true", bootstrap_iters=0)
    assert [line for line in err.getvalue().splitlines() if line.startswith("warning:")] == [
        stale_merge_warning(merged)]
    (results,) = (merged / "eval").glob("results_*.json")
    record = json.loads(results.read_text())["config"]["merge_info"]
    assert record == yaml.safe_load((merged / "merge_info.yaml").read_text())
    assert record["source_sha256"] != file_identity(adapter)["source_sha256"]  # the earlier file's


# ---------------------------------------------------------------------------------------------- older records
def test_an_older_merge_info_keeps_the_path_and_mtime_rule(base, tmp_path):
    adapter, merged = merged_run(base, tmp_path / "a")
    strip_identity(merged)
    assert merged_from(merged, adapter) and run_model_folder(tmp_path / "a") == merged
    # moved with its merged/ (mtimes kept): the file of that name beside the folder
    os.rename(tmp_path / "a", tmp_path / "b")
    merged, adapter = tmp_path / "b" / "merged", tmp_path / "b" / ADAPTER
    assert run_model_folder(tmp_path / "b") == merged and stale_merge_warning(merged) is None
    # an adapter newer than the merge counts as another one, as before
    future = (merged / "lit_model.pth").stat().st_mtime + 100
    os.utime(adapter, (future, future))
    assert not merged_from(merged, adapter) and run_model_folder(tmp_path / "b") is None
    assert stale_merge_warning(merged).startswith(f"warning: {str(merged)!r} is a merge of an earlier version")


def test_a_full_finetuning_file_merge_is_recorded_and_checked_too(base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sd = load_file(base / "lit_model.pth", mmap=False)
    sd = {k: v * 1.01 if v.is_floating_point() else v for k, v in sd.items()}
    full = run / "lit_model_finetuned.pth"
    atomic_save(sd, full)
    merged = merge_checkpoint(full, checkpoint_dir=base, precision="32-true", log=lambda s: None)
    assert yaml.safe_load((merged / "merge_info.yaml").read_text())["source_sha256"] == file_identity(full)[
        "source_sha256"]
    assert stale_merge_warning(merged) is None
    atomic_save({k: v * 1.02 if v.is_floating_point() else v for k, v in sd.items()}, full)
    assert "lit_model_finetuned.pth" in stale_merge_warning(merged)
