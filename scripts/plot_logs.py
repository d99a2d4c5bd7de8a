"""Plot training curves of several run directories in one PNG, to compare methods as the ETHER and OFT papers do."""

import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.cli import run_cli  # noqa: E402


def read_metric(run_dir: Path, metric: str = "loss") -> tuple[list[float], list[float]]:
    """(steps, values) of `metric` from `<run_dir>/logs/metrics.csv`, skipping rows where it was not logged."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: pass run directories written by finetune/*.py (their --io.out_dir)."
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if metric not in columns:
            raise ValueError(f"{str(path)!r} has no column {metric!r}; it has {', '.join(columns) or 'none'} "
                             f"(choose one with --metric).")
        steps, values = [], []
        for i, row in enumerate(reader):
            if not row.get(metric):
                continue
            value = float(row[metric])
            if not math.isfinite(value):
                continue
            steps.append(float(row["step"]) if row.get("step") else float(i + 1))
            values.append(value)
    if not values:
        raise ValueError(f"{str(path)!r} has no logged values of {metric!r} yet.")
    return steps, values


def run_label(run_dir: Path) -> str:
    """The method the run was trained with (from its hyperparameters.yaml), with the directory name to tell
    runs of one method apart; the directory name alone when the file is missing."""
    import yaml

    run_dir = Path(run_dir)
    hparams = run_dir / "hyperparameters.yaml"
    if not hparams.is_file():
        return run_dir.name
    data = yaml.safe_load(hparams.read_text(encoding="utf-8")) or {}
    method = data.get("method")
    adapter = data.get("adapter_config") or {}
    if isinstance(adapter, dict) and adapter.get("method"):
        method = adapter["method"]
    return f"{method} ({run_dir.name})" if method and method != run_dir.name else run_dir.name


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what exists so far)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[Path], out: Path, metric: str = "loss", smooth_window: int = 1,
              title: Optional[str] = None) -> Path:
    """Draw `metric` against the optimizer step for every run into `out` (written atomically), in the image format
    its suffix names (`.png`, `.svg`, `.pdf`, ...; PNG when it has none)."""
    from lit_gpt.utils import atomic_path, check_output_file

    if not run_dirs:
        raise ValueError("Pass at least one run directory.")
    if smooth_window < 1:
        raise ValueError(f"--smooth must be at least 1, got {smooth_window}.")
    out = check_output_file(out, "--out", example="loss.png")
    curves = [(run_label(d), *read_metric(d, metric)) for d in run_dirs]
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, steps, values in curves:
        ax.plot(steps, smooth(values, smooth_window), label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(metric if smooth_window == 1 else f"{metric} (moving average of {smooth_window})")
    ax.set_title(title or f"{metric} per optimizer step")
    ax.grid(True, alpha=0.3)
    ax.legend()
    # the temporary file's name has no meaningful suffix, so the format is passed, taken from the real name
    image_format = out.suffix[1:].lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if image_format not in supported:
        plt.close(fig)
        raise ValueError(f"--out {str(out)!r}: matplotlib cannot write .{image_format} files; use a name ending in "
                         f"{', '.join('.' + s for s in sorted(supported))}.")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=image_format)
    plt.close(fig)
    return out


def main(run_dirs: list[Path], out: Path = Path("loss.png"), metric: str = "loss", smooth: int = 1,
         title: Optional[str] = None) -> None:
    """Plot the training loss (or another logged metric) of several fine-tuning runs in one image.

    Usage: `python scripts/plot_logs.py RUN_DIR [RUN_DIR ...] [--out loss.png] [--metric loss] ...`, e.g.
    `python scripts/plot_logs.py logs/quickstart/* --out loss.png`: the run directories come first, before any
    flag (or give them as `--run_dirs '["RUN_DIR", ...]'` anywhere).

    Args:
        run_dirs: Run directories (each finetune run's --io.out_dir, holding logs/metrics.csv).
        out: The image file to write; its suffix picks the format (.png, .svg, .pdf, ...).
        metric: Column of metrics.csv to plot (loss, val_loss, lr, ...).
        smooth: Moving-average window in logged points (1: raw values).
        title: Plot title (default: "<metric> per optimizer step", e.g. "loss per optimizer step").
    """
    try:
        path = plot_runs(run_dirs, out, metric=metric, smooth_window=smooth, title=title)
    except ImportError as e:  # run_cli prints only file and value errors without a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"Wrote {path} ({len(run_dirs)} runs, metric {metric!r}).")


def _positional_run_dirs(argv: list[str]) -> list[str]:
    """Accept `plot_logs.py RUN_DIR [RUN_DIR ...] --out x.png`: jsonargparse reads a list flag as one JSON value,
    so leading bare paths become `--run_dirs '[...]'`."""
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        i += 1
    return (["--run_dirs", json.dumps(argv[:i])] if i else []) + argv[i:]


if __name__ == "__main__":
    sys.argv[1:] = _positional_run_dirs(sys.argv[1:])
    run_cli(main)
