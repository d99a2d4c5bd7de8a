"""Autoregressive generation: one streaming loop with a KV cache, and `generate` built on it.

The prompt is prefilled in one forward pass, then one token is decoded per step against the cache. Stop sequences
are matched on token ids; tokens that might begin a stop sequence are held back until it is clear they do not, so a
stream never shows text that `generate` would later cut off.

`generate_batch` decodes several prompts of different lengths together: left-padded into one batch, with per-row
positions and a padding mask (`GPT.forward(..., pad_lengths=...)`), rows leaving the batch as they finish.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

StopTokens = Iterable[Union[int, Sequence[int]]]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose probabilities sum to at least `top_p` (Holtzman
    et al., 2019, arXiv 1904.09751); the most probable token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # mass of the tokens strictly more probable than each one: a token is in the nucleus while that is < top_p
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = mass_before >= top_p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def check_sampling(temperature: float, top_k: Optional[int], top_p: float, flag_prefix: str = "") -> None:
    """Refuse, in one sentence, sampling settings `sample` cannot use. Scripts call it with `flag_prefix="--"` at
    start-up, so that the message names their flag before the model is loaded."""
    if not temperature >= 0:  # NaN too
        raise ValueError(f"{flag_prefix}temperature must be >= 0 (0 is greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{flag_prefix}top_k must be a positive integer or None, got {top_k}.")
    if not 0.0 < top_p <= 1.0:
        greedy = f"{flag_prefix}temperature 0" if flag_prefix else "temperature=0"
        greedy = f"; for greedy decoding (litgpt's top_p=0) pass {greedy}" if top_p == 0 else ""
        raise ValueError(f"{flag_prefix}top_p must be in (0, 1] (1 keeps every token), got {top_p}{greedy}.")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The next token id(s) from logits of shape `(..., vocab)`; temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _normalize_stops(stop_tokens: StopTokens, eos_id: Union[int, Sequence[int], None]) -> list[tuple[int, ...]]:
    stops: list[tuple[int, ...]] = []
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    for stop in [*eos, *stop_tokens]:
        seq = (int(stop),) if isinstance(stop, int) else tuple(int(t) for t in stop)
        if not seq:
            raise ValueError("An empty stop sequence would stop generation before it starts.")
        if seq not in stops:
            stops.append(seq)
    return stops


def _held_back(tokens: list[int], stops: list[tuple[int, ...]]) -> int:
    """How many trailing tokens could still be the start of a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(tokens)), longest, -1):
            if tuple(tokens[-n:]) == stop[:n]:
                longest = n
                break
    return longest


class PromptCache:
    """A conversation's KV cache kept from one `generate_stream(..., prompt_cache=...)` call to the next, with the
    token ids it holds (the last call's prompt and the answer tokens decoded after it). A call whose prompt starts
    with some of them computes only the rest: a chat's next turn prefills its new message, not the whole
    conversation again (llama.cpp's prompt cache, HF's past_key_values passed back in).

    It grows by half again when a call needs more room, keeping what it holds. A prompt that shares nothing, or
    a sliding-window model whose ring caches have moved past the shared part, is prefilled whole; `reset()` frees
    the cache. One per model and conversation: the model holds the cache while it exists."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tokens: list[int] = []  # the ids whose keys and values the cache holds, at positions 0, 1, ...
        self.capacity = 0  # the cache's positions (0: none yet)
        self.writing = False  # a forward that writes the cache has not returned (an error in it leaves it unknown)
        self.held = None  # the first block's cache object, to notice a cache set or cleared by someone else
        self.reused = 0  # the prompt positions the last call took from the cache

    def reset(self) -> None:
        if self.capacity and self._first_cache() is self.held:
            self.model.clear_kv_cache()
        self.tokens, self.capacity, self.writing, self.held = [], 0, False, None

    def _first_cache(self):
        return self.model.transformer.h[0].attn.kv_cache

    def start(self, prompt: list[int], needed: int) -> int:
        """Make room for `needed` positions and return the position from which `prompt` must be prefilled: past
        the longest prefix the cache holds, but at least its last token (whose logits the caller needs)."""
        if self.writing or self._first_cache() is not self.held:
            # an error (or an interruption) inside a forward leaves what the cache holds unknown; generation
            # without this PromptCache replaces the model's cache (and frees it at its end)
            self.reset()
        shared = 0
        for a, b in zip(self.tokens, prompt[:-1]):
            if a != b:
                break
            shared += 1
        if needed > self.capacity:  # (a first call allocates what it needs; later ones half as much again)
            capacity = min(self.model.config.block_size, max(needed, self.capacity * 3 // 2))
            if self.capacity and shared:
                self.model.resize_kv_cache(capacity, keep=shared)
            else:
                self.model.set_kv_cache(batch_size=1, max_seq_length=capacity)
                shared = 0
            self.capacity, self.held = capacity, self._first_cache()
        if shared and not self.model.rewind_kv_cache(shared):
            shared = 0
        if not shared:
            self.model.rewind_kv_cache(0)
        self.tokens, self.reused = prompt[:shared], shared
        return shared


def _prefill_last_logits(model: nn.Module, prompt: torch.Tensor, device: torch.device, start: int = 0
                         ) -> torch.Tensor:
    """Logits of the last prompt position after filling the KV cache with the prompt (from position `start`, the
    cache holding the positions before it).

    A plain `GPT` projects only that position onto the vocabulary: over every prompt position the projection was
    ~18% of a short prefill (SmolLM2-135M, 38 tokens, bench/chat.py) and, for a long prompt and a large vocabulary,
    gigabytes of logits. A wrapped model (Fabric, FSDP: `type` is not `GPT`) goes through its own forward, whose
    hooks (sharded parameters, autocast) calling `lm_head` directly would bypass.
    """
    from lit_gpt.model import GPT

    input_pos = torch.arange(start, prompt.size(0), device=device)
    idx = prompt[start:].view(1, -1)
    if type(model) is GPT:
        hidden = model(idx, input_pos=input_pos, lm_head=False, input_pos_maxp1=prompt.size(0))
        return model.logits(hidden[:, -1:])[0, -1]
    return model(idx, input_pos=input_pos, input_pos_maxp1=prompt.size(0))[0, -1]


@torch.inference_mode()
def generate_stream(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_tokens: StopTokens = (),
    eos_id: Union[int, Sequence[int], None] = None,
    generator: Optional[torch.Generator] = None,
    prompt_cache: Optional[PromptCache] = None,
) -> Iterator[int]:
    """Yield new token ids one by one as they are decided.

    Args:
        model: A `lit_gpt.GPT` (or a wrapper of one, with its `config`, `set_kv_cache` and forward arguments).
        prompt: 1-D tensor of prompt token ids, on the model's device.
        max_new_tokens: At most this many tokens are generated; fewer when the prompt plus them would exceed the
            model's `block_size`.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample only among the `top_k` most likely tokens.
        top_p: Sample only from the nucleus of probability mass `top_p`.
        stop_tokens: Stop sequences: each an int or a sequence of ids (e.g. a chat template's end-of-turn).
        eos_id: End-of-sequence id(s); generation stops there. Neither EOS nor a stop sequence is yielded.
        generator: Random generator for reproducible sampling.
        prompt_cache: Keep the KV cache for the next call (`PromptCache`), which then prefills only what its
            prompt adds to this one's prompt and answer; default: a cache for this call, freed at its end.
    """
    if prompt.ndim != 1:
        raise ValueError(f"generate expects a 1-D prompt of token ids, got shape {tuple(prompt.shape)}.")
    T = prompt.size(0)
    if T == 0:
        raise ValueError("The prompt is empty; generation needs at least one token to condition on.")
    block_size = model.config.block_size
    if T >= block_size:
        raise ValueError(f"The prompt has {T} tokens; the model's block_size {block_size} leaves no room to generate.")
    max_new_tokens = min(max_new_tokens, block_size - T)
    if max_new_tokens <= 0:
        return
    stops = _normalize_stops(stop_tokens, eos_id)
    device = prompt.device

    cache = prompt_cache
    start = 0
    if cache is None:
        model.set_kv_cache(batch_size=1, max_seq_length=T + max_new_tokens, device=device)
    else:
        start = cache.start(prompt.tolist(), T + max_new_tokens)
    try:
        if cache is not None:
            cache.writing = True
        logits = _prefill_last_logits(model, prompt, device, start)
        if cache is not None:
            cache.tokens, cache.writing = prompt.tolist(), False
        generated: list[int] = []
        emitted = 0
        input_pos = torch.tensor([T], device=device)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            generated.append(int(token))
            for stop in stops:
                if len(generated) - emitted >= len(stop) and tuple(generated[-len(stop):]) == stop:
                    yield from generated[emitted:len(generated) - len(stop)]
                    return
            safe = len(generated) - _held_back(generated[emitted:], stops)
            yield from generated[emitted:safe]
            emitted = safe
            if step + 1 == max_new_tokens:
                break
            # (attention reads the cache up to this token only)
            if cache is not None:
                cache.writing = True
            logits = model(token.view(1, 1), input_pos=input_pos, input_pos_maxp1=T + step + 1)[0, -1]
            if cache is not None:
                cache.tokens.append(generated[-1])
                cache.writing = False
            input_pos.add_(1)
        yield from generated[emitted:]
    finally:
        if cache is None:
            model.clear_kv_cache()


def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_tokens: StopTokens = (),
    eos_id: Union[int, Sequence[int], None] = None,
    generator: Optional[torch.Generator] = None,
    include_prompt: bool = True,
) -> torch.Tensor:
    """The prompt followed by the generated ids (1-D), without the EOS/stop tokens that ended it.

    Same arguments as `generate_stream`; `include_prompt=False` returns only the new tokens.
    """
    new = list(
        generate_stream(
            model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_tokens=stop_tokens, eos_id=eos_id, generator=generator,
        )
    )
    new_tensor = torch.tensor(new, dtype=prompt.dtype, device=prompt.device)
    return torch.cat((prompt, new_tensor)) if include_prompt else new_tensor


def _ends_with_stop(tokens: list[int], stops: list[tuple[int, ...]]) -> int:
    """The length of the stop sequence `tokens` ends with, 0 if none."""
    for stop in stops:
        if len(tokens) >= len(stop) and tuple(tokens[-len(stop):]) == stop:
            return len(stop)
    return 0


def _last_logits(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor, pad_lengths: torch.Tensor,
                 maxp1: int) -> torch.Tensor:
    """`(B, vocab)` logits of each row's last position; a plain `GPT` projects only that position (see
    `_prefill_last_logits`). `maxp1`: the columns of the cache written so far, these included."""
    from lit_gpt.model import GPT

    if type(model) is GPT:
        hidden = model(idx, input_pos=input_pos, lm_head=False, pad_lengths=pad_lengths, input_pos_maxp1=maxp1)
        return model.logits(hidden[:, -1])
    return model(idx, input_pos=input_pos, pad_lengths=pad_lengths, input_pos_maxp1=maxp1)[:, -1]


def _keep_rows(model: nn.Module, rows: torch.Tensor) -> None:
    """Drop finished rows from every layer's KV cache, so that they stop costing compute."""
    for module in model.modules():
        cache = getattr(module, "kv_cache", None)
        if cache is not None:
            cache.k = cache.k.index_select(0, rows)
            cache.v = cache.v.index_select(0, rows)


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_tokens: StopTokens = (),
    eos_id: Union[int, Sequence[int], None] = None,
    generator: Optional[torch.Generator] = None,
    include_prompt: bool = True,
    stop_check: Optional[Callable[[int, list[int]], bool]] = None,
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """`generate` for several prompts at once: one 1-D tensor per prompt, in the order given.

    The prompts are left-padded into one batch: a prefill forward, then one forward per step for the rows still
    generating; a row leaves the batch at its EOS/stop sequence (not included in its result, as in `generate`) or
    when `stop_check(row, new_tokens)` returns True (the tokens so far are kept: for stop strings the caller cuts
    in text). Each row gets at most `max_new_tokens`, and at most what the longest prompt leaves of the model's
    `block_size`. Greedy rows equal `generate` on each prompt alone up to floating-point rounding; sampled rows
    draw from the same distributions, though not the same random numbers.

    Args:
        model: A `lit_gpt.GPT` (or a wrapper of one, with its `config`, `set_kv_cache` and forward arguments).
        prompts: 1-D tensors of prompt token ids on the model's device, of any lengths.
        pad_id: The token id fed at padding positions (never attended to; any valid id).
        The other arguments are those of `generate_stream`.
    """
    if not prompts:
        return []
    for i, prompt in enumerate(prompts):
        if prompt.ndim != 1 or prompt.numel() == 0:
            raise ValueError(
                f"generate_batch expects non-empty 1-D prompts of token ids; prompt {i} has shape {tuple(prompt.shape)}."
            )
    lengths = [p.size(0) for p in prompts]
    longest = max(lengths)
    block_size = model.config.block_size
    if longest >= block_size:
        raise ValueError(
            f"A prompt has {longest} tokens; the model's block_size {block_size} leaves no room to generate."
        )
    max_new_tokens = min(max_new_tokens, block_size - longest)
    stops = _normalize_stops(stop_tokens, eos_id)
    device = prompts[0].device
    new: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens > 0:
        idx = torch.full((len(prompts), longest), pad_id, dtype=prompts[0].dtype, device=device)
        for row, prompt in enumerate(prompts):
            idx[row, longest - prompt.size(0):] = prompt
        pad_lengths = torch.tensor([longest - n for n in lengths], device=device)
        active = list(range(len(prompts)))  # original index of each batch row still generating
        model.set_kv_cache(batch_size=len(prompts), max_seq_length=longest + max_new_tokens, device=device)
        try:
            logits = _last_logits(model, idx, torch.arange(longest, device=device), pad_lengths, longest)
            input_pos = torch.tensor([longest], device=device)
            for step in range(max_new_tokens):
                tokens = sample(logits, temperature, top_k, top_p, generator)
                keep = []
                for row, (i, token) in enumerate(zip(active, tokens.tolist())):
                    new[i].append(token)
                    n_stop = _ends_with_stop(new[i], stops)
                    if n_stop:
                        del new[i][-n_stop:]
                    elif stop_check is None or not stop_check(i, new[i]):
                        keep.append(row)
                if not keep or step + 1 == max_new_tokens:
                    break
                if len(keep) < len(active):
                    rows = torch.tensor(keep, device=device)
                    _keep_rows(model, rows)
                    tokens, pad_lengths = tokens.index_select(0, rows), pad_lengths.index_select(0, rows)
                    active = [active[row] for row in keep]
                logits = _last_logits(model, tokens.view(-1, 1), input_pos, pad_lengths, longest + step + 1)
                input_pos.add_(1)
        finally:
            model.clear_kv_cache()
    out = []
    for prompt, tokens in zip(prompts, new):
        tensor = torch.tensor(tokens, dtype=prompt.dtype, device=device)
        out.append(torch.cat((prompt, tensor)) if include_prompt else tensor)
    return out
