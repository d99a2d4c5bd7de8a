"""scripts/plot_logs.py: loss curves of several run directories in one PNG, clear errors for bad input."""

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "plot_logs.py"

pytest.importorskip("matplotlib")


def load_script():
    spec = importlib.util.spec_from_file_location("plot_logs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, name: str, method: str, losses: list[float]) -> Path:
    """A run directory as finetune/*.py writes it: hyperparameters.yaml and Lightning's CSV metrics, where
    validation rows leave the training columns empty."""
    run = root / name
    (run / "logs").mkdir(parents=True)
    (run / "hyperparameters.yaml").write_text(f"method: {method}\nadapter_config:\n  method: {method}\n")
    lines = ["loss,lr,step,val_loss"]
    for i, loss in enumerate(losses, start=1):
        lines.append(f"{loss},0.001,{i},")
    lines.append(f",,{len(losses)},{losses[-1] + 0.1}")
    (run / "logs" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_two_runs_make_one_png_of_the_requested_size(tmp_path):
    plot_logs = load_script()
    runs = [fake_run(tmp_path, "a", "ether", [3.0, 2.5, 2.0, 1.8]),
            fake_run(tmp_path, "b", "lora", [3.0, 2.8, 2.6, 2.5])]
    out = plot_logs.plot_runs(runs, tmp_path / "plots" / "loss.png", smooth_window=2)
    assert png_size(out) == (800, 500)  # figsize 8 x 5 inches at 100 dpi
    assert not list((tmp_path / "plots").glob(".*.tmp"))


def test_labels_come_from_the_hyperparameters_and_smoothing_is_a_moving_average(tmp_path):
    plot_logs = load_script()
    run = fake_run(tmp_path, "run1", "etherplus", [4.0, 2.0, 3.0])
    assert plot_logs.run_label(run) == "etherplus (run1)"
    assert plot_logs.read_metric(run, "loss") == ([1.0, 2.0, 3.0], [4.0, 2.0, 3.0])
    assert plot_logs.read_metric(run, "val_loss") == ([3.0], [pytest.approx(3.1)])
    assert plot_logs.smooth([4.0, 2.0, 3.0], 2) == [4.0, 3.0, 2.5]


def test_missing_metrics_and_unknown_column_are_clear_errors(tmp_path):
    plot_logs = load_script()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_logs.plot_runs([tmp_path / "empty"], tmp_path / "x.png")
    run = fake_run(tmp_path, "r", "ether", [1.0])
    with pytest.raises(ValueError, match="no column 'accuracy'"):
        plot_logs.plot_runs([run], tmp_path / "x.png", metric="accuracy")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_cli_prints_one_line_for_a_missing_run(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope"), "--out", str(tmp_path / "l.png")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "metrics.csv" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_takes_run_dirs_as_positional_arguments(tmp_path):
    runs = [str(fake_run(tmp_path, n, "ether", [2.0, 1.0])) for n in ("x", "y")]
    out = tmp_path / "cmp.png"
    result = subprocess.run([sys.executable, str(SCRIPT), *runs, "--out", str(out), "--smooth", "2"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (800, 500)
