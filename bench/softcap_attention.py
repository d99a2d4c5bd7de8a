"""Gemma 2's soft-capped attention, two ways: the eager form (scores, tanh, mask and softmax as plain tensor ops,
what transformers' eager Gemma 2 and litgpt compute) and `lit_gpt.softcap.softcapped_attention` (blocks of queries,
scores recomputed in backward). One attention layer at Gemma-2-2B's shapes (8 query heads, 4 key/value heads, head
size 256, cap 50): milliseconds per forward + backward and the bytes autograd keeps for backward, interleaved
timings, medians, and the ratios ours / eager. Example:

    python bench/softcap_attention.py --threads 2 --lengths 256,512,1024
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import interleaved_ms, machine, report_table  # noqa: E402

from lit_gpt.softcap import softcapped_attention  # noqa: E402


def eager(q, k, v, scale: float, cap: float):
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * scale / cap) * cap
    causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def kept_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(seen.values())


def main(
    lengths: str = "256,512,1024",
    batch: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 7,
    write: bool = False,
) -> None:
    """Time and measure both forms of soft-capped attention at each sequence length.

    Args:
        lengths: Comma-separated sequence lengths.
        batch: Sequences per step.
        dtype: "float32" or "bfloat16".
        device: "cpu" or "cuda".
        threads: torch threads on the CPU.
        repeats: Interleaved timings per form; medians are printed.
        write: Record the table in docs/benchmarks.md.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    heads, groups, hs, cap = 8, 4, 256, 50.0
    scale = hs**-0.5
    dt = getattr(torch, dtype)
    table = ["| tokens | eager ms | ours ms | ours / eager time | eager kept MiB | ours kept MiB | "
             "ours / eager kept |", "|---|---|---|---|---|---|---|"]
    for n in (int(x) for x in lengths.split(",")):
        q = torch.randn(batch, heads, n, hs, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(batch, groups, n, hs, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(batch, groups, n, hs, device=device, dtype=dt, requires_grad=True)
        forms = [lambda: eager(q, k, v, scale, cap), lambda: softcapped_attention(q, k, v, None, scale, cap)]
        torch.testing.assert_close(forms[1](), forms[0](), rtol=0, atol=1e-2 if dt == torch.bfloat16 else 1e-5)

        def step(form):
            return lambda: form().sum().backward()

        times = interleaved_ms([step(f) for f in forms], repeats, device=device)
        kept = [kept_bytes(f) / 2**20 for f in forms]
        table.append(f"| {n} | {times[0]:.1f} | {times[1]:.1f} | {times[1] / times[0]:.2f} | {kept[0]:.1f} | "
                     f"{kept[1]:.1f} | {kept[1] / kept[0]:.3f} |")
    setup = (f"one attention layer, {heads} query / {groups} key-value heads of {hs}, cap {cap:g}, batch {batch}, "
             f"{dtype} on {device}, {threads} threads; {repeats} interleaved timings of forward + backward, medians; "
             f"kept = bytes autograd keeps for backward; torch {torch.__version__}, {machine()}")
    report_table(f"bench/softcap_attention.py {device} {dtype}",
                 "Gemma 2's soft-capped attention: eager vs recomputed scores (`bench/softcap_attention.py`)", setup,
                 table, write)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
