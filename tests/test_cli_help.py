"""`--help` of the entrypoints explains every option group, not only the top-level flags."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["finetune/ether.py", "finetune/lora.py", "finetune/full.py"])
def test_finetune_help_describes_the_grouped_options(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    # the attribute docstrings of lit_gpt/args.py's dataclasses
    assert "--io.checkpoint_dir CHECKPOINT_DIR Base model checkpoint (default: the parent of" in text
    assert "--train.global_batch_size GLOBAL_BATCH_SIZE Samples per optimizer step, over all devices" in text
    assert "--eval.interval INTERVAL" in text
    # a run's hyperparameters.yaml is a --config (lit_gpt/cli.py::run_config_args)
    assert "or a run's hyperparameters.yaml to repeat or vary that run; flags after --config override" in text


def test_script_descriptions_show_whole():
    """jsonargparse shows a docstring's first line only; run_cli joins the description so all of it shows."""
    r = subprocess.run([sys.executable, "scripts/merge_ether.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "as a standalone checkpoint. Writes lit_model.pth (base architecture, no adapter keys)" in text
