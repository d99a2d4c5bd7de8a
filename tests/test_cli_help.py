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


# the first line of each bench script's --help says what it measures (jsonargparse shows only that line)
BENCH_FIRST_LINES = {
    "bench/ab_step.py": "each divided by the floor's (the same model, no adapter)",
    "bench/householder_blocks.py": "Time the CPU kernel's ETHER/ETHER+ update per block size",
    "bench/launch_overhead.py": "CUDA only: host microseconds per call",
    "bench/lora_shapes.py": "Time LoRA's small backward products as written and transposed",
    "bench/output_spans.py": "Time ETHER+HH's output side on a fused QKV output",
}


@pytest.mark.parametrize("script", sorted(BENCH_FIRST_LINES))
def test_bench_help_says_what_the_script_measures(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert BENCH_FIRST_LINES[script] in " ".join(r.stdout.split())


def test_launch_overhead_without_cuda_fails_in_one_sentence():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the benchmark would run")
    r = subprocess.run([sys.executable, "bench/launch_overhead.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert r.stdout == ""
    assert r.stderr.startswith("error: bench/launch_overhead.py is CUDA only") and len(r.stderr.splitlines()) == 1


def test_bench_common_says_it_is_a_helper_module():
    r = subprocess.run([sys.executable, "bench/common.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and "helper module" in r.stdout


def test_plot_logs_help_shows_the_positional_form_and_the_real_title_default():
    r = subprocess.run([sys.executable, "scripts/plot_logs.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "python scripts/plot_logs.py logs/quickstart/* --out loss.png" in text
    assert "the run directories come first, before any flag" in text
    assert '(default: "<metric> per optimizer step"' in text


def test_finetune_help_shows_oft_eps_default_and_full_precision_choices():
    def help_text(script):
        r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return " ".join(r.stdout.split())

    ether = help_text("finetune/ether.py")
    assert "null (unset) means 6e-5" in ether and "`eps / sqrt(nb)`" in ether
    full = help_text("finetune/full.py")
    choices = full.rsplit("--precision PRECISION", 1)[1].split("(default:", 1)[0]
    assert "bf16-true" in choices and "16-true" not in choices.replace("bf16-true", "")


def _closed_stdout(*command: str) -> subprocess.CompletedProcess:
    """Runs `command` with stdout a pipe whose reader has already gone, as in `command | head -0`."""
    proc = subprocess.Popen(list(command), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, "", err)


def test_help_and_output_to_a_closed_pipe_end_without_a_traceback():
    """`--help | head -1` of the script with subcommands (its own usage text, not argparse's) exits 0 quietly; a
    script whose output is cut short by a closed pipe says so in one line on stderr and exits as SIGPIPE would."""
    r = _closed_stdout(sys.executable, "scripts/convert_peft_adapter.py", "--help")
    assert (r.returncode, r.stderr) == (0, "")
    program = ("import sys; sys.path.insert(0, '.'); from lit_gpt.cli import run_cli\n"
               "def lines(n: int = 100000):\n    'Print n lines.'\n    for i in range(n): print(i)\n"
               "run_cli(lines, args=[])")
    r = _closed_stdout(sys.executable, "-c", program)
    assert r.returncode == 141 and r.stderr == ("error: stdout was closed before the script finished (a `| head`?); "
                                                "it stopped there.\n"), r.stderr
