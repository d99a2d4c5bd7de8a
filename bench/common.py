"""What every benchmark here shares: device sync, memory kept for backward, and its section of docs/benchmarks.md."""

from __future__ import annotations

import platform
import shlex
import statistics
from datetime import date
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lit_gpt.utils import atomic_write_text  # noqa: E402

BENCHMARKS_MD = REPO_ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    """The processor's model name and its vector capability as torch sees it (CPU results move a lot between
    machines: a GEMM-fast processor makes the adapters' element-wise share of a step larger)."""
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
                break
    except OSError:
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def device_check(args: list[str]) -> str | None:
    """`run_cli`'s `arg_check` for the scripts with `--device`: a CUDA device asked of a torch that has none, in one
    sentence (instead of torch's assertion deep inside the first `.to(device)`)."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--device" and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--device=") else None)
        if value is not None and value.startswith("cuda") and not torch.cuda.is_available():
            return (f"--device {value}: torch finds no CUDA GPU here (torch.cuda.is_available() is False); run on a "
                    "GPU machine, or pass --device cpu.")
    return None


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_ms(fns: list[Callable[[], object]], repeats: int, calls: int = 1, device: str = "cpu") -> list[float]:
    """Median milliseconds per call of each of `fns`, timed in turn `repeats` times (`calls` calls per timing) after
    one warm-up call each, so a machine's slow spells fall on every function alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            out.append((time.perf_counter() - t0) / calls * 1e3)
    return [statistics.median(t) for t in times]


@contextmanager
def patched(obj: Any, attr: str, value: Any):
    """`obj.attr` set to `value` for the duration of the block, restored afterwards (also on an error)."""
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def saved_bytes(model: nn.Module, step_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes kept for backward by one forward (distinct storages, model weights excluded) + trainable grads.

    Device-independent, so CPU runs report memory too; `step_fn` returns the loss, whose backward is run here.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_fn()
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) + grads


def report_table(name: str, title: str, setup: str, table: list[str], write: bool) -> None:
    """Print the command, the setup and the table; with `write`, record them as docs/benchmarks.md's section `name`
    under the heading `title`."""
    command = command_line()
    print(f"$ {command}\n{setup}\n" + "\n".join(table))
    if write:
        section = f"## {title}\n\nRun on {date.today()}: `{command}`\n\n{setup}\n\n" + "\n".join(table) + "\n"
        write_section(name, section)


def write_section(name: str, section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section between `<!-- name -->` and `<!-- /name -->` in docs/benchmarks.md, or append it."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    body = f"{start}\n{section.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    atomic_write_text(path, text)
    print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    print("bench/common.py is a helper module of the bench/*.py scripts, not a benchmark: run one of those "
          "(e.g. python bench/adapters.py --help).")
