"""Checkpoint I/O and small helpers shared by every entrypoint.

Two rules hold everywhere: a file is written to a temporary name in the same directory and renamed into place (so
a crash never leaves a half-written checkpoint), and loading never runs pickled code (`safetensors`, or
`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import errno
import glob
import os
import pickle
import re
import socket
import tempfile
import zipfile
import zlib
from contextlib import ExitStack, contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

WEIGHTS_FILENAME = "lit_model.pth"


# what a disk that cannot take the file raises: full, over quota, read-only, past the size limit
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


class WriteError(OSError):
    """A file could not be written (`OSError(errno, strerror, filename)`), said in one sentence with the fix."""

    def __str__(self) -> str:
        fix = "free space there (or write elsewhere)" if self.errno in (errno.ENOSPC, errno.EDQUOT) else (
            "write elsewhere")
        return (f"Could not write {str(self.filename)!r}: {self.strerror}; {fix} and run the command again (nothing "
                "was half-written under the file's name).")


def _write_failure(error: BaseException, tmp: Path, path: Path) -> Optional[WriteError]:
    """`error`, raised while writing `tmp`, as the `WriteError` it stands for: torch's writer reports a short write
    as a RuntimeError ("unexpected pos"), safetensors an I/O error as "os error N"; neither is an `OSError`, so the
    one-sentence handlers of a full disk never saw them. None for an error of another kind."""
    text = str(error)
    code = re.search(r"\(os error (\d+)\)", text)
    if code is not None:
        number = int(code[1])
    elif "unexpected pos" in text or "PytorchStreamWriter failed" in text:
        try:
            stat = os.statvfs(tmp.parent)
            number = errno.ENOSPC if stat.f_bavail * stat.f_frsize < (16 << 20) else errno.EIO
        except (OSError, AttributeError):  # (no statvfs on Windows)
            number = errno.EIO
    else:
        return None
    return WriteError(number, os.strerror(number), str(path))


# who writes a temporary file, in its name: this machine (a hash of its name) and process, so that a later write of
# the same file can tell the leftovers of a killed writer (SIGKILL, the OOM killer: no cleanup ran) from a live one's
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP_WRITER = re.compile(r"h([0-9a-f]{8})p(\d+)_\w*\.tmp")


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files that writers of `path` on this machine left when they were killed (their process
    is gone): a stopped import would otherwise leave a checkpoint-sized hidden file that no rerun removes."""
    removed = []
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}h*p*_*.tmp"):
        m = _TEMP_WRITER.fullmatch(tmp.name[len(prefix):])
        if m is None or m[1] != _HOST or int(m[2]) == os.getpid() or _process_alive(int(m[2])):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: another user's, alive)
        return True
    return True


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`. A write that fails
    for want of space inside the block raises `WriteError` (an `OSError`) whatever the writer raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.h{_HOST}p{os.getpid()}_", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600; the finished file should have the permissions an ordinary open() would give it
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        try:
            yield tmp
        except Exception as e:
            failure = None if isinstance(e, OSError) else _write_failure(e, tmp, path)
            if failure is None:
                raise
            raise failure from e
        # again: writers that replace the file themselves (safetensors' save_file) bring back 0600
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_paths(*paths: Path | str) -> Iterator[list[Path]]:
    """`atomic_path` for files that are only valid together (prepared data and the config that describes it).

    Every file is written to its temporary path first; only when the block succeeds are they renamed into place,
    in the order given. A failed write changes none of them. A rename that still fails after others succeeded
    (rare: the temporary files are on the same file system) deletes the files already renamed, so that the set is
    left incomplete rather than mixing two runs: put first the file whose absence stops the readers.
    """
    paths = [Path(p) for p in paths]
    replaced: list[Path] = []
    try:
        with ExitStack() as stack:
            temps = {}
            for path in reversed(paths):  # the stack exits (renames) in reverse: paths[0] is renamed first

                def note_replaced(exc_type, *_, path=path) -> None:
                    if exc_type is None:  # this file's rename went through
                        replaced.append(path)

                stack.push(note_replaced)
                temps[path] = stack.enter_context(atomic_path(path))
            yield [temps[p] for p in paths]
    except BaseException:
        for path in replaced:
            path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save(obj: Any, path: Path | str) -> None:
    """`torch.save` (or `safetensors` for a `.safetensors` path) that never leaves a partial file behind."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in obj.items()}, str(tmp))
        else:
            torch.save(obj, tmp)


def load_file(path: Path | str, mmap: bool = True) -> Any:
    """Load a `.safetensors` or torch file without executing pickled code; tensors stay on the CPU.

    A file that cannot be read (truncated, not a checkpoint, or holding pickled Python objects) raises a one-sentence
    `ValueError` naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(_directory_given_for_file(path))
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path))
        except (PermissionError, MemoryError):
            raise
        except Exception as e:
            raise checkpoint_read_error(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (PermissionError, MemoryError):
        raise
    except Exception as e:
        if not (mmap and isinstance(e, RuntimeError)):
            raise checkpoint_read_error(path, e) from None
        first = e  # `e` is unbound after the except clause
    # mmap needs the zipfile format; old-style files load without it
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as e:
        # a zip archive (torch.save's format) failed for its own reason the first time; else mmap was the problem
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        raise checkpoint_read_error(path, first if is_zip else e) from None


def _first_sentence(text: str) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line.split(". ", 1)[0].rstrip(".")


def checkpoint_read_error(path: Path | str, error: BaseException) -> ValueError:
    """The one-sentence error for a weights file that torch/safetensors could not read (`error` is theirs)."""
    path = Path(path)
    if path.name == HPARAMS_FILENAME and path.parent.is_dir():  # a run's settings, next to the weights meant
        return ValueError(f"{str(path)!r} is a fine-tuning run's settings, not weights: pass the run's adapter file, "
                          f"{run_adapter_file(path.parent)!r}.")
    if path.suffix.lower() in (".yaml", ".yml", ".json", ".txt", ".csv", ".md"):
        return ValueError(f"{str(path)!r} is a text file ({path.suffix}), not weights: pass the weights file "
                          "(.pth or .safetensors).")
    message = str(error)
    detail = ""
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in message:
        # torch's weights_only refusal: a long text advising weights_only=False, with its own reason inside it
        # ("WeightsUnpickler error: Unsupported global: GLOBAL m.C was not ...", "Trying to load unsupported GLOBAL")
        reason = message.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in message else next(
            (line for line in message.splitlines() if "GLOBAL" in line), "")
        detail = _first_sentence(reason).split(" was not an allowed", 1)[0]
        if "GLOBAL" in detail and zipfile.is_zipfile(path):
            return ValueError(
                f"{str(path)!r} holds Python objects ({detail}) that lit_gpt does not unpickle, since loading never "
                "runs pickled code: save plain tensors instead (a state dict, e.g. `torch.save(model.state_dict(), "
                "path)`) or pass the right file."
            )
    detail = detail or _first_sentence(message) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:  # torch's zip reader on a cut archive: "[Errno 22] Invalid ..."
        detail = f"reading it failed: {error.strerror}"
    if isinstance(error, EOFError):
        detail = f"the file ends early{': ' + detail if str(error) else ''}"
    if isinstance(error, KeyError):  # torch's legacy reader found no magic number: the key is the bytes it read
        detail = "it does not start as a file written by torch.save does"
    return ValueError(
        f"{str(path)!r} could not be read as a PyTorch/safetensors checkpoint ({detail}): it is truncated or not a "
        "checkpoint; pass the right file, or download, convert or save it again."
    )


# ---------------------------------------------------------------------------------------------- paths users give
FINETUNED_PATTERN = "lit_model*finetuned.pth"  # what finetune/ writes (lit_gpt/training.py)
HPARAMS_FILENAME = "hyperparameters.yaml"


def run_adapter_file(run: Path | str) -> str:
    """The final file of a fine-tuning run's folder, for a message (a placeholder when it has none yet)."""
    found = sorted(Path(run).glob(FINETUNED_PATTERN))
    return str(found[0]) if found else str(Path(run) / "lit_model_<method>_finetuned.pth")


# a fine-tuning run's model folders: a full run's own (litgpt's finetune_full writes the same), and an adapter run's
# merge (`--merge true`, and scripts/merge_*.py by default)
FINAL_DIRNAME, MERGED_DIRNAME = "final", "merged"


def merge_script_for(adapter: Path | str) -> str:
    """The script that merges the adapter file `adapter`: merge_lora.py for a LoRA one, else merge_ether.py."""
    return "merge_lora.py" if "lora" in Path(adapter).name else "merge_ether.py"


MERGE_INFO_FILENAME = "merge_info.yaml"  # what a merged (or final/) model folder was made from (lit_gpt/merge.py)

# A model folder's merge_info.yaml identifies the file it was merged from by content, so that a run moved, renamed
# or copied (with or without its mtimes) keeps its merged/. A file up to _WHOLE_HASH_LIMIT (an adapter: KBs to MBs
# at 7B) is hashed whole. A larger one (a full fine-tune's lit_model_finetuned.pth, GBs) is not read: a torch.save
# archive is identified by the name, size and CRC-32 of each of its entries, from its index (every byte of every
# tensor counts, for the cost of reading the index); a file of another kind, or an archive written without CRCs, by
# its size and a hash of its first and last MiB only (they hold the start of the first tensor and the end of the
# last one, which any training step changes). A torch.save archive's entries are named after the file it was first
# written as (a temporary name, here), so the name of that folder inside it is left out: the same tensors saved
# again are the same source.
_WHOLE_HASH_LIMIT = 256 << 20
_END_BYTES = 1 << 20
IDENTITY_KEYS = ("source_sha256", "source_size", "source_sha256_zip_index", "source_sha256_first_last_mib")
_identities: dict[tuple, dict] = {}  # file_identity's answers in this process, per file version


def file_identity(path: Path | str) -> Optional[dict]:
    """How merge_info.yaml identifies the merged file `path` by content: `{"source_sha256": ...}` (of the whole
    file; of a torch.save archive, of its entries), or for a file over 256 MiB `{"source_size": ...,
    "source_sha256_zip_index" or "source_sha256_first_last_mib": ...}` (see above); None for a folder (a PEFT
    adapter folder), which merge_info.yaml identifies by its path only."""
    path = Path(path)
    st = path.stat()
    if not path.is_file():
        return None
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _identities:
        _identities[key] = _archive_identity(path, st.st_size) or _bytes_identity(path, st.st_size)
    return dict(_identities[key])


def _archive_identity(path: Path, size: int) -> Optional[dict]:
    import hashlib

    if not zipfile.is_zipfile(path):
        return None
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as archive:
            # ("archive/data/0" -> "data/0"; the .data/serialization_id record newer torch versions write is left out)
            entries = [(e, e.filename.split("/", 1)[-1]) for e in archive.infolist()]
            entries = [(e, name) for e, name in entries if name != ".data/serialization_id"]
            if size <= _WHOLE_HASH_LIMIT:
                for entry, name in entries:
                    digest.update(f"{name}\0{entry.file_size}\0".encode())
                    with archive.open(entry) as f:  # (checks the entry's CRC-32 at its end)
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            digest.update(chunk)
                return {"source_sha256": digest.hexdigest()}
            if all(entry.CRC for entry, _ in entries if entry.file_size):
                for entry, name in entries:
                    digest.update(f"{name}\0{entry.file_size}\0{entry.CRC:08x}\n".encode())
                return {"source_size": size, "source_sha256_zip_index": digest.hexdigest()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError):  # (hashed as bytes)
        pass
    return None


def _bytes_identity(path: Path, size: int) -> dict:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return {"source_sha256": digest.hexdigest()}
        digest.update(f.read(_END_BYTES))
        f.seek(-_END_BYTES, os.SEEK_END)
        digest.update(f.read(_END_BYTES))
    return {"source_size": size, "source_sha256_first_last_mib": digest.hexdigest()}


def merge_info_record(source: Path | str) -> dict:
    """The fields of merge_info.yaml that name the file (or PEFT folder) `source` a model folder is merged from: its
    absolute path, and its content (`file_identity`)."""
    source = Path(source).resolve()
    return {"source": str(source), **(file_identity(source) or {})}


def read_merge_info(folder: Path | str) -> Optional[dict]:
    """The mapping in `folder`'s merge_info.yaml; None when it has none, or one that cannot be read."""
    import yaml

    try:
        info = yaml.safe_load((Path(folder) / MERGE_INFO_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("source"), str) else None


def merge_source(folder: Path | str, info: Optional[dict] = None) -> Optional[Path]:
    """The file (or PEFT folder) the model folder `folder` was merged from, where it is now: the path its
    merge_info.yaml records, else, for a run moved or renamed with its merged/, the file of that name beside
    `folder` (in the run). None when it is in neither place (deleted, or the folder was copied without it)."""
    folder = Path(folder)
    info = read_merge_info(folder) if info is None else info
    if info is None:
        return None
    recorded = Path(info["source"])
    return next((p for p in (recorded, folder.parent / recorded.name) if p.exists()), None)


def merged_from(folder: Path | str, final: Path | str) -> bool:
    """Whether the checkpoint folder `folder` is a merge of the file `final` as it is now. Its merge_info.yaml
    records the merged file's content (`file_identity`): the same content, wherever `final` is now. An older one,
    without that record: it names `final` (or a file that moved with `folder`, see `merge_source`), and its weights
    were written after `final` (a resumed run rewrites `final`, not the merge)."""
    folder, final = Path(folder), Path(final)
    weights = folder / WEIGHTS_FILENAME
    info = read_merge_info(folder)
    if info is None or not weights.is_file():
        return False
    try:
        recorded = {key: info[key] for key in IDENTITY_KEYS if key in info}
        if recorded:
            return file_identity(final) == recorded
        source = merge_source(folder, info)
        return (source is not None and source.resolve() == final.resolve()
                and weights.stat().st_mtime >= final.stat().st_mtime)
    except OSError:
        return False


def stale_merge_warning(folder: Path | str) -> Optional[str]:
    """The one-line warning for a model folder whose merge_info.yaml names a file that still exists (where it was,
    or beside the folder) but has changed since the merge (a run resumed after `--merge true`): the folder holds an
    earlier model than that file's. None for any other folder."""
    folder = Path(folder)
    info = read_merge_info(folder)
    source = merge_source(folder, info) if info is not None else None
    # (a PEFT adapter folder is recorded by its path only, and its mtime says little: no warning for it)
    if source is None or not source.is_file() or merged_from(folder, source):
        return None
    command = f"python scripts/{merge_script_for(source)} --adapter_path {source}"
    base = info.get("base_checkpoint_dir")
    if not (source.parent / HPARAMS_FILENAME).is_file() and isinstance(base, str):
        command += f" --checkpoint_dir {base}"  # (the merge script finds a run's base in its hyperparameters.yaml)
    if folder.resolve() != (source.parent / MERGED_DIRNAME).resolve():
        command += f" --out_dir {folder}"
    unmerged = f"--checkpoint_dir {base if isinstance(base, str) else '<base model>'} --adapter_path {source}"
    return (f"warning: {str(folder)!r} is a merge of an earlier version of {str(source)!r} (its "
            f"{MERGE_INFO_FILENAME}), which has changed since; it is loaded as it is: re-merge it with `{command}`, "
            f"or load that file unmerged with `{unmerged}`.")


_warned_stale: set[str] = set()


def warn_if_stale_merge(folder: Path | str) -> None:
    """Print `stale_merge_warning` for `folder` on stderr, once per folder in a process (a script checks its
    --checkpoint_dir, then loads from it)."""
    import sys

    key = str(Path(folder).resolve())
    if key in _warned_stale:
        return
    message = stale_merge_warning(folder)
    if message is not None:
        _warned_stale.add(key)
        print(message, file=sys.stderr)


def run_model_folder(run: Path | str) -> Optional[Path]:
    """The model folder a fine-tuning run holds, which loads as a checkpoint: `final/` (a full fine-tuning run's)
    or `merged/` (an adapter run's, written by `--merge true` or scripts/merge_*.py) when it is a merge of the run's
    final adapter file as it is now; None when it has neither."""
    run = Path(run)
    if (run / FINAL_DIRNAME / WEIGHTS_FILENAME).is_file():
        return run / FINAL_DIRNAME
    adapters = sorted(run.glob("lit_model_*_finetuned.pth"))
    if adapters and merged_from(run / MERGED_DIRNAME, adapters[0]):
        return run / MERGED_DIRNAME
    return None


def finetuning_run_hint(directory: Path | str) -> Optional[str]:
    """When `directory` is a fine-tuning run (finetune/'s output: `hyperparameters.yaml`, `lit_model_*finetuned.pth`)
    rather than a model, the sentence (without a final period) saying how to use it: pass its model folder
    (`run_model_folder`) when it has one; otherwise None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(directory.glob(FINETUNED_PATTERN))
    hparams = directory / HPARAMS_FILENAME
    if not found and not hparams.is_file():
        return None
    folder = run_model_folder(directory)
    if folder is not None:
        return f"{str(directory)!r} is a fine-tuning run, not a model: pass its model folder, {str(folder)!r}, instead"
    adapter = str(found[0]) if found else str(directory / "lit_model_<method>_finetuned.pth")
    base = "<base model>"
    try:
        import yaml

        hp = yaml.safe_load(hparams.read_text(encoding="utf-8")) if hparams.is_file() else None
        for recorded in (hp.get("base_checkpoint_dir"), (hp.get("io") or {}).get("checkpoint_dir")):
            if recorded and Path(recorded).is_dir():
                base = str(recorded)
                break
    except Exception:  # a hint only: an unreadable hyperparameters.yaml leaves the placeholder
        pass
    merge = merge_script_for(adapter)
    # a full fine-tune has nothing to merge: the merge script writes its weights with the base's config and tokenizer
    first = ("make it a model folder" if Path(adapter).name == "lit_model_finetuned.pth" else "merge it") + " first"
    return (
        f"{str(directory)!r} is a fine-tuning run, not a model: pass `--checkpoint_dir {base} --adapter_path "
        f"{adapter}` (to a script that takes --adapter_path), or {first} with `python scripts/{merge} "
        f"--adapter_path {adapter}` and pass its output, {str(directory / 'merged')!r}"
    )


def _directory_given_for_file(path: Path) -> str:
    files = sorted(str(p) for p in path.glob(FINETUNED_PATTERN)) or sorted(
        str(p) for p in path.iterdir() if p.suffix in (".pth", ".safetensors", ".bin")
    )
    inside = f", e.g. {files[0]!r}" if files else ""
    return f"{str(path)!r} is a directory, but a weights file is expected: pass the file itself{inside}."


def not_a_directory_error(
    path: Path | str, expected: str = "a checkpoint directory (lit_model.pth + model_config.yaml)"
) -> ValueError:
    """The one-sentence error for an existing file given where a directory is expected."""
    path = Path(path)
    if fnmatch(path.name, FINETUNED_PATTERN):
        hint = ("it is a fine-tuning output: pass the base model as --checkpoint_dir and this file as "
                f"--adapter_path, or merge it first with `python scripts/merge_ether.py --adapter_path {path}`")
    elif path.suffix == ".gguf":
        hint = (f"import it first with `python scripts/convert_gguf_checkpoint.py --gguf_path {path} "
                "--checkpoint_dir <new folder>`")
    elif path.suffix in (".pth", ".safetensors", ".bin", ".json", ".yaml", ".model"):
        hint = f"pass the folder that holds it, {str(path.parent)!r}"
    else:
        hint = "pass the folder that holds the model's files"
    return ValueError(f"{str(path)!r} is a file, but {expected} is expected: {hint}.")


def check_output_dir(path: Path | str, flag: str) -> Path:
    """Fail early, in one sentence, when the folder `flag` names cannot be created or written into because it, or
    a folder above it, is an existing file (`mkdir` would fail only after the long work)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is an existing file" if p == path else f"cannot be created because {str(p)!r} is a file"
                raise ValueError(f"{flag} {str(path)!r} {where}; pass a folder to write into (it is created if new).")
            why = _not_writable(p)
            if why is not None:
                raise ValueError(f"{flag} {str(path)!r} cannot be written: {why}; pass a folder you can write to.")
            break
    return path


def _not_writable(folder: Path) -> Optional[str]:
    """Why nothing can be written in the existing `folder` (a read-only file system, no permission), or None."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{str(folder)!r} is on a read-only file system"
    except (OSError, AttributeError):  # (no statvfs on Windows)
        pass
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {str(folder)!r}"
    return None


# ---------------------------------------------------------------------------------------------- the Hugging Face Hub
def secret_text(value: Any, flag: str = "--access_token") -> Optional[str]:
    """The text of a token flag typed `SecretStr` (so that `--print_config` masks it), or None.

    YAML turns an unquoted `12345`, `[hf_x]` or `{a: b}` in a `--config` into a number, list or mapping, which the
    Hub would refuse with a confusing error: that is one sentence naming `flag`, which never shows the value.
    """
    value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    if value is None or isinstance(value, str):
        return value
    kind = {bool: "true/false", int: "number", float: "number", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)
    raise ValueError(
        f"{flag} must be text (a token such as hf_...), but it was read as a YAML {kind}: put it in quotes in the "
        "--config file."
    )


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and its causes, outermost first (huggingface_hub re-raises a failed call as a local-cache miss)."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def is_connection_error(error: BaseException) -> bool:
    """Whether `error` itself is a network failure (no connection, DNS, timeout, proxy) rather than a server answer."""
    # huggingface_hub's HTTP stack changed across versions (requests, httpx, httpx2): recognise their network
    # errors by origin rather than importing each one
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    root = type(error).__module__.split(".")[0]
    return root in ("requests", "urllib3", "httpx", "httpx2", "httpcore", "socket") and any(
        word in type(error).__name__ for word in ("Connect", "Timeout", "Network", "Proxy")
    )


def hub_unreachable(error: BaseException) -> bool:
    """Whether a failed Hugging Face Hub call failed because the Hub could not be reached (offline, HF_HUB_OFFLINE,
    a proxy or firewall) rather than because the Hub answered with an error (gated, not found, HTTP 5xx)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = error_chain(error)
    if any(isinstance(e, HfHubHTTPError) for e in chain):
        return False
    return any(isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or is_connection_error(e) for e in chain)


def hub_unreachable_sentence(what: str) -> str:
    """The start of the error for a download `hub_unreachable` explains; the caller ends it with what to do."""
    return (f"Could not reach the Hugging Face Hub to download {what} (offline, HF_HUB_OFFLINE set, or a "
            "proxy/firewall in the way): check the network connection")


# ---------------------------------------------------------------------------------------------- processes
def launched_as_another_rank() -> bool:
    """Whether a launcher started this process as one of a run's processes other than the first.

    Every process of a multi-device run runs the checks before `fabric.launch()`: Fabric's launcher starts the other
    local ranks by running the same command with LOCAL_RANK set, torchrun starts every rank with RANK set. What those
    checks print (warnings, notes) is printed by the first process only, once.
    """
    if "RANK" in os.environ:
        return os.environ["RANK"] != "0"
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def progress_bars_off() -> bool:
    """LIT_GPT_NO_PROGRESS=1: no progress bars (training, evaluation), e.g. for logs written to a file."""
    return os.environ.get("LIT_GPT_NO_PROGRESS") == "1"


def print_once(*args: Any, **kwargs: Any) -> None:
    """`print`, in the first process of a run only (see `launched_as_another_rank`)."""
    if not launched_as_another_rank():
        print(*args, **kwargs)


def check_output_file(path: Path | str, flag: str, example: str = "results.json") -> Path:
    """Fail early, in one sentence naming `flag`, when the file it names could not be written at the end of the
    work: it is a folder, a folder above it is a file, or the nearest existing folder above it is not writable."""
    is_folder = Path(path).is_dir() or str(path).endswith(("/", os.sep))  # (`new/folder/`: a folder to be)
    path = Path(path)
    if is_folder:
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name such as {str(path / example)!r}.")
    for p in path.parents:
        if not p.exists():
            continue
        if not p.is_dir():
            raise ValueError(f"{flag} {str(path)!r} cannot be written because {str(p)!r} is a file, not a folder; "
                             "pass a path inside a folder (missing folders are created).")
        why = _not_writable(p)
        if why is not None:
            raise ValueError(f"{flag} {str(path)!r} cannot be written: {why}; pass a path in a folder you can write "
                             "to.")
        break
    return path


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """The `torch.device` for a `--device` flag: None picks `cuda` when a GPU is available, else `cpu`.

    A string torch does not parse, a CUDA device on a machine or torch build without one, or a GPU index past the
    visible ones raises a one-sentence `ValueError` naming `--device`.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "use cpu, cuda, cuda:N (N the index of a visible GPU) or mps"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; {valid}.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device} was given but no CUDA GPU is available to this torch build; use --device cpu."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"--device {device} names GPU {dev.index} but only {count} GPU(s) are visible; use "
                f"{'cuda:0' if count == 1 else f'cuda:0 to cuda:{count - 1}'} (or set CUDA_VISIBLE_DEVICES)."
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device} was given but MPS is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r} is not supported; {valid}.")
    return dev


def missing_checkpoint_dir_error(checkpoint_dir: Path | str, flag: str = "--checkpoint_dir",
                                 hf_folder: bool = False) -> FileNotFoundError:
    """The one-sentence error for a model folder that does not exist: how to make it (`hf_folder`: a transformers
    folder, which download.py fetches, rather than a converted lit checkpoint)."""
    path = Path(checkpoint_dir)
    parts = path.parts
    # download.py's default folder is checkpoints/<repo_id> (relative): a path of that form names its repo id, and
    # litgpt takes the repo id itself for that folder
    repo_id = "/".join(parts[1:]) if len(parts) == 3 and parts[0] == "checkpoints" else None
    if not path.is_absolute() and len(parts) == 2 and parts[0] not in ("checkpoints", ".", ".."):
        where = Path("checkpoints") / path
        if where.is_dir():
            return FileNotFoundError(f"{flag} {str(path)!r} does not exist, but {str(where)!r} does (where "
                                     f"scripts/download.py --repo_id {path.as_posix()} puts it): pass {flag} {where}.")
        return FileNotFoundError(f"{flag} {str(path)!r} does not exist: if it is a repo id, download and convert it "
                                 f"with `python scripts/download.py --repo_id {path.as_posix()}` (into "
                                 f"{str(where)!r}, the folder to pass); else pass the folder of a converted model, or "
                                 "import a GGUF file with `python scripts/convert_gguf_checkpoint.py`.")
    download = (f"`python scripts/download.py --repo_id {repo_id}`" if repo_id
                else f"`python scripts/download.py --repo_id ORG/NAME --checkpoint_dir {path}`")
    if hf_folder:
        fix = (f"download the model into it with {download}, which converts it too, or pass the folder holding its "
               "config.json and weights")
    else:
        fix = (f"download and convert a model into it with {download}, import a GGUF file with "
               "`python scripts/convert_gguf_checkpoint.py`, or pass the folder of a converted model")
    return FileNotFoundError(f"{flag} {str(path)!r} does not exist: {fix}.")


def read_text_file(path: Path | str, fix: str) -> str:
    """The text of `path`; one that is not UTF-8 raises a `ValueError` naming it and the byte, ending with `fix`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}.") from None


def read_json_object(path: Path | str, fix: str, holds: str = "", error: type[ValueError] = ValueError) -> dict:
    """The JSON object in `path`, else `error` in one sentence naming the file and ending with `fix`: text that is
    not JSON, or JSON that is not an object (`holds` says what the object is)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(path)!r} is not valid JSON ({e}); {fix}.") from None
    if not isinstance(data, dict):
        raise error(f"{str(path)!r} must hold a JSON object{f' ({holds})' if holds else ''}; {fix}.")
    return data


def peft_adapter_error(folder: Path) -> Optional[ValueError]:
    """The error for a folder PEFT's `save_pretrained` wrote (an adapter, not a model), or None."""
    if not (folder / "adapter_config.json").is_file():
        return None
    return ValueError(
        f"{str(folder)!r} holds a PEFT adapter (adapter_config.json), not a model: pass its base model's folder as "
        f"--checkpoint_dir and this folder as --adapter_path (chat, generate, eval and the merge scripts import a "
        f"LoRA, OFT or HRA in memory; `python scripts/convert_peft_adapter.py import --peft_dir {str(folder)!r} "
        "--checkpoint_dir BASE --adapter_path adapter.safetensors` writes it as a file; other PEFT methods: merge "
        "with PEFT's merge_and_unload and convert the result with scripts/convert_hf_checkpoint.py)."
    )


def check_checkpoint_dir(checkpoint_dir: Path | str, weights: str = WEIGHTS_FILENAME,
                         flag: str = "--checkpoint_dir") -> Path:
    """Fail early, in one sentence, when a checkpoint directory lacks what loading needs."""
    from lit_gpt.config import CONFIG_FILENAME

    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_file():
        raise not_a_directory_error(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise missing_checkpoint_dir_error(checkpoint_dir, flag)
    missing = [name for name in (weights, CONFIG_FILENAME) if not (checkpoint_dir / name).is_file()]
    if missing:
        run = finetuning_run_hint(checkpoint_dir)
        if run is not None:
            raise ValueError(f"{run}.")
        peft = peft_adapter_error(checkpoint_dir)
        if peft is not None:
            raise peft
        hf_files = list(checkpoint_dir.glob("*.safetensors")) + list(checkpoint_dir.glob("pytorch_model*.bin"))
        fix = (
            f"convert it first with `python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`"
            if hf_files
            else "download it with `python scripts/download.py --repo_id ORG/NAME` and convert it with "
            "`python scripts/convert_hf_checkpoint.py`, or import a GGUF file with `scripts/convert_gguf_checkpoint.py`"
        )
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} has no {' or '.join(missing)}: {fix}.")
    warn_if_stale_merge(checkpoint_dir)  # a merged/ named directly, after its run was resumed
    return checkpoint_dir


def load_model_weights(
    model: nn.Module,
    path_or_state_dict: Path | str | dict,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    strict: bool = True,
) -> nn.Module:
    """Load a lit state dict into `model` (built on any device, `meta` included), casting floats to `dtype`.

    Parameters are replaced by the loaded tensors (no second copy of the weights is made on the CPU), which is what
    lets a 7B model load in the memory of one copy. The tied output projection may be absent from the file.
    """
    sd = path_or_state_dict if isinstance(path_or_state_dict, dict) else load_file(path_or_state_dict)
    if "model" in sd and isinstance(sd["model"], dict):  # a training checkpoint
        sd = sd["model"]
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied:
        sd.pop("lm_head.weight", None)
    if dtype is not None or device is not None:
        sd = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
              for k, v in sd.items()}
    expected = set(model.state_dict())
    if tied:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if strict and (missing or unexpected):
        where = path_or_state_dict if not isinstance(path_or_state_dict, dict) else "the state dict"
        raise ValueError(
            f"The weights in {where} do not match the model config: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}."
        )
    model.load_state_dict(sd, strict=False, assign=True)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    if device is not None or dtype is not None:
        # parameters that were not in the file (e.g. adapters) still need to land on the device
        model.to(device=device)
        if dtype is not None:
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype and p.device.type != "meta":
                    p.data = p.data.to(dtype)
    return model


def num_parameters(module: nn.Module, requires_grad: Optional[bool] = None) -> int:
    """The parameters of `module` (those that train, or not, with `requires_grad`), frozen weights kept quantized
    (`lit_gpt.quantize`) included."""
    from lit_gpt.quantize import Quantized

    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (requires_grad is not None and p.requires_grad != requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    if requires_grad is not True:
        total += sum(m.numel() for m in module.modules() if isinstance(m, Quantized))
    return total


def lit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as saved to `lit_model.pth` (a tied output projection is stored once)."""
    sd = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_model_weights(model: nn.Module, checkpoint_dir: Path | str) -> Path:
    path = Path(checkpoint_dir) / WEIGHTS_FILENAME
    atomic_save(lit_state_dict(model), path)
    return path
