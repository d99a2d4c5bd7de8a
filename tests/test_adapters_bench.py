"""Smoke test of `bench/adapters.py` on a tiny model: every variant builds, runs, and lands in the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "adapters.py"


def load_bench():
    if str(BENCH.parent) not in sys.path:  # as `python bench/adapters.py` would have it, for `import common`
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_adapters", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_runs_every_variant_on_a_tiny_model(capsys):
    pytest.importorskip("peft")
    bench = load_bench()
    threads = torch.get_num_threads()
    try:
        bench.main(shape="tiny", n_layer=1, seq_len=16, batch_size=2, repeats=1, threads=1, write_docs=False)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for label in ("floor", "transformers floor", "ether nb32", "etherplus nb32", "etherplusHH nb32",
                  "ether nb32 low-rank QKV", "ether nb32 weight-centric", "oft b32 exact", "oft b32 neumann5",
                  "lora r8", "peft lora r8", "peft oft b32 exact", "peft oft b32 neumann5", "peft hra r8"):
        assert f"| {label} |" in out
    from lit_gpt.adapters import cpu_kernel

    if cpu_kernel.available():
        for label in ("ether nb32 eager", "etherplus nb32 eager", "etherplusHH nb32 eager",
                      "etherplusHH nb32 projections keep inputs"):
            assert f"| {label} |" in out
    # ours and PEFT train the same number of parameters for LoRA and (upper-triangle) OFT
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3].strip()
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    for tset in ("qv", "all"):
        assert rows[("lora r8", tset)] == rows[("peft lora r8", tset)]
        assert rows[("oft b32 exact", tset)] == rows[("peft oft b32 exact", tset)]
    assert "- etherplusHH nb32, all linear layers:" in out


def test_table_notes_explain_the_cpu_time_column_only_where_the_table_has_it():
    bench = load_bench()
    assert "`CPU time / floor`" in bench.table_notes(cpu_clock=True)
    assert "CPU time" not in bench.table_notes(cpu_clock=False)  # CUDA runs: wall-time ratios only
    assert "`time / floor`" in bench.table_notes(cpu_clock=False)


def test_householder_kernel_bench_prints_both_paths(capsys):
    from lit_gpt.adapters import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C compiler: the kernel could not be built")
    path = BENCH.parent / "householder_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_householder_kernel", path)
    module = importlib.util.module_from_spec(spec)
    load_bench()  # puts bench/ on sys.path for `import common`
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(tokens=64, width=64, nb=4, repeats=2, threads=1)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in ("| ether | forward |", "| ether | forward + backward |", "| etherplus | forward + backward |"):
        assert row in out


def load_script(name: str):
    load_bench()  # puts bench/ on sys.path for `import common`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_benches_print_their_tables(capsys):
    """`bench/lora_shapes.py`, `bench/output_spans.py`, `bench/householder_blocks.py`, `bench/oft_blocks.py`,
    `bench/ab_step.py` and `bench/profile_step.py --against_floor` run on tiny shapes and print a row per
    measurement; `ab_step`'s setting is applied only inside its block and a bad one is refused with its name."""
    from lit_gpt.adapters import cpu_kernel
    from lit_gpt.adapters.ether import HouseholderTransform

    threads = torch.get_num_threads()
    try:
        load_script("lora_shapes").main(tokens=32, r=2, calls=1, repeats=2)
        assert capsys.readouterr().out.count("| gB = gsᵀ C |") == 4
        if cpu_kernel.available():
            load_script("output_spans").main(tokens=16, width=32, nb=4, repeats=2)
            out = capsys.readouterr().out
            assert "| forward |" in out and "| backward |" in out
            load_script("householder_blocks").main(widths=[72, 40], nb=4, mib=0.01, repeats=2)
            out = capsys.readouterr().out  # blocks of 18 and 10: a row per width, update and pass
            assert out.count("| 72 | 18 |") == 6 and out.count("| 40 | 10 |") == 6
            assert cpu_kernel.VECTOR_CODE is True
        load_script("oft_blocks").main(shape="tiny", n_layer=1, block_size=16, repeats=2)
        out = capsys.readouterr().out  # tiny: width 64, MLP 192 -> q, k, v, proj, fc_1, fc_2: 4 blocks; mlp.proj: 12
        assert "7 transforms, 36 blocks of 16 x 16" in out and "| inverse, two-product backward (default) |" in out
        from lit_gpt.adapters import oft

        assert oft.CAYLEY_BY_INVERSE is True  # restored after the solve's turns
        load_script("oft_blocks").main(shape="tiny", n_layer=1, block_size=16, neumann_terms=2, repeats=2)
        out = capsys.readouterr().out
        assert "OFT b16 neumann2" in out and "| Cayley-Neumann to S^2 (default) |" in out
        assert "PyTorch / kernels" in out
        ab = load_script("ab_step")
        spec = "lit_gpt.adapters.ether:HouseholderTransform.merge_output_spans=False"
        with ab.setting(spec):
            assert HouseholderTransform.merge_output_spans is False
        assert HouseholderTransform.merge_output_spans is True
        with pytest.raises(SystemExit, match="no_such_attr"):
            with ab.setting("lit_gpt.adapters.ether:HouseholderTransform.no_such_attr=1"):
                pass
        ab.main(a="-", b=spec, method="etherplusHH", shape="tiny", n_layer=1, seq_len=8, batch_size=1, rounds=2)
        out = capsys.readouterr().out
        assert "| A: `-` |" in out and f"| B: `{spec}` |" in out
        load_script("profile_step").main(method="etherplusHH", shape="tiny", n_layer=1, seq_len=8, batch_size=1,
                                         steps=2, against_floor=True)
        out = capsys.readouterr().out
        assert "etherplusHH against the floor" in out and "all operations" in out and "wall time per step" in out
        if cpu_kernel.available():  # the adapted layers' nodes: time in the method's column only
            node = next(line for line in out.splitlines() if line.startswith("_GroupedLinear "))
            assert float(node.split()[1]) == 0 and float(node.split()[2]) > 0
    finally:
        torch.set_num_threads(threads)


def test_train_bench_keeps_f32_variants_adapters_float32_and_reports_every_row(capsys):
    """`bench/train.py`'s `+f32` variants (the cost of `--adapter_float32`): float32 adapter weights on a bfloat16
    model, and a row of their own beside the plain method's."""
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_train", BENCH.parent / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from lit_gpt import GPT, Config

    config = Config.from_name("Llama-2-7b-hf", **train.SHAPES["tiny"], vocab_size=320)
    base = {k: v.bfloat16() for k, v in GPT(config).state_dict().items()}
    for name, expected in (("etherplusHH", torch.bfloat16), ("etherplusHH+f32", torch.float32),
                           ("lora+f32", torch.float32)):
        model = train.build(name, base, config, ["query", "value"], "cpu", torch.bfloat16)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {expected}, name
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}, name

    threads = torch.get_num_threads()
    try:
        train.main(shape="tiny", dtype="bfloat16", seq_len=16, methods="etherplus,etherplus+f32", repeats=1,
                   warmup=0, threads=1)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| frozen |" in out and "| etherplus |" in out and "| etherplus+f32 |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("script", ["ab_step", "adapters", "chat", "householder_kernel", "lora_shapes", "model",
                                    "oft_blocks", "profile_step", "train"])
def test_a_cuda_device_without_a_gpu_is_one_line(script):
    """The docs invite readers to rerun the GPU commands: on a machine without one, a sentence, not torch's
    assertion at the end of a traceback."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / f"{script}.py"), "--device=cuda:0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --device cuda:0: torch finds no CUDA GPU here (torch.cuda.is_available() is False); run on a GPU "
        "machine, or pass --device cpu."), r.stderr[-2000:]
