"""Sliding-window blocks' ring caches (`RingKVCache`) against whole-length caches (`set_kv_cache(..., ring=False)`,
what litgpt allocates) in generation: tokens per second of greedy `generate` after a long prompt, and the bytes the
KV caches hold. The model has random weights in a small Mistral-v0.1 shape (a window in every block) or Gemma-3
shape (a window in five blocks of six); both sides generate the same tokens (checked). Runs alternate between the
two sides, medians and ratios ring / whole are printed. Example:

    python bench/window_cache.py --arch mistral --prompt 4096 --window 512 --threads 2
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import interleaved_ms, machine, patched, report_table  # noqa: E402

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.generate import generate  # noqa: E402

ARCHS = {
    "mistral": dict(n_layer=6, n_embd=512, n_head=8, n_query_groups=2, intermediate_size=1408),
    "gemma3": dict(n_layer=6, n_embd=512, n_head=8, n_query_groups=2, head_size=64, intermediate_size=1408,
                   mlp_class_name="GemmaMLP", gelu_approximate="tanh", norm_unit_offset=True, scale_embeddings=True,
                   post_attention_norm=True, post_mlp_norm=True, norm_qk=True, rope_local_base_freq=10000.0,
                   sliding_window_indices=[1, 1, 1, 1, 1, 0]),
}


def cache_bytes(model: GPT) -> int:
    return sum(b.attn.kv_cache.k.nbytes + b.attn.kv_cache.v.nbytes for b in model.transformer.h)


def main(
    arch: str = "mistral",
    prompt: int = 4096,
    new: int = 64,
    window: int = 512,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 5,
    write: bool = False,
) -> None:
    """Generate after one long prompt with ring caches and with whole-length ones.

    Args:
        arch: "mistral" (a window in every block) or "gemma3" (in five blocks of six).
        prompt: Prompt tokens.
        new: Generated tokens per run.
        window: The sliding window (Mistral-7B-v0.1's is 4096, Gemma 3's 1024 or 512).
        dtype: "float32" or "bfloat16".
        device: "cpu" or "cuda".
        threads: torch threads on the CPU.
        repeats: Interleaved runs per side; medians are printed.
        write: Record the table in docs/benchmarks.md.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}.")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = {"bias": False, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", **ARCHS[arch]}
    config = Config(name=f"{arch}-like", block_size=prompt + new, vocab_size=32000, padded_vocab_size=32000,
                    sliding_window_size=window, **shape)
    model = GPT(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, config.vocab_size, (prompt,), device=device)
    whole = functools.partial(GPT.set_kv_cache, model, ring=False)

    def run(ring: bool, n: int = new) -> torch.Tensor:
        if ring:
            return generate(model, ids, n, temperature=0.0)
        with patched(model, "set_kv_cache", whole):
            return generate(model, ids, n, temperature=0.0)

    assert torch.equal(run(True), run(False)), "the ring caches generated other tokens"
    sizes = {}
    for ring in (True, False):
        model.set_kv_cache(1, prompt + new, ring=ring)
        sizes[ring] = cache_bytes(model) / 2**20
        model.clear_kv_cache()
    # the prefill alone (one token) too: decoding's rate is the rest of the run's
    ms = interleaved_ms([lambda: run(True), lambda: run(False), lambda: run(True, 1), lambda: run(False, 1)],
                        repeats, device=device)
    rate = [(new - 1) / ((ms[i] - ms[i + 2]) / 1e3) for i in (0, 1)]
    table = ["| caches | prefill ms | prefill + generation ms | decoding tokens/s | KV cache MiB |",
             "|---|---|---|---|---|",
             f"| ring (ours) | {ms[2]:.0f} | {ms[0]:.0f} | {rate[0]:.1f} | {sizes[True]:.1f} |",
             f"| whole length | {ms[3]:.0f} | {ms[1]:.0f} | {rate[1]:.1f} | {sizes[False]:.1f} |",
             f"| ring / whole | {ms[2] / ms[3]:.2f} | {ms[0] / ms[1]:.2f} | {rate[0] / rate[1]:.2f} | "
             f"{sizes[True] / sizes[False]:.3f} |"]
    windowed = sum(config.sliding_window(i) is not None for i in range(config.n_layer))
    setup = (f"{arch}-like, {config.n_layer} blocks ({windowed} with a {window}-token window), n_embd {config.n_embd}, "
             f"{config.n_query_groups} key/value heads of {config.head_size}; a {prompt}-token prompt, {new} greedy "
             f"tokens; {dtype} on {device}, {threads} threads; {repeats} interleaved runs, medians; torch "
             f"{torch.__version__}, {machine()}")
    report_table(f"bench/window_cache.py {arch} {device} {dtype}",
                 f"Sliding windows: ring caches vs whole-length caches in generation (`bench/window_cache.py`, {arch})",
                 setup, table, write)


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    from common import device_check

    run_cli(main, arg_check=device_check)
