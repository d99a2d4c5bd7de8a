"""Generate text from a lit checkpoint, streaming the answer (or --num_samples answers) to stdout."""

import sys
import time
from pathlib import Path
from typing import Iterator, Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_gpt import Tokenizer  # noqa: E402
from lit_gpt.tokenizer import check_utf8  # noqa: E402
from lit_gpt.data.prompts import prompt_style_from_name  # noqa: E402
from lit_gpt.generate import PromptCache, check_sampling, generate_stream  # noqa: E402
from lit_gpt.quantize import check_kind  # noqa: E402
from lit_gpt.merge import (  # noqa: E402
    PRECISIONS,
    checkpoint_dir_for,
    load_finetuned,
    read_prompt_style_file,
    resolve_prompt_style,
)
from lit_gpt.utils import (  # noqa: E402
    WEIGHTS_FILENAME,
    check_checkpoint_dir,
    finetuning_run_hint,
    merge_script_for,
    resolve_device,
    run_adapter_file,
    run_model_folder,
)

RUN_CONFIG_FIX = ("generate with the run's adapter unmerged, --checkpoint_dir {base} --adapter_path {adapter}, or "
                  "with its merged checkpoint (scripts/merge_ether.py or merge_lora.py write {merged}) as "
                  "--checkpoint_dir")


def check_model_dir(checkpoint_dir: Path) -> None:
    """`check_checkpoint_dir`, with a fine-tuning run's folder given as --checkpoint_dir refused in words that fit
    this script: pass its model folder (final/, merged/), or its adapter file as --adapter_path, or merge it first."""
    if not (checkpoint_dir / WEIGHTS_FILENAME).is_file() and finetuning_run_hint(checkpoint_dir) is not None:
        folder = run_model_folder(checkpoint_dir)
        if folder is not None:
            raise ValueError(f"{str(checkpoint_dir)!r} is a fine-tuning run, not a model: pass its model folder, "
                             f"--checkpoint_dir {folder}.")
        adapter = run_adapter_file(checkpoint_dir)
        merge = merge_script_for(adapter)
        raise ValueError(
            f"{str(checkpoint_dir)!r} is a fine-tuning run, not a model: pass --adapter_path {adapter} (its base model "
            f"comes from the run), or merge it first with `python scripts/{merge} --adapter_path {adapter}` and pass "
            f"its output, {str(checkpoint_dir / 'merged')!r}, as --checkpoint_dir."
        )
    check_checkpoint_dir(checkpoint_dir)


def main(
    checkpoint_dir: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    precision: Optional[Literal["bf16-true", "16-true", "32-true"]] = None,
    device: Optional[str] = None,
    chat_template: bool = True,
    system_prompt: Optional[str] = None,
    seed: int = 1234,
    num_samples: int = 1,
    quantize: Optional[str] = None,
) -> None:
    """Generate an answer to `--prompt` with the model in `--checkpoint_dir` and print tokens/s to stderr.

    With --num_samples N above 1, the model is loaded once and answers N times: stdout then holds N blocks, each a
    header line `--- sample I of N ---` followed by the answer, with a blank line between blocks (an answer may have
    blank lines of its own, so the headers are what tell them apart); each sample's tokens/s line goes to stderr.
    The samples after the first take the prompt from the KV cache the first one filled: they feed its last token only.

    Args:
        checkpoint_dir: A lit checkpoint (lit_model.pth, model_config.yaml and tokenizer files): a merged one, or
            the base model of --adapter_path (default with --adapter_path: the base model its run recorded).
        adapter_path: An adapter file (lit_model_*_finetuned.pth) applied to --checkpoint_dir without merging, a
            Hugging Face PEFT adapter folder (imported in memory for --checkpoint_dir, which it needs), or a full
            fine-tuning state dict (lit_model_finetuned.pth); its run's prompt format is used (for a PEFT folder,
            its prompt_style.yaml).
        prompt: The user's message (or the raw text to continue with --chat_template false).
        max_new_tokens: Stop after this many new tokens (fewer if the model's context ends first).
        temperature: Sampling temperature; 0 always picks the most likely token.
        top_k: Sample among the k most likely tokens only (null: all).
        top_p: Sample from the smallest set of tokens whose probability adds up to top_p (1.0: all).
        precision: Weight dtype: bf16-true, 16-true or 32-true (as chat/base.py and eval take it); default
            bf16-true on a GPU that supports it, else 32-true.
        device: "cpu", "cuda", "cuda:1", ...; default the first GPU if there is one.
        chat_template: Format the prompt as the model was trained: with --adapter_path, the style its run trained
            with; else the style of the checkpoint's `prompt_style.yaml` (what `scripts/merge_ether.py` writes for a
            fine-tuned model), else its chat template when it has one; false sends the prompt as raw text.
        system_prompt: A system message (chat template and chatml styles only).
        seed: Random seed for sampling, set once: the samples of --num_samples differ from each other, and the
            same seed gives the same samples again (the first one is the answer --num_samples 1 gives).
        num_samples: How many answers to sample for the prompt from the one loaded model (at least 1); above 1,
            each is printed after a line `--- sample I of N ---`, with a blank line between them.
        quantize: `nf4` (QLoRA's 4-bit NormalFloat, 0.56 bytes per weight), `nf4-dq` (with QLoRA's double
            quantization, 0.52) or `int8` (1 byte): keep the linear weights of the transformer blocks,
            adapted ones too, in that format (`lit_gpt/quantize.py`), for a model that would not fit on the
            device otherwise; each weight is decoded at every forward pass, so tokens come slower.
    """
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}.")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")
    if system_prompt is not None and not chat_template:
        raise ValueError("--system_prompt needs a prompt format; it is unused with --chat_template false.")
    check_sampling(temperature, top_k, top_p, flag_prefix="--")
    check_kind(quantize)
    check_utf8(prompt, "--prompt")
    checkpoint_dir = checkpoint_dir_for(checkpoint_dir, adapter_path)
    if adapter_path is None:
        check_model_dir(checkpoint_dir)
    else:
        check_checkpoint_dir(checkpoint_dir)
    device = resolve_device(device)
    if precision is None:
        precision = "bf16-true" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    torch_dtype = PRECISIONS[precision]

    tokenizer = Tokenizer(checkpoint_dir)
    text = prompt
    spec = read_prompt_style_file(checkpoint_dir) if chat_template else None
    if chat_template and adapter_path is not None:  # the format the run trained with
        style = resolve_prompt_style(checkpoint_dir, adapter_path, tokenizer=tokenizer)
        if system_prompt is not None:
            style = prompt_style_from_name(style.name, checkpoint_dir, system_prompt=system_prompt, tokenizer=tokenizer)
        text = style.apply(prompt)
    elif spec is not None or (chat_template and tokenizer.chat_template is not None):
        name = spec["prompt_style"] if spec is not None else "chat_template"
        if system_prompt is None and spec is not None:
            system_prompt = spec.get("system_prompt")
        text = prompt_style_from_name(name, checkpoint_dir, system_prompt=system_prompt, tokenizer=tokenizer
                                      ).apply(prompt)
    elif system_prompt is not None:
        raise ValueError(f"--system_prompt needs a chat template or a prompt_style.yaml, and {str(checkpoint_dir)!r} "
                         "has neither.")
    ids = tokenizer.encode(text, device=device)
    if num_samples > 1 and (temperature == 0 or top_k == 1):
        greedy = "--temperature 0" if temperature == 0 else "--top_k 1"
        print(f"Note: {greedy} is greedy decoding, so the {num_samples} samples will be identical.", file=sys.stderr)
    # the prompt before the model: its mistakes need no weights
    model = load_finetuned(checkpoint_dir, adapter_path, device=device, dtype=torch_dtype, quantize=quantize)

    # seeded once: each sample goes on from where the one before left the generator
    generator = torch.Generator(device=device).manual_seed(seed)
    count = 0

    def counted(tokens: Iterator[int]) -> Iterator[int]:
        nonlocal count
        for token in tokens:
            count += 1
            yield token

    # the samples after the first take the prompt's keys and values from the cache the first one filled
    cache = PromptCache(model) if num_samples > 1 else None
    for i in range(num_samples):
        count = 0
        start = time.perf_counter()
        stream = generate_stream(
            model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_id=tokenizer.stop_ids, generator=generator, prompt_cache=cache,
        )
        try:
            if num_samples > 1:
                if i > 0:
                    print()  # the blank line between samples
                print(f"--- sample {i + 1} of {num_samples} ---", flush=True)
            for piece in tokenizer.decode_stream(counted(stream)):
                print(piece, end="", flush=True)
            print(flush=True)
        except BrokenPipeError:  # `| head` closed stdout: the reader has what it wanted
            from lit_gpt.cli import silence_stdout
            silence_stdout()
            return
        elapsed = time.perf_counter() - start
        print(
            f"{count} tokens in {elapsed:.2f} s: {count / elapsed:.2f} tokens/s (prompt of {ids.numel()} tokens"
            f"{f', {cache.reused} of them cached' if cache is not None else ''}, "
            f"{device.type}, {str(torch_dtype).removeprefix('torch.')})",
            file=sys.stderr,
        )
    if device.type == "cuda":
        print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.02f} GB", file=sys.stderr)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    from lit_gpt.cli import run_cli

    run_cli(main, run_config_fix=RUN_CONFIG_FIX)
