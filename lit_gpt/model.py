"""One decoder-only transformer covering every family in `lit_gpt.config`.

Module names (stable; adapters, converters and FSDP wrapping rely on them):

    transformer.wte                 token embedding
    transformer.wpe                 learned positions (GPT-2 only)
    transformer.h[i].norm_1         pre-attention norm (an Identity without `pre_norms`, OLMo 2/3)
    transformer.h[i].attn.qkv       fused projection; rows are [all query heads | all key heads | all value heads]
    transformer.h[i].attn.norm_q    per-head query norm, weight of head_size (only with `norm_qk`, Qwen3); over all
                                    the query heads with `norm_qk_type` "all" (OLMo 2/3)
    transformer.h[i].attn.norm_k    key norm (only with `norm_qk`), likewise
    transformer.h[i].attn.proj      attention output
    transformer.h[i].post_attention_norm  norm of the attention output (only with `post_attention_norm`, Gemma 2/3)
    transformer.h[i].norm_2         pre-MLP norm (absent when the attention norm is shared, Phi; an Identity
                                    without `pre_norms`)
    transformer.h[i].mlp.fc_1/fc_2  gate / up (LLaMAMLP, GemmaMLP);   .mlp.fc  (GptNeoxMLP)
    transformer.h[i].mlp.proj       MLP output
    transformer.h[i].post_mlp_norm  norm of the MLP output (only with `post_mlp_norm`, Gemma 2/3)
    transformer.ln_f                final norm
    lm_head                         output projection (shares `wte.weight` when `tie_embeddings`)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lit_gpt import recompute
from lit_gpt.config import Config
from lit_gpt.softcap import softcap, softcapped_attention

NO_KV_CACHE = "input_pos was given but no KV cache is set: call model.set_kv_cache() first."


class GPT(nn.Module):
    """A decoder-only transformer described by a `Config`: Llama, Mistral, Qwen2, Qwen3, Phi, Gemma, GPT-NeoX/Pythia
    and GPT-2 styles (norms, MLP, rotary or learned positions, grouped queries, parallel residual, per-head query/key
    norms, sliding-window and soft-capped attention), one fused QKV projection per layer.
    `GPT.from_checkpoint(dir)` loads a lit checkpoint; `apply_adapters(model, config)` adapts it."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=build_norm(config),
            )
        )
        if config.pos_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # (cos, sin) in float32 by table (`rope_cache`'s `local`, `long`); rebuilt on demand, never saved
        self._rope_caches: dict[tuple[bool, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        # recompute each block in backward instead of keeping its activations (set by the training loop)
        self.activation_checkpointing = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: Path | str,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "GPT":
        """Build the model described by `checkpoint_dir/model_config.yaml` and load `lit_model.pth` into it."""
        from lit_gpt.utils import check_checkpoint_dir, load_model_weights

        checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        config = Config.from_checkpoint(checkpoint_dir)
        with torch.device("meta"):
            model = cls(config)
        load_model_weights(model, checkpoint_dir / "lit_model.pth", device=device, dtype=dtype)
        return model

    def tie_weights(self) -> None:
        """Re-share the output projection with the embedding (after a load that replaced parameters)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    # ------------------------------------------------------------------ rope
    def rope_cache(self, length: int, device: torch.device, local: bool = False, long: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of at least `length` positions; `local`: those of the sliding-window blocks' own base; `long`:
        LongRoPE's long factors (`rope_adjustments`)."""
        cache = self._rope_caches.get((local, long))
        if cache is None or cache[0].size(0) < length or cache[0].device != device:
            # grow geometrically so generation does not rebuild it every token
            n = max(length, 2 * cache[0].size(0) if cache is not None else 0, 256)
            if torch.compiler.is_compiling():
                cache = build_rope_cache(n, self.config, device, local, long)
            else:  # never an inference tensor (one built while generating could not take part in training)
                with torch.inference_mode(False):
                    cache = build_rope_cache(n, self.config, device, local, long)
            self._rope_caches[(local, long)] = cache
        return cache

    def _rope(self, length: int, device: torch.device, dtype: torch.dtype, rows: Optional[torch.Tensor],
              local: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(cos, sin) in `dtype` of positions `rows` (tensor of positions, any shape) or of the first `length`."""
        if self.config.rope_n_elem == 0:
            return None, None
        long = False
        adj = self.config.rope_adjustments
        if adj and "long_factor" in adj and not local:
            # LongRoPE (Phi-3.5, Phi-4-mini): the long factors for a whole forward whose last position is past the
            # original context, the short ones otherwise (as transformers decides it, call by call: keys already in
            # a KV cache keep the rotation they were made with)
            last = length if rows is None else int(rows.max()) + 1
            long = last > adj["original_max_seq_len"]
        cos, sin = self.rope_cache(length, device, local, long)
        if rows is None:
            cos, sin = cos[:length], sin[:length]
        else:
            cos, sin = cos[rows], sin[rows]
        return cos.to(dtype), sin.to(dtype)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx)
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(positions)
        if self.config.scale_embeddings:  # the factor in x's dtype first, as Gemma computes it
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if self.config.embedding_multiplier is not None:  # (Granite)
            x = x * self.config.embedding_multiplier
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection of final hidden states, soft-capped (Gemma 2) or divided (Granite) where the config
        says so."""
        out = self.lm_head(hidden)
        if self.config.logits_scaling is not None:
            out = out / self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        return out if cap is None else softcap(out, cap)

    # ------------------------------------------------------------------ kv cache
    def set_kv_cache(
        self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None, ring: bool = True
    ) -> None:
        """Give every attention layer a KV cache of `batch_size` rows and `max_seq_length` positions (default: the
        block size), on the weights' device and dtype unless given; `forward(idx, input_pos=...)` then decodes
        incrementally. `clear_kv_cache()` removes them.

        A sliding-window block keeps only its window's last positions (`RingKVCache`) when `max_seq_length` exceeds
        the window: Mistral-7B-v0.1's cache at 32K positions takes an eighth of the memory, Gemma 3's about a fifth.
        Such a cache takes the positions in order, each chunk after the last (as generation does); `ring=False`
        gives every block the whole length, for a caller that goes back to positions it decoded before."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(
                f"A KV cache of {max_seq_length} tokens exceeds the model's block_size {self.config.block_size}."
            )
        ref = self.transformer.wte.weight
        device = device or ref.device
        dtype = dtype or ref.dtype
        for block in self.transformer.h:
            window = block.attn.window
            if ring and window is not None and window < max_seq_length:
                block.attn.kv_cache = RingKVCache(batch_size, max_seq_length, window, self.config, device, dtype)
            else:
                block.attn.kv_cache = KVCache(batch_size, max_seq_length, self.config, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def resize_kv_cache(self, max_seq_length: int, keep: int) -> None:
        """Give every block a KV cache of `max_seq_length` positions holding what its cache holds for positions 0 to
        `keep` - 1 (written in order, as generation writes them), as `set_kv_cache` would have made it: a
        sliding-window block's ring when the window is shorter, the whole length otherwise."""
        if not 0 <= keep <= max_seq_length <= self.config.block_size:
            raise ValueError(f"resize_kv_cache needs 0 <= keep ({keep}) <= max_seq_length ({max_seq_length}) <= the "
                             f"block size ({self.config.block_size}).")
        for block in self.transformer.h:
            old = block.attn.kv_cache
            if old is None:
                raise RuntimeError(NO_KV_CACHE)
            window = block.attn.window
            B, device, dtype = old.k.size(0), old.k.device, old.k.dtype
            if isinstance(old, RingKVCache):  # (a ring stays a ring: its window is below the old length already)
                old.max_seq_length = max_seq_length
                continue
            if window is not None and window < max_seq_length:
                new = RingKVCache(B, max_seq_length, window, self.config, device, dtype)
                if keep:
                    positions = torch.arange(max(0, keep - window), keep, device=device)
                    new(positions, old.k[:, :, positions], old.v[:, :, positions])
            else:
                new = KVCache(B, max_seq_length, self.config, device, dtype)
                new.k[:, :, :keep] = old.k[:, :, :keep]
                new.v[:, :, :keep] = old.v[:, :, :keep]
            block.attn.kv_cache = new

    def rewind_kv_cache(self, length: int) -> bool:
        """Forget the cached positions from `length` on, so that decoding goes on at position `length` with the
        keys and values before it (a chat's next turn keeps those of the conversation so far). False, with nothing
        forgotten, when a sliding-window block's ring no longer holds the window before `length` (positions
        written since have taken its slots): the caller must then fill the cache from position 0 again."""
        rings = [block.attn.kv_cache for block in self.transformer.h
                 if isinstance(block.attn.kv_cache, RingKVCache)]
        if rings and length > 0:  # (every ring holds the same positions: those of the last `window` written)
            ring = rings[0]
            held = ring.columns[ring.columns >= 0]
            if held.numel() == 0:
                return False
            low, high = (int(x) for x in torch.aminmax(held))
            if low > max(0, length - ring.window + 1) or high < length - 1:
                return False
        for ring in rings:
            ring.columns.masked_fill_(ring.columns >= length, -1)
            ring.empty = ring.empty or length == 0
        return True

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        *,
        lm_head: bool = True,
        labels: Optional[torch.Tensor] = None,
        pad_lengths: Optional[torch.Tensor] = None,
        input_pos_maxp1: Optional[int] = None,
        router_aux_loss: bool = False,
        lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `(B, T, padded_vocab_size)` for token ids `(B, T)`.

        `input_pos` (shape `(T,)`) are the positions of `idx` when decoding with a KV cache (`set_kv_cache`).
        `lm_head=False` returns the final normalised hidden states instead.
        `labels` (`(B, T)`, -100 where no loss is wanted) returns the mean next-token cross-entropy instead, computed
        here so that sharded (FSDP) training gathers the output projection once, and computed in chunks so that
        full-vocabulary logits never exist for all tokens at once.

        `pad_lengths` (`(B,)`, with `input_pos` and a KV cache) decodes a left-padded batch: row b's first
        `pad_lengths[b]` cache columns are padding, its token at column t gets position t - pad_lengths[b], and no
        real token ever attends to a padding column.

        `input_pos_maxp1` (with `input_pos`): a number above every position written to the KV cache so far, this
        call's included (as litgpt's argument of that name). Attention then reads that many cache columns instead of
        all of them: early tokens of a long generation do not pay for the whole cache. Generation passes it.

        `router_aux_loss=True` (a mixture-of-experts model) returns `(output, aux)`: `aux` is the load-balancing loss
        of the routing of every MoE block (`load_balancing_loss`), which training adds, scaled, to the loss.
        `lengths` (`(B,)`) are then the real tokens of each right-padded row: the padding after them is left out of
        it, as transformers leaves out what its `attention_mask` masks.
        """
        if router_aux_loss:
            return self._with_router_aux_loss(idx, input_pos, lm_head, labels, lengths)
        if lengths is not None:
            raise ValueError("lengths (the rows' real tokens) is for router_aux_loss=True only.")
        if input_pos_maxp1 is not None:
            self._limit_kv_caches(input_pos, input_pos_maxp1)
        try:
            if pad_lengths is not None:
                return self._forward_padded(idx, input_pos, pad_lengths, lm_head)
            return self._forward(idx, input_pos, lm_head, labels)
        finally:
            if input_pos_maxp1 is not None:
                self._limit_kv_caches(None, None)

    def _with_router_aux_loss(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor], lm_head: bool,
                              labels: Optional[torch.Tensor], lengths: Optional[torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        moes = [block.mlp for block in self.transformer.h if isinstance(block.mlp, LLaMAMoE)]
        if not moes:
            raise ValueError(f"router_aux_loss=True needs a mixture-of-experts model (mlp_class_name 'LLaMAMoE'): "
                             f"{self.config.name!r} has no router to balance.")
        B, T = idx.shape
        mask = None
        if lengths is not None:
            if lengths.shape != (B,):
                raise ValueError(f"lengths must have shape ({B},) for a batch of {B} rows, got {tuple(lengths.shape)}.")
            mask = (torch.arange(T, device=idx.device)[None, :] < lengths.to(idx.device)[:, None]).reshape(-1)
        routing: list[tuple[torch.Tensor, torch.Tensor]] = []
        for moe in moes:  # (recorded in this forward only: activation checkpointing's rerun in backward records none)
            moe.routing = routing
        try:
            out = self._forward(idx, input_pos, lm_head, labels)
        finally:
            for moe in moes:
                moe.routing = None
        return out, load_balancing_loss(routing, self.config.n_expert, mask)

    def _limit_kv_caches(self, input_pos: Optional[torch.Tensor], maxp1: Optional[int]) -> None:
        """Have the whole-length KV caches return their first `maxp1` columns (None: all of them)."""
        if maxp1 is not None:
            cache = self.transformer.h[0].attn.kv_cache
            if input_pos is None or cache is None:
                raise ValueError("input_pos_maxp1 needs input_pos and a KV cache: call model.set_kv_cache() first.")
            if isinstance(maxp1, bool) or not isinstance(maxp1, int) or not 1 <= maxp1 <= cache.max_seq_length:
                raise ValueError(f"input_pos_maxp1 must be an int from 1 to the KV cache's {cache.max_seq_length} "
                                 f"positions, got {maxp1!r}.")
        for block in self.transformer.h:
            if isinstance(block.attn.kv_cache, KVCache):
                block.attn.kv_cache.limit = maxp1

    def _forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor], lm_head: bool,
                 labels: Optional[torch.Tensor]) -> torch.Tensor:
        T = idx.size(1)
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"Cannot forward a sequence of {T} tokens: the model's block_size is {self.config.block_size}."
                )
            positions = torch.arange(T, device=idx.device)
            needed = T
        else:
            positions = input_pos
            if self.transformer.h[0].attn.kv_cache is None:
                raise RuntimeError(NO_KV_CACHE)
            needed = self.transformer.h[0].attn.kv_cache.max_seq_length

        x = self._embed(idx, positions)
        ropes = self._block_ropes(needed, idx.device, x.dtype, input_pos)
        # the mask of the sliding-window blocks (None: the plain causal one serves, as for the other blocks)
        window_mask = self._window_mask(positions, T, self._columns_read(needed), idx.device,
                                        self._ring_columns(input_pos))
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            cos, sin = ropes[block.attn.local_rope]
            mask = window_mask if block.attn.window is not None else None
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, input_pos, mask)
        x = self.transformer.ln_f(x)
        if labels is not None:
            return chunked_cross_entropy(x[:, :-1], labels[:, 1:], self.lm_head,
                                         final_softcap=self.config.final_logit_softcapping,
                                         logits_scaling=self.config.logits_scaling)
        return self.logits(x) if lm_head else x

    def _block_ropes(self, length: int, device: torch.device, dtype: torch.dtype, rows: Optional[torch.Tensor]
                     ) -> dict[bool, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """{local: (cos, sin)}: the RoPE tables of the blocks with the global base (False) and, when the config
        gives the sliding-window blocks a base of their own, of those (True)."""
        ropes = {False: self._rope(length, device, dtype, rows)}
        if self.config.rope_local_base_freq is not None:
            ropes[True] = self._rope(length, device, dtype, rows, local=True)
        return ropes

    def _columns_read(self, cache_len: int) -> int:
        """How many columns of a whole-length KV cache attention reads (`input_pos_maxp1`'s limit, else all)."""
        for block in self.transformer.h:
            if isinstance(block.attn.kv_cache, KVCache):
                return block.attn.kv_cache.limit or cache_len
        return cache_len

    def _ring_columns(self, input_pos: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The cache columns (positions) of the keys a sliding-window block with a `RingKVCache` attends to: its
        slots' (-1: empty; none before the first chunk), then `input_pos`'s; None when no block has one (every ring
        holds the same columns)."""
        if input_pos is None:
            return None
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            if isinstance(cache, RingKVCache):
                return input_pos if cache.empty else torch.cat((cache.columns, input_pos))
        return None

    def _window_mask(self, positions: torch.Tensor, T: int, cache_len: int, device: torch.device,
                     keys: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The boolean mask (T, keys) of the sliding-window blocks' attention: causal and at most the window back;
        None where plain causal attention is the same (no key is ever further back than the window). `keys`: the
        columns of the keys when not 0, 1, ..., `cache_len` - 1 (`_ring_columns`; -1 for an empty slot)."""
        window = self.config.sliding_window_size
        if keys is None:
            if window is None or max(T, cache_len) <= window:
                return None
            keys = torch.arange(cache_len, device=device)
        back = positions[:, None] - keys[None, :]
        return (back >= 0) & (back < window) & (keys[None, :] >= 0)

    def _forward_padded(
        self, idx: torch.Tensor, input_pos: Optional[torch.Tensor], pad_lengths: torch.Tensor, lm_head: bool
    ) -> torch.Tensor:
        # a separate path so that the unpadded forward (training, batch-1 generation) stays exactly as it was
        if input_pos is None or self.transformer.h[0].attn.kv_cache is None:
            raise ValueError("pad_lengths needs input_pos and a KV cache: call model.set_kv_cache() first.")
        B, T = idx.shape
        if pad_lengths.shape != (B,):
            raise ValueError(f"pad_lengths must have shape ({B},) for a batch of {B} rows, got {tuple(pad_lengths.shape)}.")
        cache_len = self.transformer.h[0].attn.kv_cache.max_seq_length
        read = self._columns_read(cache_len)
        # padding columns get position 0; whatever they compute is never attended to by a real token
        positions = (input_pos[None, :] - pad_lengths[:, None]).clamp(min=0)  # (B, T)
        x = self._embed(idx, positions)
        # (B, 1, T, n): broadcasts over the heads of (B, heads, T, head_size)
        ropes = {local: (None, None) if cos is None else (cos.unsqueeze(1), sin.unsqueeze(1))
                 for local, (cos, sin) in self._block_ropes(cache_len, idx.device, x.dtype, positions).items()}
        columns = torch.arange(read, device=idx.device)
        causal = input_pos[:, None] >= columns[None, :]  # (T, S)
        real = columns[None, :] >= pad_lengths[:, None]  # (B, S)
        # a padding query may see itself only: a row with no visible key would give NaN, and NaN values in the cache
        # poison real rows (0 attention weight times NaN is NaN)
        itself = input_pos[:, None] == columns[None, :]
        mask = ((causal[None] & real[:, None]) | itself[None]).unsqueeze(1)  # (B, 1, T, S)
        # (a row's padding shifts its positions and columns alike: the window counts back over columns)
        ring = self._ring_columns(input_pos)
        if ring is not None:  # the sliding-window blocks attend to their slots' columns, then input_pos
            real = ring[None, :] >= pad_lengths[:, None]
            itself = input_pos[:, None] == ring[None, :]
            window = self._window_mask(input_pos, T, cache_len, idx.device, ring)  # (causal, and no empty slot)
            window_mask = ((window[None] & real[:, None]) | itself[None]).unsqueeze(1)
        else:
            window = self._window_mask(input_pos, T, read, idx.device)
            window_mask = mask if window is None else mask & window
        for block in self.transformer.h:
            cos, sin = ropes[block.attn.local_rope]
            x = block(x, cos, sin, input_pos, mask if block.attn.window is None else window_mask)
        x = self.transformer.ln_f(x)
        return self.logits(x) if lm_head else x


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024, ignore_index: int = -100,
    final_softcap: Optional[float] = None, logits_scaling: Optional[float] = None,
) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` (divided by `logits_scaling`, then soft-capped in float32 by
    `final_softcap`) against `targets`, over the positions whose target is not ignored.

    Only those positions go through the output projection (prompt tokens masked out of the loss cost nothing there),
    and when they exceed `chunk_size` each chunk's logits are recomputed in backward rather than kept.
    """
    keep = targets != ignore_index
    hidden, targets = hidden[keep], targets[keep]
    n = targets.numel()
    if n == 0:  # a micro-batch whose answers were all truncated away: a zero that still has a graph
        return hidden.sum() * 0.0 + sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if logits_scaling is not None:
            logits = logits / logits_scaling
        if final_softcap is not None:
            logits = softcap(logits, final_softcap)
        return F.cross_entropy(logits, t, reduction="sum")

    if n <= chunk_size:
        return chunk_loss(hidden, targets) / n
    total = sum(
        torch.utils.checkpoint.checkpoint(chunk_loss, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size))
    )
    return total / n


def load_balancing_loss(routing: list[tuple[torch.Tensor, torch.Tensor]], n_expert: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer's auxiliary load-balancing loss (Fedus et al., JMLR 2022, arXiv 2101.03961, eqs. 4-6) over
    the routing of every MoE block, as transformers computes it for Mixtral and Qwen-MoE: `n_expert * sum_e f_e P_e`,
    where `f_e` is how often expert `e` is among a token's chosen ones and `P_e` its mean router probability, both
    averaged over the real tokens (`mask`, flat `(tokens,)`, True where real; default: all) of all blocks together.

    `routing` holds each block's `(probs, chosen)`: the router's probabilities `(tokens, n_expert)` and the indices of
    the chosen experts `(tokens, k)`. The loss is `k` when every expert gets the same share of tokens and of
    probability, and grows as the routing concentrates; the gradient reaches the probabilities only (`f_e` counts)."""
    if not routing:
        raise ValueError("load_balancing_loss needs the routing of at least one MoE block.")
    device, dtype = routing[0][0].device, routing[0][0].dtype  # (float32, or float64 for a float64 model)
    counts = torch.zeros(n_expert, device=device, dtype=dtype)
    prob_sums = torch.zeros(n_expert, device=device, dtype=dtype)
    rows = torch.zeros((), device=device, dtype=dtype)
    for probs, chosen in routing:
        k = chosen.size(-1)
        if mask is None:
            counts = counts.index_add(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=device, dtype=dtype))
            prob_sums = prob_sums + probs.sum(0)
            rows = rows + probs.size(0)
        else:  # (index_add, not bincount: no wait for the device to say how many experts were chosen)
            real = mask.to(device=device, dtype=dtype)
            counts = counts.index_add(0, chosen.reshape(-1), real.repeat_interleave(k))
            prob_sums = prob_sums + (probs * real[:, None]).sum(0)
            rows = rows + real.sum()
    rows = rows.clamp(min=1)  # (a batch of padding only: a loss of 0, not NaN)
    return n_expert * ((counts / rows) * (prob_sums / rows)).sum()


class Block(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        # (OLMo 2/3, pre_norms=False: none, the post norms alone; an Identity, holding no weights)
        self.norm_1 = build_norm(config) if config.pre_norms else nn.Identity()
        self.attn = CausalSelfAttention(config, block_idx)
        # (None: no module, so the state dict of every other family stays as it was)
        self.post_attention_norm = build_norm(config) if config.post_attention_norm else None
        self.norm_2 = (None if config.shared_attention_norm else
                       build_norm(config) if config.pre_norms else nn.Identity())
        self.mlp = {"LLaMAMLP": LLaMAMLP, "GemmaMLP": GemmaMLP, "LLaMAMoE": LLaMAMoE}.get(
            config.mlp_class_name, GptNeoxMLP)(config)
        self.post_mlp_norm = build_norm(config) if config.post_mlp_norm else None
        self.parallel_residual = config.parallel_residual
        self.residual_multiplier = config.residual_multiplier

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        x_normed = self.norm_1(x)
        h = self.attn(x_normed, cos, sin, input_pos, mask)
        if self.parallel_residual:
            mlp_in = x_normed if self.norm_2 is None else self.norm_2(x)
            return x + h + self.mlp(mlp_in)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        if self.residual_multiplier is not None:  # (Granite)
            h = h * self.residual_multiplier
        x = x + h
        h = self.mlp(self.norm_2(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        if self.residual_multiplier is not None:
            h = h * self.residual_multiplier
        return x + h


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.config = config
        self.block_idx = block_idx
        hs = config.head_size
        self.q_size = config.n_head * hs
        self.kv_size = config.n_query_groups * hs
        self.qkv = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size, bias=config.attn_bias)
        self.proj = nn.Linear(self.q_size, config.n_embd, bias=config.bias)
        if config.norm_qk:  # (no attributes otherwise: the state dict of every other family stays as it was)
            every = config.norm_qk_type == "all"  # (OLMo 2/3: over all the heads at once)
            self.norm_q = build_norm(config, self.q_size if every else hs)
            self.norm_k = build_norm(config, self.kv_size if every else hs)
        self.window = config.sliding_window(block_idx)
        self.rope = config.rope_in_block(block_idx)  # (False: no position embedding, SmolLM3's NoPE blocks)
        # whether this block rotates with the sliding-window blocks' own RoPE base
        self.local_rope = self.window is not None and config.rope_local_base_freq is not None
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        """`mask` (boolean, broadcastable to `(B, heads, T, keys)`) replaces the causal mask (the model passes the
        sliding-window one, and that of a left-padded batch)."""
        B, T, _ = x.shape
        c = self.config
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        if c.norm_qk and c.norm_qk_type == "all":  # over all the heads' features (OLMo 2/3), before RoPE
            q, k = self.norm_q(q), self.norm_k(k)
        q = q.view(B, T, c.n_head, c.head_size).transpose(1, 2)
        k = k.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        v = v.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        if c.norm_qk and c.norm_qk_type == "head":
            # over each head's features, before RoPE (the cache keeps normed, rotated keys)
            q, k = self.norm_q(q), self.norm_k(k)
        if self.rope:
            q = apply_rope(q, cos, sin, c.rope_n_elem)
            k = apply_rope(k, cos, sin, c.rope_n_elem)

        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError(NO_KV_CACHE)
            k, v = self.kv_cache(input_pos, k, v)
            if mask is None:
                mask = input_pos[:, None] >= torch.arange(k.size(2), device=k.device)[None, :]
        scale = c.attention_scale or 1.0 / math.sqrt(c.attention_scores_scalar or c.head_size)
        if c.attention_logit_softcapping is not None:
            y = softcapped_attention(q, k, v, mask, scale, c.attention_logit_softcapping)
        else:
            gqa = c.n_query_groups != c.n_head
            if gqa and mask is not None and T > 1 and q.is_cuda:
                # of CUDA's kernels only flash attention (no mask) and the math one (which keeps every score for
                # backward) take enable_gqa: with a mask (a sliding window, a padded batch), repeat the key/value
                # heads instead so that the memory-efficient kernel runs
                k = k.repeat_interleave(c.n_head // c.n_query_groups, dim=1)
                v = v.repeat_interleave(c.n_head // c.n_query_groups, dim=1)
                gqa = False
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                scale=scale,
                enable_gqa=gqa,
            )
        y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return self.proj(y)


class KVCache(nn.Module):
    """The keys and values of `max_seq_length` positions, written at `input_pos`; attention reads all of them, or
    the first `limit`."""

    def __init__(self, batch_size: int, max_seq_length: int, config: Config, device, dtype) -> None:
        super().__init__()
        self.max_seq_length = max_seq_length
        self.limit: Optional[int] = None  # return only the first `limit` columns (`GPT.forward`'s input_pos_maxp1)
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k = self.k.to(k.dtype)
        self.v = self.v.to(v.dtype)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        if self.limit is not None:
            return self.k[:, :, :self.limit], self.v[:, :, :self.limit]
        return self.k, self.v


class RingKVCache(nn.Module):
    """A sliding-window block's cache: the keys and values of its last `window` positions, position p in slot
    p % window, and `columns` the position each slot holds (-1: none yet). A call returns the slots' keys and
    values (none on the first call) followed by those of `input_pos` (the model's mask, from `columns`, lets each
    query see the window back from it), then keeps the last `window` of the new ones in their slots. Positions must
    come in order, each chunk after the last: a slot once overwritten is gone."""

    def __init__(self, batch_size: int, max_seq_length: int, window: int, config: Config, device, dtype) -> None:
        super().__init__()
        self.max_seq_length = max_seq_length  # (the positions it may be given: the RoPE tables' length)
        self.window = window
        shape = (batch_size, config.n_query_groups, window, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("columns", torch.full((window,), -1, device=device, dtype=torch.long), persistent=False)
        self.empty = True  # (kept on the host: a prefill into an empty ring attends to its own keys only)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k = self.k.to(k.dtype)
        self.v = self.v.to(v.dtype)
        if self.empty:
            keys, values = k, v
        else:
            keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.empty = False
        n = min(k.size(2), self.window)
        slots = input_pos[-n:] % self.window
        self.k.index_copy_(2, slots, k[:, :, -n:])
        self.v.index_copy_(2, slots, v[:, :, -n:])
        self.columns.index_copy_(0, slots, input_pos[-n:].to(self.columns.dtype))
        return keys, values


class GptNeoxMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        a = self.fc(x)
        h = F.gelu(a, approximate=self.approximate)
        if recompute.keeps(a):  # gelu keeps its input: an adapter on proj rebuilds h from it
            recompute.mark(h, functools.partial(F.gelu, approximate=self.approximate), a)
        return self.proj(h)


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.fc_1 = nn.Linear(config.n_embd, width, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, width, bias=config.bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)

    def forward(self, x):
        # adapters with output-side transforms on fc_1 or fc_2 may run them with the SiLU and the product as one
        # node (`AdaptedLinear.swiglu`); None: the plain form below
        fused = getattr(self.fc_1, "swiglu", None)
        h = fused(self.fc_2, x) if fused is not None else None
        if h is not None:
            return self.proj(h)
        return self._gated(F.silu(self.fc_1(x)), self.fc_2(x))

    def _gated(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = a * b
        if recompute.keeps(a) and recompute.keeps(b):  # the product keeps both: an adapter on proj rebuilds h
            recompute.mark(h, torch.mul, a, b, form="mul" if a.dtype == b.dtype else None)
        return self.proj(h)


class GemmaMLP(LLaMAMLP):
    """Gemma's gated MLP: `proj(gelu(fc_1(x)) * fc_2(x))`, GELU as `gelu_approximate` says (Gemma's is "tanh"). No
    fused path: the adapters' fused gate-and-up node computes SiLU."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        return self._gated(F.gelu(self.fc_1(x), approximate=self.approximate), self.fc_2(x))


class LLaMAMoE(nn.Module):
    """A mixture of SwiGLU experts (Mixtral's sparse MoE block): the router `gate` scores the experts of each token,
    which goes to the `n_expert_per_token` most probable; their outputs are summed, weighted by those probabilities
    (renormalised to sum to 1 with `moe_norm_topk`). The routing is computed in float32 (or float64), as transformers
    computes it. With `shared_expert_intermediate_size` (Qwen2-MoE), a shared expert adds its output, scaled by
    `sigmoid(shared_expert_gate(x))`, for every token.

    Every expert runs, on no tokens if none chose it, so that every adapter of every expert is in the autograd graph
    of every step: with FSDP each process must reduce the same gradients, whichever experts its tokens chose.
    Without gradients (generation, evaluation) such an expert is skipped: a decoded token runs its k experts only."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(
            LLaMAMLP(config, config.expert_intermediate_size) for _ in range(config.n_expert))
        self.n_expert_per_token = config.n_expert_per_token
        self.norm_topk = config.moe_norm_topk
        shared = config.shared_expert_intermediate_size
        self.shared_expert = LLaMAMLP(config, shared) if shared else None
        self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False) if shared else None
        # while a list (`GPT.forward(..., router_aux_loss=True)`), each forward appends its (probs, chosen)
        self.routing: Optional[list] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        weights, chosen = probs.topk(self.n_expert_per_token, dim=-1)  # (tokens, k)
        if self.routing is not None:
            self.routing.append((probs, chosen))
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # the (token, slot) pairs grouped by expert, tokens in order within each: one sort, one read of the counts
        order = chosen.reshape(-1).argsort(stable=True)
        counts = torch.bincount(chosen.reshape(-1), minlength=len(self.experts)).tolist()
        tokens = (order // self.n_expert_per_token).split(counts)
        token_weights = weights.reshape(-1)[order].split(counts)
        y = torch.zeros_like(x)
        every = torch.is_grad_enabled()  # (without gradients, as in generation, an expert no token chose is skipped)
        for expert, idx, w, n in zip(self.experts, tokens, token_weights, counts):
            if n or every:
                y.index_add_(0, idx, (expert(x[idx]) * w[:, None]).to(x.dtype))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (as Llama's reference does). With
    `unit_offset` (Gemma) it scales by `1 + weight`, in float32 before the cast back, as Gemma does."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            y = _rms_unit_scale(xf, rstd, self.weight, x.dtype)
            if recompute.keeps(xf):
                recompute.mark(y, functools.partial(_rms_unit_scale, dtype=x.dtype), xf, rstd, self.weight)
            return y
        y = _rms_scale(xf, rstd, self.weight, x.dtype)
        if recompute.keeps(xf):  # the norm keeps xf and rstd: an adapter on the next layer rebuilds y from them
            # with the weight in x's dtype, y is recompute's "scale" form: weight * (xf * rstd).to(x.dtype)
            scale = x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            recompute.mark(y, functools.partial(_rms_scale, dtype=x.dtype), xf, rstd, self.weight,
                           form="scale" if scale else None)
        return y

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)


def _rms_scale(xf: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight * (xf * rstd).to(dtype)


def _rms_unit_scale(xf: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((xf * rstd) * (1.0 + weight.float())).to(dtype)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose output an adapter on the next layer can rebuild from the input the norm keeps anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if recompute.keeps(x):
            fn = functools.partial(_layer_norm, shape=self.normalized_shape, eps=self.eps)
            recompute.mark(y, fn, x, self.weight, self.bias)
        return y


def _layer_norm(x, weight, bias, shape, eps):
    return F.layer_norm(x, shape, weight, bias, eps)


def build_norm(config: Config, size: Optional[int] = None) -> nn.Module:
    """The config's norm over `size` features (default: the model width)."""
    size = size or config.n_embd
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(size, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
    return LayerNorm(size, eps=config.norm_eps)


def rope_inv_freq(config: Config, device=None, local: bool = False, long: bool = False) -> torch.Tensor:
    """RoPE's frequencies; `local`: those of the sliding-window blocks' own base (`rope_local_base_freq`, plain);
    `long`: with LongRoPE's long factors rather than its short ones."""
    n = config.rope_n_elem
    base = config.rope_local_base_freq if local else config.rope_base
    adj = None if local else config.rope_adjustments
    if adj and "long_factor" in adj:  # LongRoPE: one factor per frequency divides it
        factors = torch.tensor(adj["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (factors * base ** (torch.arange(0, n, 2, device=device, dtype=torch.int64).float() / n))
    inv_freq = 1.0 / (base ** (torch.arange(0, n, 2, device=device, dtype=torch.float32) / n))
    if adj and set(adj) == {"factor"}:  # linear scaling (Gemma 3): positions divided by the factor
        return inv_freq / adj["factor"]
    if adj and "beta_fast" in adj:
        return _yarn(inv_freq, n, base, adj)
    if adj:
        # Llama-3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, the band between blended
        factor, lo, hi = adj["factor"], adj["low_freq_factor"], adj["high_freq_factor"]
        old_len = adj["original_max_seq_len"]
        wavelen = 2 * math.pi / inv_freq
        blend = ((old_len / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    return inv_freq


def _yarn(inv_freq: torch.Tensor, n: int, base: float, adj: dict) -> torch.Tensor:
    """YaRN's frequencies (Peng et al. 2023, arXiv 2309.00071, "NTK-by-parts"): a frequency that turns more than
    `beta_fast` times over the original context keeps its value (extrapolated), one that turns fewer than
    `beta_slow` times is divided by `factor` (interpolated, as linear scaling does), and those between are blended
    along a linear ramp over the feature index. The ramp's ends are the (fractional) indices at which a frequency
    turns `beta_fast` and `beta_slow` times, rounded outwards unless `truncate` is false. (Its scale of cos and sin,
    `attention_factor`, is `build_rope_cache`'s.)"""
    original = adj["original_max_seq_len"]

    def index_turning(turns: float) -> float:  # where base^(-2i/n) * original / (2 pi) == turns
        return n * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = index_turning(adj["beta_fast"]), index_turning(adj["beta_slow"])
    if adj.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, n - 1)
    if high == low:
        high += 0.001
    ramp = ((torch.arange(n // 2, device=inv_freq.device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / adj["factor"] * ramp + inv_freq * (1 - ramp)


def build_rope_cache(length: int, config: Config, device=None, local: bool = False, long: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(config, device, local, long)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (length, rope_n_elem), the "rotate half" layout
    adj = config.rope_adjustments
    if adj and "attention_factor" in adj and not local:  # LongRoPE and YaRN scale cos and sin (so the scores) too
        return emb.cos() * adj["attention_factor"], emb.sin() * adj["attention_factor"]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_elem: int) -> torch.Tensor:
    """Rotate the first `n_elem` features of each head (all of them unless the rotary percentage is partial)."""
    if n_elem < x.size(-1):
        return torch.cat((apply_rope(x[..., :n_elem], cos, sin, n_elem), x[..., n_elem:]), dim=-1)
    half = n_elem // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
