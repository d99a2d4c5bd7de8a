"""Model configuration: one dataclass and a table of named configs.

Field names follow litgpt's so that its users feel at home. A named config is plain data; checkpoints carry their
own `model_config.yaml`, written at conversion time from the checkpoint's own Hugging Face `config.json`, so a
fine-tuned variant or an unlisted size never depends on this table.
"""

from __future__ import annotations

import difflib
import math
import sys
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_FILENAME = "model_config.yaml"
# the fields that say which model a file describes: every file `Config.to_yaml` writes has them (it writes all fields);
# a file without them (emptied, or cut short) would otherwise be read as the defaults' 4096-wide model
REQUIRED_FIELDS = ("n_layer", "n_embd", "n_head", "vocab_size", "block_size", "mlp_class_name", "norm_class_name")


def yaml_problem(e: Exception) -> str:
    """What a `yaml.YAMLError` found and where, e.g. "found unexpected end of stream at line 40, column 25"."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def read_yaml_file(path: Path | str, fix: str) -> Any:
    """The contents of the YAML file `path`; one that is not YAML (cut short, broken by hand) or not UTF-8 raises a
    `ValueError` naming it, the problem and its line, followed by `fix` (with its leading punctuation)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{str(path)!r} is not valid YAML ({yaml_problem(e)}){fix}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text{fix}") from None


def longrope_attention_factor(growth: float, original: int) -> float:
    """LongRoPE's scale of cos and sin where a checkpoint does not give it: sqrt(1 + ln(growth) / ln(original)) for a
    context grown `growth` times from `original` tokens (the LongRoPE paper's choice, which transformers and
    llama.cpp's converter take too)."""
    return 1.0 if growth <= 1.0 else math.sqrt(1 + math.log(growth) / math.log(original))


# Granite's scalings (`Config.embedding_multiplier` ...): null where a family has none
GRANITE_FIELDS = ("embedding_multiplier", "residual_multiplier", "attention_scale", "logits_scaling")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _repeat_pattern(flags: list[int], n: int) -> list[int]:
    """`flags` continued (or cut) to `n` entries by repeating its shortest period."""
    period = next(p for p in range(1, len(flags) + 1) if all(f == flags[i % p] for i, f in enumerate(flags)))
    return [flags[i % period] for i in range(n)]


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class Config:
    name: str = ""
    # {"org": ..., "name": ...}: the Hub model; with "multimodal": true, the text model of that (multimodal) model
    hf_config: dict = field(default_factory=dict)
    block_size: int = 4096
    vocab_size: int = 50254
    padding_multiple: int = 512
    padded_vocab_size: Optional[int] = None
    n_layer: int = 16
    n_head: int = 32
    head_size: Optional[int] = None
    n_embd: int = 4096
    n_query_groups: Optional[int] = None
    intermediate_size: Optional[int] = None
    # "rope" for rotary position embeddings, "learned" for GPT-2's absolute position table
    pos_embedding: Literal["rope", "learned"] = "rope"
    rotary_percentage: float = 1.0
    rope_base: float = 10000.0
    # Llama-3.1 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_seq_len"}; linear scaling (positions divided by the factor, Gemma 3): {"factor"} alone;
    # LongRoPE (Phi-3.5, Phi-4-mini): {"short_factor", "long_factor" (one per rotated pair), "original_max_seq_len",
    # "attention_factor"}; YaRN (long-context Qwen, OLMo 3): {"factor", "original_max_seq_len", "beta_fast",
    # "beta_slow", "attention_factor"} and an optional bool "truncate"; None for plain RoPE
    rope_adjustments: Optional[dict] = None
    # the blocks that rotate their queries and keys: those whose entry (one 0 or 1 per block) is 1, every block when
    # None; the others attend without position embeddings (NoPE: SmolLM3's every fourth block)
    rope_indices: Optional[list[int]] = None
    parallel_residual: bool = False
    shared_attention_norm: bool = False
    bias: bool = True  # bias of every linear layer unless overridden below
    attn_bias: Optional[bool] = None  # bias of the fused QKV projection (Qwen2: True while `bias` is False)
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    # Qwen3: a norm of the config's norm class over each query and key head (`attn.norm_q`, `attn.norm_k`, of
    # head_size weights), after the head split and before RoPE
    norm_qk: bool = False
    # "all" (OLMo 2/3): those norms span all the query heads and all the key heads together (n_head * head_size and
    # n_query_groups * head_size weights), before the head split
    norm_qk_type: Literal["head", "all"] = "head"
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    # Gemma: every RMSNorm scales by (1 + weight), its weights stored as Gemma stores them (zeros at init)
    norm_unit_offset: bool = False
    # "GemmaMLP" is the gated MLP of "LLaMAMLP" with GELU (`gelu_approximate`) in place of SiLU; "LLaMAMoE" is a
    # mixture of "LLaMAMLP" experts (below)
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE"] = "GptNeoxMLP"
    # "none" is exact GELU (Pythia), "tanh" the approximation (GPT-2's and Phi's gelu_new, Gemma's)
    gelu_approximate: Literal["none", "tanh"] = "none"
    # Gemma: token embeddings times sqrt(n_embd), that factor rounded to the activations' dtype first
    scale_embeddings: bool = False
    # Gemma 2/3: a norm of the attention's output and one of the MLP's, before each residual add
    # (`transformer.h[i].post_attention_norm`, `.post_mlp_norm`)
    post_attention_norm: bool = False
    post_mlp_norm: bool = False
    # False (OLMo 2/3): no norm before the attention and the MLP (`norm_1`, `norm_2`): the post norms alone
    pre_norms: bool = True
    # attention scores scaled by 1/sqrt(attention_scores_scalar) instead of 1/sqrt(head_size) (Gemma's
    # query_pre_attn_scalar)
    attention_scores_scalar: Optional[int] = None
    # Gemma 2: attention scores and output logits squashed as cap * tanh(x / cap)
    attention_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    # Granite (IBM): token embeddings times `embedding_multiplier`, the attention and MLP outputs times
    # `residual_multiplier` before each residual add, attention scores times `attention_scale` (instead of
    # 1/sqrt(head_size)), and output logits divided by `logits_scaling`
    embedding_multiplier: Optional[float] = None
    residual_multiplier: Optional[float] = None
    attention_scale: Optional[float] = None
    logits_scaling: Optional[float] = None
    # sliding-window attention: a token attends to itself and the sliding_window_size - 1 tokens before it, in the
    # blocks whose entry of sliding_window_indices (one 0 or 1 per block) is 1, or in every block when it is None
    sliding_window_size: Optional[int] = None
    sliding_window_indices: Optional[list[int]] = None
    # Gemma 3: the RoPE base of the sliding-window blocks (the other blocks use rope_base and rope_adjustments)
    rope_local_base_freq: Optional[float] = None
    # mixture of experts (Mixtral, Qwen3-MoE; mlp_class_name "LLaMAMoE"): the router `mlp.gate` sends each token to
    # the n_expert_per_token of the n_expert SwiGLU experts (`mlp.experts[e]`, moe_intermediate_size wide, or
    # intermediate_size when that is None) with the largest softmax probabilities, and sums their outputs weighted
    # by those probabilities, renormalised to sum to 1 unless moe_norm_topk is false; with
    # shared_expert_intermediate_size (Qwen2-MoE), every token also goes through a shared SwiGLU expert of that width
    # (`mlp.shared_expert`), its output scaled by sigmoid(`mlp.shared_expert_gate`(x)), a linear layer to one number
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: Optional[int] = None
    moe_norm_topk: bool = True
    shared_expert_intermediate_size: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.name and self.hf_config.get("name"):
            self.name = self.hf_config["name"]
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_size.")
            self.head_size = self.n_embd // self.n_head
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        else:
            # a padded size smaller than the vocabulary cuts off real tokens
            self.vocab_size = min(self.vocab_size, self.padded_vocab_size)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"n_head={self.n_head} must be a multiple of n_query_groups={self.n_query_groups}."
            )
        if self.intermediate_size is None and self.mlp_class_name == "GptNeoxMLP":
            self.intermediate_size = 4 * self.n_embd
        if self.attn_bias is None:
            self.attn_bias = self.bias
        self.rope_n_elem = int(self.rotary_percentage * self.head_size) if self.pos_embedding == "rope" else 0
        if self.rope_n_elem % 2:
            raise ValueError(
                f"Config {self.name!r}: rotary_percentage={self.rotary_percentage:g} of head_size={self.head_size} "
                f"gives {self.rope_n_elem} rotary features, but RoPE rotates pairs: choose a rotary_percentage that "
                "gives an even number."
            )
        self._check_gemma_fields()
        if self.shared_attention_norm and not self.parallel_residual:
            raise ValueError(
                f"Config {self.name!r}: shared_attention_norm=true needs parallel_residual=true (the MLP reads the "
                "attention's norm only in the parallel block)."
            )

    def _check_gemma_fields(self) -> None:
        def fail(what: str) -> None:
            raise ValueError(f"Config {self.name!r}: {what}.")

        for key, known in (("mlp_class_name", ("GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE")),
                           ("norm_class_name", ("LayerNorm", "RMSNorm"))):
            if getattr(self, key) not in known:
                fail(f"{key}={getattr(self, key)!r} is none of {', '.join(repr(k) for k in known)}")
        if self.mlp_class_name in ("LLaMAMLP", "GemmaMLP") and self.intermediate_size is None:
            fail(f"{self.mlp_class_name} needs an explicit intermediate_size")
        self._check_experts(fail)
        if self.norm_unit_offset and self.norm_class_name != "RMSNorm":
            fail("norm_unit_offset=true needs norm_class_name 'RMSNorm'")
        for key in ("attention_logit_softcapping", "final_logit_softcapping", "attention_scores_scalar",
                    "sliding_window_size", "rope_local_base_freq", *GRANITE_FIELDS):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or not value > 0):
                fail(f"{key}={value!r} must be a positive number or null")
        for key in ("attention_scores_scalar", "sliding_window_size"):
            value = getattr(self, key)
            if value is not None and value != int(value):
                fail(f"{key}={value!r} must be a whole number")
        indices = self.sliding_window_indices
        if indices is not None:
            if self.sliding_window_size is None:
                fail("sliding_window_indices is set but sliding_window_size is not; set both or neither")
            if (not isinstance(indices, list) or len(indices) != self.n_layer
                    or any(type(i) is not int or i not in (0, 1) for i in indices)):
                fail(f"sliding_window_indices must be a list of {self.n_layer} entries (one per block), each 0 or 1, "
                     f"got {indices!r}")
            if not any(indices):
                fail("sliding_window_indices has no 1, so no block has a window: set it and sliding_window_size to "
                     "null")
        rope = self.rope_indices
        if rope is not None:
            if self.pos_embedding != "rope":
                fail(f"rope_indices is set but pos_embedding is {self.pos_embedding!r}; set it to null")
            if (not isinstance(rope, list) or len(rope) != self.n_layer
                    or any(type(i) is not int or i not in (0, 1) for i in rope)):
                fail(f"rope_indices must be a list of {self.n_layer} entries (one per block), each 0 or 1, got "
                     f"{rope!r}")
        adj = self.rope_adjustments
        llama3 = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
        longrope = {"short_factor", "long_factor", "original_max_seq_len", "attention_factor"}
        yarn = {"factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor"}
        # (YaRN's optional `truncate`, a bool: false keeps the ramp's bounds unrounded, as gpt-oss has it)
        truncate = adj.get("truncate", False) if isinstance(adj, dict) else False
        keys = set(adj) - {"truncate"} if isinstance(adj, dict) and set(adj) - {"truncate"} == yarn else (
            set(adj) if isinstance(adj, dict) else None)
        known = keys in ({"factor"}, llama3, longrope, yarn) and isinstance(truncate, bool)
        values = [adj[k] for k in keys] if known else []
        if known and keys == longrope:
            lists = [adj[k] if isinstance(adj[k], list) else [None] for k in ("short_factor", "long_factor")]
            values = [adj["original_max_seq_len"], adj["attention_factor"], *lists[0], *lists[1]]
        if adj is not None and (not known or not all(_is_number(v) and v > 0 for v in values)):
            fail(f"rope_adjustments={adj!r} must be null, {{factor}} (linear scaling), "
                 f"{{{', '.join(sorted(llama3))}}} (Llama 3.1's), {{{', '.join(sorted(longrope))}}} (LongRoPE's, "
                 f"with lists of factors) or {{{', '.join(sorted(yarn))}}} (YaRN's, and a bool truncate), with "
                 "positive numbers")
        if isinstance(adj, dict) and set(adj) == longrope:
            half = self.rope_n_elem // 2
            if any(len(adj[k]) != half for k in ("short_factor", "long_factor")):
                fail(f"rope_adjustments' short_factor and long_factor need one factor per rotated pair of features, "
                     f"{half}, got {len(adj['short_factor'])} and {len(adj['long_factor'])}")
        if self.rope_local_base_freq is not None and self.sliding_window_size is None:
            fail("rope_local_base_freq is the RoPE base of the sliding-window blocks, but sliding_window_size is "
                 "not set")
        if self.parallel_residual and (self.post_attention_norm or self.post_mlp_norm):
            fail("post_attention_norm and post_mlp_norm need parallel_residual=false")
        if self.parallel_residual and self.residual_multiplier is not None:
            fail("residual_multiplier needs parallel_residual=false")
        if self.attention_scale is not None and self.attention_scores_scalar is not None:
            fail("attention_scale and attention_scores_scalar both set the attention's scale; set one")
        if not self.pre_norms and not (self.post_attention_norm and self.post_mlp_norm):
            fail("pre_norms=false (no norm before the attention and the MLP) needs post_attention_norm and "
                 "post_mlp_norm")
        if self.norm_qk_type not in ("head", "all"):
            fail(f"norm_qk_type={self.norm_qk_type!r} is none of 'head', 'all'")
        if self.norm_qk_type == "all" and not self.norm_qk:
            fail("norm_qk_type='all' is the width of the query/key norms, but norm_qk is false")

    def _check_experts(self, fail) -> None:
        moe = self.mlp_class_name == "LLaMAMoE"
        for key in ("n_expert", "n_expert_per_token"):
            value = getattr(self, key)
            if type(value) is not int or value < 0:
                fail(f"{key}={value!r} must be a whole number, 0 or more")
        if not moe:
            if (self.n_expert or self.n_expert_per_token or self.moe_intermediate_size is not None
                    or self.shared_expert_intermediate_size is not None):
                fail(f"n_expert, n_expert_per_token, moe_intermediate_size and shared_expert_intermediate_size "
                     f"describe the experts of mlp_class_name 'LLaMAMoE', not of {self.mlp_class_name!r}: set them "
                     "to 0, 0, null and null, or mlp_class_name to 'LLaMAMoE'")
            return
        if self.n_expert < 1 or not 1 <= self.n_expert_per_token <= self.n_expert:
            fail(f"mlp_class_name 'LLaMAMoE' needs n_expert of 1 or more and n_expert_per_token from 1 to n_expert, "
                 f"got n_expert={self.n_expert} and n_expert_per_token={self.n_expert_per_token}")
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            width = getattr(self, key)
            if width is not None and (type(width) is not int or width < 1):
                fail(f"{key}={width!r} must be a positive whole number or null")
        width = self.moe_intermediate_size
        if width is None and self.intermediate_size is None:
            fail("mlp_class_name 'LLaMAMoE' needs moe_intermediate_size or intermediate_size (the experts' width)")

    @property
    def expert_intermediate_size(self) -> int:
        """The hidden width of each expert of a "LLaMAMoE" MLP."""
        return self.moe_intermediate_size if self.moe_intermediate_size is not None else self.intermediate_size

    def rope_in_block(self, block_idx: int) -> bool:
        """Whether block `block_idx` rotates its queries and keys (RoPE), or attends without positions (NoPE)."""
        return self.rope_n_elem > 0 and (self.rope_indices is None or bool(self.rope_indices[block_idx]))

    def sliding_window(self, block_idx: int) -> Optional[int]:
        """The window of block `block_idx`'s attention, or None for full causal attention."""
        if self.sliding_window_size is None:
            return None
        if self.sliding_window_indices is not None and not self.sliding_window_indices[block_idx]:
            return None
        return int(self.sliding_window_size)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """A named config (see `name_to_config`), with any field overridden, e.g. `n_layer=2` for a test model."""
        conf = name_to_config.get(name)
        if conf is None:
            conf = hf_name_to_config.get(name)
        if conf is None:
            close = difflib.get_close_matches(name, list(name_to_config), n=4, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown model name {name!r}.{hint} Run `python scripts/download.py` to list the known names."
            )
        conf = deepcopy(conf)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown Config field(s) {sorted(unknown)} for model {name!r}.")
        if "vocab_size" in overrides and "padded_vocab_size" not in overrides:
            # the padded size is derived from the vocabulary; recompute it for the overridden one
            conf.pop("padded_vocab_size", None)
        if "n_layer" in overrides and "sliding_window_indices" not in overrides and conf.get("sliding_window_indices"):
            # a smaller (or larger) model of the same family: the named config's pattern of windowed blocks goes on
            conf["sliding_window_indices"] = _repeat_pattern(conf["sliding_window_indices"], overrides["n_layer"])
        conf.update(overrides)
        return cls(**conf)

    @classmethod
    def from_file(cls, path: Path | str, **overrides: Any) -> "Config":
        """The config a `model_config.yaml` holds; a file that is not a mapping of known fields fails in one
        sentence naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Model config {str(path)!r} does not exist.")
        redo = ("fix it, or write it again by converting the checkpoint (scripts/convert_hf_checkpoint.py or "
                "convert_gguf_checkpoint.py)")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"Model config {str(path)!r} is not valid YAML ({yaml_problem(e)}); {redo}.") from None
        except UnicodeDecodeError:
            raise ValueError(f"Model config {str(path)!r} is not UTF-8 text; {redo}.") from None
        if data is None:  # an emptied file: not "all defaults"
            raise ValueError(f"Model config {str(path)!r} is empty; {redo}.")
        if not isinstance(data, dict):
            raise ValueError(
                f"Model config {str(path)!r} must hold a mapping of Config fields (`n_layer: 30`, ...), not a "
                f"{type(data).__name__}; {redo}."
            )
        data.update(overrides)
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:  # cut short (every written file has them all), read as the defaults' model otherwise
            raise ValueError(f"Model config {str(path)!r} lacks {', '.join(missing)} (the file is cut short or was "
                             f"not written by lit_gpt); {redo}.")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            close = [m for k in unknown for m in difflib.get_close_matches(str(k), known, n=1, cutoff=0.7)]
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            # ignored, as files of other lit tools carry fields this model does not use; a typo shows here
            from lit_gpt.utils import print_once  # every process of a run reads the config; one says so

            print_once(f"warning: model config {str(path)!r} has field(s) this model does not use, ignored: "
                  f"{', '.join(repr(k) for k in unknown)}{hint}.", file=sys.stderr)
            data = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**data)
        except (TypeError, ZeroDivisionError) as e:  # a value of the wrong type or zero, e.g. `n_head: "nine"`
            raise ValueError(f"Model config {str(path)!r} has an invalid value ({e}); {redo}.") from None
        except ValueError as e:  # __post_init__'s own checks, e.g. n_head not a multiple of n_query_groups
            raise ValueError(f"Model config {str(path)!r}: {str(e).rstrip('.')}; {redo}.") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | str, **overrides: Any) -> "Config":
        """The config in `checkpoint_dir/model_config.yaml`, with `overrides` (field=value) applied."""
        checkpoint_dir = Path(checkpoint_dir)
        path = checkpoint_dir / CONFIG_FILENAME
        if path.is_file():
            return cls.from_file(path, **overrides)
        if checkpoint_dir.is_file():
            from lit_gpt.utils import not_a_directory_error

            raise not_a_directory_error(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            from lit_gpt.utils import missing_checkpoint_dir_error

            raise missing_checkpoint_dir_error(checkpoint_dir)
        from lit_gpt.utils import finetuning_run_hint

        run = finetuning_run_hint(checkpoint_dir)
        if run is not None:
            raise ValueError(f"{run}.")
        raise FileNotFoundError(
            f"{str(path)!r} is missing: convert the checkpoint first with "
            f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`."
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, checkpoint_dir: Path | str) -> Path:
        """Write `checkpoint_dir/model_config.yaml` (atomically) and return its path."""
        from lit_gpt.utils import atomic_write_text

        path = Path(checkpoint_dir) / CONFIG_FILENAME
        atomic_write_text(path, self.to_yaml())
        return path

    def to_yaml(self) -> str:
        """The text of `model_config.yaml`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


###################################################################################################
# Named configs. Sizes are those of each model's Hugging Face `config.json`.
###################################################################################################
configs: list[dict] = []


def _llama(org: str, name: str, **kw: Any) -> dict:
    base = dict(
        hf_config=dict(org=org, name=name),
        padding_multiple=64,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        parallel_residual=False,
    )
    base.update(kw)
    return base


# Llama 2
for size, layers, embd, heads, groups, inter in (
    ("7b", 32, 4096, 32, 32, 11008),
    ("13b", 40, 5120, 40, 40, 13824),
    ("70b", 80, 8192, 64, 8, 28672),
):
    for suffix in ("-hf", "-chat-hf"):
        configs.append(
            _llama(
                "meta-llama", f"Llama-2-{size}{suffix}", block_size=4096, vocab_size=32000, padding_multiple=64,
                n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=groups, intermediate_size=inter,
                norm_eps=1e-5,
            )
        )

# Llama 3 / 3.1 / 3.2
_llama31_rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_llama32_rope = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
for size, layers, embd, heads, inter in (("8B", 32, 4096, 32, 14336), ("70B", 80, 8192, 64, 28672)):
    for instruct in ("", "-Instruct"):
        configs.append(
            _llama(
                "meta-llama", f"Meta-Llama-3-{size}{instruct}", block_size=8192, vocab_size=128000,
                padded_vocab_size=128256, n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=8,
                intermediate_size=inter, norm_eps=1e-5, rope_base=500000,
            )
        )
        configs.append(
            _llama(
                "meta-llama", f"Llama-3.1-{size}{instruct}", block_size=131072, vocab_size=128000,
                padded_vocab_size=128256, n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=8,
                intermediate_size=inter, norm_eps=1e-5, rope_base=500000, rope_adjustments=dict(_llama31_rope),
            )
        )
for size, layers, embd, heads, groups, inter in (("1B", 16, 2048, 32, 8, 8192), ("3B", 28, 3072, 24, 8, 8192)):
    for instruct in ("", "-Instruct"):
        configs.append(
            _llama(
                "meta-llama", f"Llama-3.2-{size}{instruct}", block_size=131072, vocab_size=128000,
                padded_vocab_size=128256, n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=groups,
                intermediate_size=inter, norm_eps=1e-5, rope_base=500000, rope_adjustments=dict(_llama32_rope),
                tie_embeddings=True,
            )
        )

# Mistral (v0.1: a 4096-token sliding window in every block of its 32K context)
for version, vocab, extra in (("v0.1", 32000, dict(sliding_window_size=4096)), ("v0.3", 32768, dict(rope_base=1e6))):
    for instruct in ("", "-Instruct"):
        configs.append(
            _llama(
                "mistralai", f"Mistral-7B{instruct}-{version}", block_size=32768, vocab_size=vocab,
                padded_vocab_size=vocab, n_layer=32, n_embd=4096, n_head=32, n_query_groups=8,
                intermediate_size=14336, norm_eps=1e-5, **extra,
            )
        )

# Mixtral (Jiang et al. 2024, "Mixtral of Experts"): Mistral's attention without a window, eight experts, two per
# token; 46,702,792,704 parameters, as its Hub config.json gives
for instruct in ("", "-Instruct"):
    configs.append(
        _llama(
            "mistralai", f"Mixtral-8x7B{instruct}-v0.1", block_size=32768, vocab_size=32000, padded_vocab_size=32000,
            n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336, norm_eps=1e-5,
            rope_base=1e6, mlp_class_name="LLaMAMoE", n_expert=8, n_expert_per_token=2,
        )
    )

# Mixtral-8x22B (Mistral AI's announcement, April 2024: 141B parameters, 39B active per token, a 64K context): the
# base model has Mixtral-8x7B's 32000-token vocabulary, the Instruct one the 32768 tokens of Mistral's v3 tokenizer
for instruct, vocab in (("", 32000), ("-Instruct", 32768)):
    configs.append(
        _llama(
            "mistralai", f"Mixtral-8x22B{instruct}-v0.1", block_size=65536, vocab_size=vocab, padded_vocab_size=vocab,
            n_layer=56, n_embd=6144, n_head=48, n_query_groups=8, intermediate_size=16384, norm_eps=1e-5,
            rope_base=1e6, mlp_class_name="LLaMAMoE", n_expert=8, n_expert_per_token=2,
        )
    )

# TinyLlama
configs.append(
    _llama(
        "TinyLlama", "TinyLlama-1.1B-Chat-v1.0", block_size=2048, vocab_size=32000, padded_vocab_size=32000,
        n_layer=22, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632, norm_eps=1e-5,
    )
)
configs.append(
    _llama(
        "TinyLlama", "TinyLlama-1.1B-intermediate-step-1431k-3T", block_size=2048, vocab_size=32000,
        padded_vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632,
        norm_eps=1e-5,
    )
)

# SmolLM2
for size, layers, embd, heads, groups, inter, base, block in (
    ("135M", 30, 576, 9, 3, 1536, 100000, 8192),
    ("360M", 32, 960, 15, 5, 2560, 100000, 8192),
    ("1.7B", 24, 2048, 32, 32, 8192, 130000, 8192),
):
    for instruct in ("", "-Instruct"):
        configs.append(
            _llama(
                "HuggingFaceTB", f"SmolLM2-{size}{instruct}", block_size=block, vocab_size=49152,
                padded_vocab_size=49152, n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=groups,
                intermediate_size=inter, norm_eps=1e-5, rope_base=base, tie_embeddings=True,
            )
        )

# Qwen2.5
for size, layers, embd, heads, groups, inter, tied in (
    ("0.5B", 24, 896, 14, 2, 4864, True),
    ("1.5B", 28, 1536, 12, 2, 8960, True),
    ("3B", 36, 2048, 16, 2, 11008, True),
    ("7B", 28, 3584, 28, 4, 18944, False),
):
    for instruct in ("", "-Instruct"):
        configs.append(
            _llama(
                # Qwen2.5-7B's base config.json has max_position_embeddings 131072, every other one here 32768
                "Qwen", f"Qwen2.5-{size}{instruct}", block_size=131072 if (size, instruct) == ("7B", "") else 32768,
                vocab_size=151643,
                padded_vocab_size=151936 if size in ("0.5B", "1.5B", "3B") else 152064, n_layer=layers,
                n_embd=embd, n_head=heads, n_query_groups=groups, intermediate_size=inter, norm_eps=1e-6,
                rope_base=1000000, attn_bias=True, tie_embeddings=tied,
            )
        )

# Qwen3 (dense): Qwen2 without the QKV bias, with a head_dim of 128 at every size (so not always n_embd / n_head) and
# RMSNorm on each query and key head (norm_qk). The plain repo names are the hybrid thinking/chat models, "-Base" the
# pretrained ones (32B has none), "-2507" the 4B updates with a 256K context
for size, layers, embd, heads, inter, tied in (
    ("0.6B", 28, 1024, 16, 3072, True),
    ("1.7B", 28, 2048, 16, 6144, True),
    ("4B", 36, 2560, 32, 9728, True),
    ("8B", 36, 4096, 32, 12288, False),
    ("14B", 40, 5120, 40, 17408, False),
    ("32B", 64, 5120, 64, 25600, False),
):
    variants = [("", 40960, 1000000)] + ([("-Base", 32768, 1000000)] if size != "32B" else [])
    if size == "4B":
        variants += [("-Instruct-2507", 262144, 5000000), ("-Thinking-2507", 262144, 5000000)]
    for suffix, block, base in variants:
        configs.append(
            _llama(
                "Qwen", f"Qwen3-{size}{suffix}", block_size=block, vocab_size=151643, padded_vocab_size=151936,
                n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=8, head_size=128, intermediate_size=inter,
                norm_eps=1e-6, rope_base=base, norm_qk=True, tie_embeddings=tied,
            )
        )

# Qwen3-MoE: Qwen3's attention (4 key/value heads) and 128 experts in every block, 8 per token, their weights
# renormalised (norm_topk_prob); 30.5B and 235B parameters in all, 3.3B and 22B active per token (Qwen3 technical
# report, Yang et al. 2025)
for size, layers, embd, heads, expert_width, inter, variants in (
    ("30B-A3B", 48, 2048, 32, 768, 6144, (("", 40960), ("-Base", 32768))),
    ("235B-A22B", 94, 4096, 64, 1536, 12288, (("", 40960),)),
):
    for suffix, block in variants:
        configs.append(
            _llama(
                "Qwen", f"Qwen3-{size}{suffix}", block_size=block, vocab_size=151643, padded_vocab_size=151936,
                n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=4, head_size=128, intermediate_size=inter,
                norm_eps=1e-6, rope_base=1000000, norm_qk=True, mlp_class_name="LLaMAMoE", n_expert=128,
                n_expert_per_token=8, moe_intermediate_size=expert_width,
            )
        )

# OLMo 2 (AI2, arXiv 2501.00656): norms after the attention and the MLP only, RMSNorm over all the query heads and
# all the key heads, a 4096-token context; 1.5B, 7.3B, 13.7B and 32.2B parameters, -SFT, -DPO and -Instruct the
# post-trained ones
for name, layers, embd, heads, groups, inter in (
    ("OLMo-2-0425-1B", 16, 2048, 16, 16, 8192),
    ("OLMo-2-1124-7B", 32, 4096, 32, 32, 11008),
    ("OLMo-2-1124-13B", 40, 5120, 40, 40, 13824),
    ("OLMo-2-0325-32B", 64, 5120, 40, 8, 27648),
):
    for suffix in ("", "-SFT", "-DPO", "-Instruct"):
        configs.append(
            _llama(
                "allenai", f"{name}{suffix}", block_size=4096, vocab_size=100278, padded_vocab_size=100352,
                n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=groups, intermediate_size=inter,
                norm_eps=1e-6, rope_base=500000, norm_qk=True, norm_qk_type="all", pre_norms=False,
                post_attention_norm=True, post_mlp_norm=True,
            )
        )

# Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (QKV bias), routed experts whose weights are not
# renormalised, and a shared expert scaled by a sigmoid gate in every block; 14.3B parameters in all, 2.7B active per
# token (Qwen's Qwen1.5-MoE announcement, 2024), and 57B, 14B active (Qwen2 technical report, Yang et al. 2024)
for name, chat, block, layers, embd, heads, groups, expert_width, shared, experts, per_token in (
    ("Qwen1.5-MoE-A2.7B", "-Chat", 8192, 24, 2048, 16, 16, 1408, 5632, 60, 4),
    ("Qwen2-57B-A14B", "-Instruct", 32768, 28, 3584, 28, 4, 2560, 20480, 64, 8),
):
    for suffix in ("", chat):
        configs.append(
            _llama(
                "Qwen", f"{name}{suffix}", block_size=block, vocab_size=151643, padded_vocab_size=151936,
                n_layer=layers, n_embd=embd, n_head=heads, n_query_groups=groups, intermediate_size=shared,
                norm_eps=1e-6, rope_base=1000000, attn_bias=True, mlp_class_name="LLaMAMoE", n_expert=experts,
                n_expert_per_token=per_token, moe_intermediate_size=expert_width, moe_norm_topk=False,
                shared_expert_intermediate_size=shared,
            )
        )

# Gemma: GeGLU MLP (tanh GELU), RMSNorm scaling by 1 + weight, embeddings scaled by sqrt(n_embd), tied head, heads of
# 256 (so not n_embd / n_head). Gemma 2 adds norms after the attention and the MLP, soft-capped attention scores and
# logits, and a 4096-token sliding window in every other block (the first, third, ...); Gemma 3 drops the soft caps,
# adds per-head query/key norms, and gives its sliding-window blocks (five in six) a RoPE base of their own
_gemma = dict(
    padded_vocab_size=256000, vocab_size=256000, block_size=8192, bias=False, norm_class_name="RMSNorm",
    norm_unit_offset=True, norm_eps=1e-6, mlp_class_name="GemmaMLP", gelu_approximate="tanh", scale_embeddings=True,
    parallel_residual=False, tie_embeddings=True, head_size=256,
)
for name, layers, embd, heads, groups, inter in (
    ("gemma-2b", 18, 2048, 8, 1, 16384),
    ("gemma-7b", 28, 3072, 16, 16, 24576),
):
    for suffix in ("", "-it"):
        configs.append(dict(_gemma, hf_config=dict(org="google", name=name + suffix), n_layer=layers, n_embd=embd,
                            n_head=heads, n_query_groups=groups, intermediate_size=inter))
for name, layers, embd, heads, groups, inter, head_size, scalar in (
    ("gemma-2-2b", 26, 2304, 8, 4, 9216, 256, 256),
    ("gemma-2-9b", 42, 3584, 16, 8, 14336, 256, 256),
    ("gemma-2-27b", 46, 4608, 32, 16, 36864, 128, 144),
):
    for suffix in ("", "-it"):
        configs.append(dict(
            _gemma, hf_config=dict(org="google", name=name + suffix), n_layer=layers, n_embd=embd, n_head=heads,
            n_query_groups=groups, intermediate_size=inter, head_size=head_size, post_attention_norm=True,
            post_mlp_norm=True, attention_scores_scalar=scalar, attention_logit_softcapping=50.0,
            final_logit_softcapping=30.0, sliding_window_size=4096,
            sliding_window_indices=[1 - i % 2 for i in range(layers)],
        ))
# Gemma 3: 1B is a text model; 4B, 12B and 27B are multimodal, and these are their text models (what
# convert_hf_checkpoint.py imports of them), with linear RoPE scaling in their global blocks
for size, vocab, block, layers, embd, heads, groups, inter, head_size, scalar, window, rope in (
    ("1b", 262144, 32768, 26, 1152, 4, 1, 6912, 256, 256, 512, None),
    ("4b", 262208, 131072, 34, 2560, 8, 4, 10240, 256, 256, 1024, dict(factor=8.0)),
    ("12b", 262208, 131072, 48, 3840, 16, 8, 15360, 256, 256, 1024, dict(factor=8.0)),
    ("27b", 262208, 131072, 62, 5376, 32, 16, 21504, 128, 168, 1024, dict(factor=8.0)),
):
    for suffix in ("-pt", "-it"):
        # (`multimodal`: the Hub model holds more than this text model, so it is not the base transformers loads)
        hub = dict(org="google", name=f"gemma-3-{size}{suffix}", **({"multimodal": True} if size != "1b" else {}))
        configs.append(dict(
            _gemma, hf_config=hub, vocab_size=vocab,
            padded_vocab_size=vocab, block_size=block, n_layer=layers, n_embd=embd, n_head=heads,
            n_query_groups=groups, intermediate_size=inter, head_size=head_size, post_attention_norm=True,
            post_mlp_norm=True, norm_qk=True, attention_scores_scalar=scalar, rope_base=1000000,
            rope_adjustments=rope, rope_local_base_freq=10000, sliding_window_size=window,
            sliding_window_indices=[int((i + 1) % 6 != 0) for i in range(layers)],
        ))

# Phi
configs.append(
    dict(
        hf_config=dict(org="microsoft", name="phi-1_5"), block_size=2048, vocab_size=50257, padded_vocab_size=51200,
        n_layer=24, n_embd=2048, n_head=32, rotary_percentage=0.5, parallel_residual=True,
        shared_attention_norm=True, bias=True, lm_head_bias=True, norm_class_name="LayerNorm", norm_eps=1e-5,
        mlp_class_name="GptNeoxMLP", gelu_approximate="tanh", intermediate_size=8192,
    )
)
configs.append(
    dict(
        hf_config=dict(org="microsoft", name="phi-2"), block_size=2048, vocab_size=50257, padded_vocab_size=51200,
        n_layer=32, n_embd=2560, n_head=32, rotary_percentage=0.4, parallel_residual=True,
        shared_attention_norm=True, bias=True, lm_head_bias=True, norm_class_name="LayerNorm", norm_eps=1e-5,
        mlp_class_name="GptNeoxMLP", gelu_approximate="tanh", intermediate_size=10240,
    )
)

# Phi-3 (llama-shaped; its fused qkv_proj and gate_up_proj are split on import), with a 2047-token sliding window in
# every block of its 4096-token context
configs.append(
    _llama(
        "microsoft", "Phi-3-mini-4k-instruct", block_size=4096, vocab_size=32064, padded_vocab_size=32064, n_layer=32,
        n_embd=3072, n_head=32, n_query_groups=32, intermediate_size=8192, norm_eps=1e-5, sliding_window_size=2047,
    )
)

# GPT-2
for hf_name, layers, embd, heads in (
    ("gpt2", 12, 768, 12),
    ("gpt2-medium", 24, 1024, 16),
    ("gpt2-large", 36, 1280, 20),
    ("gpt2-xl", 48, 1600, 25),
):
    configs.append(
        dict(
            hf_config=dict(org="openai-community", name=hf_name), block_size=1024, vocab_size=50257,
            padded_vocab_size=50257, n_layer=layers, n_embd=embd, n_head=heads, pos_embedding="learned",
            bias=True, tie_embeddings=True, norm_class_name="LayerNorm", norm_eps=1e-5,
            mlp_class_name="GptNeoxMLP", gelu_approximate="tanh",
        )
    )

# Pythia
for size, layers, embd, heads, padded in (
    ("14m", 6, 128, 4, 50304),
    ("31m", 6, 256, 8, 50304),
    ("70m", 6, 512, 8, 50304),
    ("160m", 12, 768, 12, 50304),
    ("410m", 24, 1024, 16, 50304),
    ("1b", 16, 2048, 8, 50304),
    ("1.4b", 24, 2048, 16, 50304),
    ("2.8b", 32, 2560, 32, 50304),
    ("6.9b", 32, 4096, 32, 50432),
    ("12b", 36, 5120, 40, 50688),
):
    configs.append(
        dict(
            hf_config=dict(org="EleutherAI", name=f"pythia-{size}"), block_size=2048, vocab_size=50254,
            padded_vocab_size=padded, n_layer=layers, n_embd=embd, n_head=heads, rotary_percentage=0.25,
            parallel_residual=True, shared_attention_norm=False, bias=True, norm_class_name="LayerNorm",
            norm_eps=1e-5, mlp_class_name="GptNeoxMLP", gelu_approximate="none",
        )
    )

for c in configs:
    c.setdefault("name", c["hf_config"]["name"])

name_to_config: dict[str, dict] = {c["name"]: c for c in configs}
hf_name_to_config: dict[str, dict] = {f"{c['hf_config']['org']}/{c['hf_config']['name']}": c for c in configs}
