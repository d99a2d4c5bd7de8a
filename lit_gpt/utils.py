"""Checkpoint I/O and small helpers shared by every entrypoint.

Two rules hold everywhere: a file is written to a temporary name in the same directory and renamed into place (so
a crash never leaves a half-written checkpoint), and loading never runs pickled code (`safetensors`, or
`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

WEIGHTS_FILENAME = "lit_model.pth"


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600; the finished file should have the permissions an ordinary open() would give it
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        # again: writers that replace the file themselves (safetensors' save_file) bring back 0600
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    """Load a `.safetensors` or torch file without executing pickled code; tensors stay on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load

        return st_load(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:  # mmap needs the zipfile format; old-style files load without it
        return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint_dir(checkpoint_dir: Path | str, weights: str = WEIGHTS_FILENAME) -> Path:
    """Fail early, in one sentence, when a checkpoint directory lacks what loading needs."""
    from lit_gpt.config import CONFIG_FILENAME

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(checkpoint_dir)!r} does not exist.")
    missing = [name for name in (weights, CONFIG_FILENAME) if not (checkpoint_dir / name).is_file()]
    if missing:
        hf_files = list(checkpoint_dir.glob("*.safetensors")) + list(checkpoint_dir.glob("pytorch_model*.bin"))
        fix = (
            f"convert it first with `python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`"
            if hf_files
            else "download it with `python scripts/download.py --repo_id ORG/NAME` and convert it with "
            "`python scripts/convert_hf_checkpoint.py`, or import a GGUF file with `scripts/convert_gguf_checkpoint.py`"
        )
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} has no {' or '.join(missing)}: {fix}.")
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
        raise RuntimeError(
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
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (requires_grad is not None and p.requires_grad != requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
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
