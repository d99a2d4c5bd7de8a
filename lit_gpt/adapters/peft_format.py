"""Adapters in Hugging Face PEFT's format for a `lit_gpt.GPT` and its transformers export: LoRA and OFT both ways,
ETHER as PEFT's HRA (and back where the HRA is in ETHER's block form).

A PEFT LoRA folder (what `PeftModel.save_pretrained` writes) holds `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors`, whose tensors are named after the transformers modules they adapt:
`base_model.model.<module>.lora_A.weight` `(r, in)` and `...lora_B.weight` `(out, r)`, the update being
`scaling * B A x` with `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and
`alpha_pattern` override `r` and `lora_alpha` per module). The rows of `B` are the module's output rows, laid out as
the rows of its bias, so `lit_gpt.convert_hf.iter_lit_to_hf` (applied to row numbers, as if they were a bias) says
which lit rows each transformers module's rows are: one name table for weights and adapters.

Our LoRA on the fused QKV projection has one `A`/`B` per slice (query, key, value). Where transformers splits the
projection (llama, mistral, qwen2, qwen3, phi: q_proj/k_proj/v_proj) each slice is one PEFT module. Where it keeps
it fused (GPT-2's `c_attn`, GPT-NeoX's interleaved `query_key_value`) PEFT has one `A` for the whole layer; both
directions are exact:

* export: slices with one shared `A` (an import of a PEFT adapter) give that `A` and the slices' `B` rows; slices
  with their own `A` give the block form, rank `k r` for `k` adapted slices: `A = [A_q; A_v]`, `B` block-diagonal,
  `lora_alpha = k alpha` (same scaling), written as that module's `rank_pattern`/`alpha_pattern` entry;
* import: the block form (every column of `B` non-zero in one slice only, as many columns per slice) comes back as
  per-slice adapters of rank `r`, anything else as every slice with the whole `A` and its rows of `B`.

DoRA (`use_dora`) adds `...lora_magnitude_vector` `(out,)` per module, its rows laid out as `B`'s; it becomes the
`magnitude` of the lit slices those rows are (a fused module's slices all keep their adapter, never the block
form: DoRA rescales every row). An export gives the rows of a fused module without an adapter their base norm, so
PEFT leaves them as they are.

OFT and HRA (`_oft_export`, `_hra_export`, `_oft_slices`, `_hra_slices`) transform a whole `torch.nn.Linear`'s
input, as our input-side transforms do: `oft_R.weight` `(r, k(k-1)/2)` holds each block's strict upper triangle of
PEFT's skew `Q` (`S = Q` for exact Cayley, `S = -Q` for its Cayley-Neumann series), `hra_u` `(in, r)` the raw
reflection vectors (ETHER's blocks' vectors, zero outside their block). Output-side transforms (`flip_side`),
ETHER+ and GPT-2's `Conv1D` layers have no PEFT form; a fused QKV layer takes one transform for all its slices.

Modules trained in full beside the adapter (`AdapterConfig.train_modules`: head, embeddings, norms) are PEFT's
`modules_to_save`, both ways (`_train_modules_export`, `_train_modules_import`): PEFT saves each such module whole,
as `base_model.model.<module>.<param>` (the transformers names `lit_gpt.convert_hf` converts), and selects it by the
end of its name as a plain string (`norm` selects `input_layernorm` too), so an export writes the shortest names
that select exactly the trained modules (`layers.0.input_layernorm` where `input_layernorm` would select more). A
head tied to the token embeddings is one tensor here and two modules in transformers: an export saves both, with
the same values (LoRA: `ensure_weight_tying`, so PEFT trains them as one); an import takes them only where PEFT
computes with equal ones. lit_gpt's fused q/k/v is one tensor: an import needs q_proj, k_proj and v_proj saved alike.

An import (`peft_adapter_payload`) gives the lit adapter dict in memory, which `lit_gpt.merge` uses for a PEFT
folder given as `--adapter_path` (chat, generate, eval, merge); `import_peft_adapter` writes the same dict as a lit
adapter file. An export names the base model in `adapter_config.json` (`base_model_name_or_path`: a Hub id, or the
folder of the base's transformers export, `base_export_dir`) so that `AutoPeftModelForCausalLM` can load it.

Reading never runs pickled code: `adapter_model.safetensors` only (an `adapter_model.bin` is refused).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch

from lit_gpt.adapters.base import (
    _slice_layout,
    adapted_layers,
    adapter_config_of,
    apply_adapters,
    block_index,
    compute_dtype,
    is_adaptable,
    mlp_target_layers,
    train_module_names,
    trained_module_state_dict,
)
from lit_gpt.adapters.config import GPT_TRAIN_MODULES, AdapterConfig
from lit_gpt.adapters.ether import NORM_EPS
from lit_gpt.adapters.state import (
    PEFT_CONFIG_FILENAME,
    PEFT_PREFIX,  # `PeftModel.save_pretrained` names every tensor after the wrapped model's module, under it
    PEFT_WEIGHTS_FILENAME,
    SAFETENSORS_SUFFIX,
    adapter_payload,
    load_adapters,
    write_adapter_file,
)
from lit_gpt.config import Config
from lit_gpt.convert_hf import (
    MULTIMODAL_OTHER, ConversionError, config_to_hf, iter_hf_to_lit, iter_lit_to_hf)
from lit_gpt.model import GPT
from lit_gpt.utils import (
    WEIGHTS_FILENAME,
    atomic_paths,
    check_checkpoint_dir,
    check_output_dir,
    load_file,
    load_model_weights,
    read_json_object,
)

PEFT_PICKLE_FILENAME = "adapter_model.bin"
# what `base_export_dir` appends to an export's folder name
BASE_EXPORT_SUFFIX = "-base-hf"
ADAPTER_SUFFIXES = (".pth", SAFETENSORS_SUFFIX)
# the PEFT method each lit method exports as (ETHER+ has none: its blocks are not products of reflections)
PEFT_TYPE_OF = {"lora": "LORA", "oft": "OFT", "ether": "HRA"}
# the `peft_version` an OFT export records: PEFT warns about Cayley-Neumann adapters saved before 0.18, whose series
# was another one
PEFT_OFT_VERSION = "0.18.0"
# LoraConfig settings (set: truthy) that make the adapter compute something else than `W x + scaling B A x` on the
# plain base weights, or that train other tensors as well: an import refuses them, saying what they are
UNSUPPORTED_SETTINGS = {
    "lora_bias": "a bias on lora_B",
    "trainable_token_indices": "trained rows of the embedding",
    "layer_replication": "duplicated layers",
    "target_parameters": "LoRA on parameters instead of linear modules (other than a mixture's fused experts)",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which is active only after its invocation tokens",
    "use_qalora": "QALoRA (a pooled input to lora_A)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa_config": "KaSA (a learned diagonal of singular values)",
    "monteclora_config": "MonteCLoRA (sampled LoRA weights)",
    "arrow_config": "Arrow routing between several LoRAs",
}
# the lit method each importable PEFT method becomes
LIT_METHOD_OF = {"LORA": "lora", "OFT": "oft", "HRA": "ether"}
# init_lora_weights values that rewrite the base weights (W - B0 A0): the adapter alone fits only that changed base
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# how the GPT's named targets (`AdapterConfig.targets`) cover its layers
_ATTN, _PROJ, _HEAD = "attn.qkv", "attn.proj", "lm_head"


class HFModule(NamedTuple):
    """A linear module of the transformers export of a `lit_gpt.GPT`: the lit layer it is, which of that layer's
    output rows its rows are (in the transformers order) and its input width."""

    lit: str
    rows: torch.Tensor
    in_features: int


class _Factors(NamedTuple):
    """One lit slice's LoRA: `A` `(rank, in)`, `B` `(rows, rank)` and the update's scale."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    alpha: float


def hf_linear_modules(config: Config) -> dict[str, HFModule]:
    """Every linear layer of the transformers model `scripts/convert_lit_checkpoint.py` exports for `config`, by
    its module name there (as PEFT names it), with the lit layer and rows it computes."""
    model_type = config_to_hf(config)["model_type"]  # refuses, naming the field, what transformers cannot load
    with torch.device("meta"):
        model = GPT(config)
    modules: dict[str, HFModule] = {}
    for name, module in model.named_modules():
        if not is_adaptable(module):
            continue
        out_features, in_features = module.weight.shape
        # B's rows are laid out as a bias's: the conversion moves row numbers as it moves a bias. (Phi-3's export
        # has the gate and up projections in one gate_up_proj, two lit layers: they are named as apart here, as
        # the import splits an adapter on gate_up_proj, `_split_phi3_fused`, and the export refuses them.)
        as_type = "llama" if model_type == "phi3" and name.endswith((".mlp.fc_1", ".mlp.fc_2")) else model_type
        for key, rows in iter_lit_to_hf([(f"{name}.bias", torch.arange(out_features))], config, as_type):
            hf_module = key.rpartition(".")[0]
            if name != _HEAD and hf_module in ("lm_head", "embed_out"):
                continue  # the zero output bias a Phi export adds, not this layer's
            modules[hf_module] = HFModule(name, rows, in_features)
    return modules


def _base_model_name(config: Config) -> Optional[str]:
    """The Hub name of the model `config` was converted from (`org/name`), None where it is not known or names a
    multimodal model whose text model `config` is (transformers loads that Hub id with other module names)."""
    org, name = config.hf_config.get("org"), config.hf_config.get("name")
    return f"{org}/{name}" if org and name and not config.hf_config.get("multimodal") else None


# a multimodal Gemma 3's text model in its PEFT adapters (transformers >= 4.52, and 4.50/4.51)
_PEFT_TEXT_PREFIXES = ((f"{PEFT_PREFIX}model.language_model.", f"{PEFT_PREFIX}model."),
                       (f"{PEFT_PREFIX}language_model.model.", f"{PEFT_PREFIX}model."),
                       (f"{PEFT_PREFIX}language_model.lm_head.", f"{PEFT_PREFIX}lm_head."))


def _text_model_tensors(tensors: dict[str, torch.Tensor], weights: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter trained on a multimodal Gemma 3, named as on its text model; the vision tower's
    dropped with a note (images are not supported)."""
    out, vision = {}, 0
    for key, t in tensors.items():
        if key.startswith(PEFT_PREFIX) and MULTIMODAL_OTHER.match(key[len(PEFT_PREFIX):]):
            vision += 1
            continue
        for old, new in _PEFT_TEXT_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = t
    if vision:
        print(f"Note: {weights!r} also adapts the vision tower ({vision} tensors); lit_gpt imports the text model's "
              "adapter only (it does not read images).", file=sys.stderr)
    return out


def _multimodal_name(module: str) -> str:
    """A text model's module as a multimodal Gemma 3 (transformers >= 4.52) names it."""
    return f"model.language_model.{module[len('model.'):]}" if module.startswith("model.") else module


def _matches(piece: str, module: str) -> bool:
    """PEFT's matching of a `target_modules` list entry (and of a `rank_pattern` key without regex characters)."""
    return module == piece or module.endswith("." + piece)


def _module_names(group: set[str], universe: set[str]) -> list[str]:
    """The shortest trailing names (`q_proj`, `attn.c_proj`, `layers.0.self_attn.o_proj`) that select, among
    `universe`, exactly the modules of `group`, as PEFT matches `target_modules` list entries."""
    names = set()
    for module in group:
        parts = module.split(".")
        for i in range(len(parts) - 1, -1, -1):
            piece = ".".join(parts[i:])
            if all(m in group for m in universe if _matches(piece, m)):
                names.add(piece)
                break
    return sorted(names)


# ---------------------------------------------------------------------------------------------- modules_to_save
# PeftModel's own modules above the transformers model (`PeftModel.named_modules`): a modules_to_save name must not
# select them
_PEFT_WRAPPERS = ("base_model", "base_model.model")
# modules transformers 5 names otherwise than its files (and transformers 4) do, by model type: PEFT names a module
# as the running transformers does, so an export saves such a module under both names (the other matches nothing)
_RENAMED_MODULES = {"gpt_neox": {"embed_out": "lm_head"}}


def _renamed_modules(config: Config) -> dict[str, str]:
    """`_RENAMED_MODULES` of `config`'s export, and Mixtral's routers, which transformers 5 names `mlp.gate` (its
    files `block_sparse_moe.gate`): old name -> new name."""
    model_type = config_to_hf(config)["model_type"]
    renamed = dict(_RENAMED_MODULES.get(model_type, {}))
    if model_type == "mixtral":
        renamed.update({f"model.layers.{i}.block_sparse_moe.gate": f"model.layers.{i}.mlp.gate"
                        for i in range(config.n_layer)})
    return renamed


def _save_matches(piece: str, module: str) -> bool:
    """PEFT's matching of a `modules_to_save` entry (`peft.utils.other._set_trainable`): the end of the module's name,
    as a string (`norm` selects `input_layernorm` too)."""
    return module.endswith(piece)


def _excluded_from_targets(module: str, modules_to_save: list[str]) -> bool:
    """PEFT never adapts a module a `modules_to_save` entry names, nor a module inside one (its `(^|.*\\.)m($|\\..*)`
    regular expression, `check_target_module_exists`)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules_to_save)


def hf_parameters(config: Config) -> dict[str, torch.Size]:
    """Every parameter of the transformers model `scripts/convert_lit_checkpoint.py` exports for `config`, by its
    name there, with its shape (a head tied to the token embeddings included, under its own name)."""
    model_type = config_to_hf(config)["model_type"]
    with torch.device("meta"):
        model = GPT(config)
    shapes = {k: t.shape for k, t in iter_lit_to_hf(model.state_dict().items(), config, model_type)}
    if config.tie_embeddings:
        shapes[f"{_hf_head(config, model_type)}.weight"] = shapes[f"{_hf_embedding(config, model_type)}.weight"]
    return shapes


def _hf_name(lit: str, config: Config, model_type: str) -> str:
    """The transformers name of the lit module `lit` that transformers keeps whole (embeddings, head, norms)."""
    bias = torch.empty(1, device="meta")  # (a bias's name, never skipped as a tied head's weight is)
    return next(k for k, _ in iter_lit_to_hf([(f"{lit}.bias", bias)], config, model_type)).rpartition(".")[0]


def _hf_head(config: Config, model_type: str) -> str:
    return _hf_name(_HEAD, config, model_type)


def _hf_embedding(config: Config, model_type: str) -> str:
    return _hf_name("transformer.wte", config, model_type)


def _hf_modules(parameters: dict[str, Any]) -> set[str]:
    """The names of the modules holding `parameters` and of every module above them."""
    names = set()
    for key in parameters:
        parts = key.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def _save_names(group: set[str], universe: set[str]) -> list[str]:
    """The shortest trailing names (`lm_head`, `input_layernorm`, `layers.0.input_layernorm`) that select, among
    `universe`, exactly the modules of `group`, as PEFT matches `modules_to_save` entries (`_save_matches`)."""
    names = set()
    for module in group:
        parts = module.split(".")
        # (never from a layer number on: `0.input_layernorm` would select layer 10's too in a deeper model)
        pieces = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1) if not parts[i].isdigit()]
        names.add(next((p for p in pieces if all(m in group for m in universe if _save_matches(p, m))), module))
    for name in sorted(names, key=len, reverse=True):  # one that others cover goes (`norm` covers `input_layernorm`)
        if all(any(_save_matches(n, m) for n in names - {name}) for m in group):
            names.discard(name)
    return sorted(names)


def _train_modules_export(model: GPT, saved: dict[str, torch.Tensor], adapted: set[str], where: str
                          ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """`modules_to_save` and the tensors `PeftModel.save_pretrained` writes for it (`base_model.model.<name>`, the
    whole module) for the modules `model` trains in full (`AdapterConfig.train_modules`), their values from the
    adapter file's `saved` tensors; `adapted` are the transformers modules the adapters wrap. A head tied to the
    token embeddings is one tensor here and two modules in transformers: both are saved, with the same values."""
    trained = trained_module_state_dict(model)
    if not trained:
        return [], {}
    config = model.config
    model_type = config_to_hf(config)["model_type"]
    lit_sd = {k: saved.get(k, p).detach() for k, p in trained.items()}
    head = _hf_head(config, model_type)
    tied = None
    if config.tie_embeddings and {"lm_head.weight", "transformer.wte.weight"} & set(lit_sd):
        tied = lit_sd.pop("lm_head.weight", None)
        tied = lit_sd.setdefault("transformer.wte.weight", tied)
    hf_sd = dict(iter_lit_to_hf(lit_sd.items(), config, model_type))
    if tied is not None:
        hf_sd[f"{head}.weight"] = tied.clone()  # (safetensors stores no two names for one tensor)
    owners = {k.rpartition(".")[0] for k in hf_sd}
    if tied is None and not {"lm_head.weight", "lm_head.bias"} & set(lit_sd):
        owners.discard(head)  # the zero output bias a Phi export adds, not a trained module
    names = _save_names(owners, _hf_modules(hf_parameters(config)) | set(_PEFT_WRAPPERS))
    clash = next((m for m in sorted(adapted) if _excluded_from_targets(m, names)), None)
    if clash is not None:  # (lit_gpt adapts no module it trains in full: names that stray that far)
        raise ValueError(f"{where} trains modules in full that PEFT would select as {names} (modules_to_save), which "
                         f"also names the adapted {clash!r}: merge the adapter (scripts/merge_lora.py, "
                         "scripts/merge_ether.py) and export the merged checkpoint "
                         "(scripts/convert_lit_checkpoint.py).")
    tensors = {f"{PEFT_PREFIX}{k}": v.contiguous() for k, v in hf_sd.items() if k.rpartition(".")[0] in owners}
    for old, new in _renamed_modules(config).items():
        if old in owners:
            names = sorted(names + [new])
            tensors.update({f"{PEFT_PREFIX}{new}.{k[len(old) + 1:]}": v.clone() for k, v in hf_sd.items()
                            if k.startswith(f"{old}.")})
    return names, tensors


# ---------------------------------------------------------------------------------------------- export
@torch.no_grad()
def _export_factors(layer, rows: torch.Tensor
                    ) -> Optional[tuple[torch.Tensor, torch.Tensor, int, float, Optional[torch.Tensor]]]:
    """`(A, B, rank, lora_alpha, magnitude)` of the transformers module whose rows are the lit `rows` of the adapted
    `layer` (`B`'s and DoRA's `magnitude`'s rows in the transformers order; `magnitude` None without DoRA), or None
    where none of those rows carries an adapter."""
    covered = [(lo, hi, layer.adapters[s] if s in layer.adapters else None) for s, lo, hi in layer.slices
               if bool(((rows >= lo) & (rows < hi)).any())]
    adapted = [(lo, hi, ad) for lo, hi, ad in covered if ad is not None]
    if not adapted:
        return None
    # (PiSSA's and OLoRA's adapters compute a plain LoRA of rank 2r on the original base: `LoRAAdapter.effective`)
    factors = [ad.effective() for _, _, ad in adapted]
    first = adapted[0][2]
    A0, B0, r, alpha = factors[0]
    if len(adapted) == len(covered) and all(torch.equal(A, A0) for A, *_ in factors):
        A, B = A0, torch.zeros(layer.out_features, r, dtype=B0.dtype)
        for (lo, hi, _), (_, Bs, _, _) in zip(adapted, factors):
            B[lo:hi] = Bs
    else:  # one A per slice: the block form, rank k r with k times the alpha (the same scale)
        k = len(adapted)
        A = torch.cat([As for As, *_ in factors])
        B = torch.zeros(layer.out_features, k * r, dtype=B0.dtype)
        for i, ((lo, hi, _), (_, Bs, _, _)) in enumerate(zip(adapted, factors)):
            B[lo:hi, i * r:(i + 1) * r] = Bs
        r, alpha = k * r, k * alpha
    magnitude = None
    if first.magnitude is not None:  # rows without an adapter keep their norm: PEFT's DoRA then leaves them as they are
        W = layer.base_weight().detach()
        magnitude = torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).to(first.magnitude.dtype)
        for lo, hi, ad in adapted:
            magnitude[lo:hi] = ad.magnitude.detach()
        magnitude = magnitude[rows].contiguous()
    return A.clone(), B[rows].contiguous(), r, alpha, magnitude


def _number(x: float) -> Union[int, float]:
    """An integral float as an int, as PEFT's own configs write `lora_alpha`."""
    return int(x) if float(x).is_integer() else float(x)


def _lora_export(model: GPT, modules: dict[str, HFModule], dtype: torch.dtype) -> tuple[dict, dict]:
    """The LoRA part of `adapter_config.json` and the tensors of `adapter_model.safetensors` for `model`."""
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, float]] = {}  # transformers module -> (rank, lora_alpha)
    for name, layer in adapted_layers(model):
        for hf_module, module in modules.items():
            if module.lit != name:
                continue
            factors = _export_factors(layer, module.rows)
            if factors is None:
                continue
            A, B, r, alpha, magnitude = factors
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = A.to(dtype)
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = B.to(dtype)
            if magnitude is not None:
                tensors[f"{PEFT_PREFIX}{hf_module}.lora_magnitude_vector"] = magnitude.to(dtype)
            settings[hf_module] = (r, alpha)
    # the most common (rank, alpha) is the config's; modules with others (a fused QKV's block form) get patterns
    (r, alpha), _ = Counter(settings.values()).most_common(1)[0]
    rank_pattern, alpha_pattern = {}, {}
    adapted = set(settings)
    for value in sorted(set(settings.values()) - {(r, alpha)}):
        group = {m for m, v in settings.items() if v == value}
        for piece in _module_names(group, adapted):
            rank_pattern[re.escape(piece)] = value[0]
            alpha_pattern[re.escape(piece)] = _number(value[1])
    model_type = config_to_hf(model.config)["model_type"]
    adapter_config = adapter_config_of(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_model_name(model.config),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": _module_names(adapted, set(modules)),
        "lora_dropout": adapter_config.dropout,
        "bias": "none",
        "fan_in_fan_out": model_type == "gpt2",  # GPT-2's Conv1D layers store their weight as (in, out)
        "use_rslora": False,
        "use_dora": adapter_config.dora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }, tensors


def _input_transforms(model: GPT, modules: dict[str, HFModule], where: str, peft_name: str) -> dict[str, Any]:
    """The input-side transform (an `OFTTransform` or ETHER's `HouseholderTransform`) of every transformers module
    the adapters of `model` cover: PEFT's OFT and HRA wrap a whole `torch.nn.Linear` and transform its input, so a
    module must be a Linear and every lit slice its rows come from must carry the same transform."""
    model_type = config_to_hf(model.config)["model_type"]
    found: dict[str, Any] = {}
    for name, layer in adapted_layers(model):
        for hf_module, module in modules.items():
            if module.lit != name:
                continue
            hit = [s for s, lo, hi in layer.slices if bool(((module.rows >= lo) & (module.rows < hi)).any())]
            adapted = [s for s in hit if s in layer.adapters]
            if not adapted:
                continue
            if model_type == "gpt2" and hf_module != "lm_head":
                raise ValueError(
                    f"{where} adapts {name} ({hf_module!r} in transformers), a GPT-2 Conv1D layer, which PEFT's "
                    f"{peft_name} cannot wrap (it takes torch.nn.Linear layers only): merge the adapter with "
                    "scripts/merge_ether.py and export the merged checkpoint with scripts/convert_lit_checkpoint.py."
                )
            transforms = [layer.adapters[s].input for s in adapted]
            first = transforms[0]
            same = len(adapted) == len(hit) and all(
                all(torch.equal(a, b) for a, b in zip(first.parameters(), t.parameters())) for t in transforms[1:])
            if not same:
                raise ValueError(
                    f"{where} gives the {'/'.join(hit)} slices of {name} different transforms (adapted: "
                    f"{', '.join(adapted)}), but transformers' {hf_module!r} is one layer whose input PEFT's "
                    f"{peft_name} transforms once for all its rows: adapt {', '.join(hit)} with equal transforms (an "
                    "import of a PEFT adapter has them), or merge the adapter with scripts/merge_ether.py and export "
                    "the merged checkpoint with scripts/convert_lit_checkpoint.py."
                )
            found[hf_module] = first
    return found


def _export_dtype(saved_dtype: torch.dtype) -> torch.dtype:
    """OFT's and HRA's tensors as PEFT keeps its adapter weights: float32 (float64 stays), so the packed skew
    entries (a difference) and the vectors are written without a second rounding."""
    return torch.float64 if saved_dtype == torch.float64 else torch.float32


def _one_value(values: dict[str, int], what: str, where: str, field: str, fix: str) -> int:
    """The value every module shares, or a one-sentence refusal naming two modules that differ."""
    distinct = sorted(set(values.values()))
    if len(distinct) == 1:
        return distinct[0]
    a = next(m for m, v in values.items() if v == distinct[0])
    b = next(m for m, v in values.items() if v == distinct[1])
    raise ValueError(f"{where} has {what} {distinct[0]} on {a!r} but {distinct[1]} on {b!r}, while PEFT's {field} is "
                     f"one number for every layer: {fix}.")


def _oft_export(model: GPT, modules: dict[str, HFModule], where: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """PEFT's OFT (`OFTConfig`, `oft_R.weight` `(r, k(k-1)/2)` per module) for the lit OFT adapters of `model`.

    PEFT stores per block the strict upper triangle `q` (`torch.triu_indices` order) of a skew `Q` and multiplies
    the input rows by its rotation from the right: exact Cayley is our `S = Q`, its Cayley-Neumann series of `T`
    terms our `S = -Q` with `K = T - 2` (docs/METHODS.md, `lit_gpt/adapters/oft.py`); its COFT radius is
    `eps / sqrt(stored blocks)` per block, ours `eps`."""
    adapter_config = adapter_config_of(model)
    transforms = _input_transforms(model, modules, where, "OFT")
    K = adapter_config.neumann_terms
    if K == 1:
        raise ValueError(
            f"{where} sets neumann_terms=1, a series (I + S)(I + S) that no PEFT num_cayley_neumann_terms gives "
            "(T terms are K = T - 2 for T >= 4, and T = 3 is K = 2): retrain with neumann_terms 0 (exact) or >= 2, "
            "or merge the adapter with scripts/merge_ether.py."
        )
    out_dtype = _export_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for hf_module, t in transforms.items():
        rows, cols = torch.triu_indices(t.k, t.k, 1)
        if t.upper_triangle:
            S_upper = t.R_upper.detach().double() / 2
        else:
            R = t.R.detach().double()
            S_upper = ((R - R.transpose(-1, -2)) / 2)[:, rows, cols]
        q = S_upper if K == 0 else -S_upper
        tensors[f"{PEFT_PREFIX}{hf_module}.oft_R.weight"] = q.to(out_dtype).contiguous()
        sizes[hf_module], counts[hf_module] = t.k, t.nb
    fix = "set block_size (or nb) so every adapted layer has the same, or merge the adapter with scripts/merge_ether.py"
    # the config's own choice (nb or block_size) where it is one number for PEFT: an import gives it back
    if len(set(sizes.values())) == 1 and (adapter_config.block_size is not None or len(set(counts.values())) > 1):
        r, block_size = 0, next(iter(sizes.values()))
    else:
        r, block_size = _one_value(counts, "nb (blocks)", where, "r (or oft_block_size)", fix), 0
    eps = adapter_config.eps
    if adapter_config.coft and not adapter_config.block_share:
        # PEFT bounds each block by eps / sqrt(r): one eps fits only where every layer has the same r
        eps = adapter_config.eps * math.sqrt(_one_value(counts, "nb (blocks)", where, "COFT radius eps / sqrt(r)",
                                                        "set nb (not block_size) for COFT, or merge the adapter"))
    peft_config = {
        "peft_type": "OFT",
        "task_type": "CAUSAL_LM",
        # PEFT warns about a Cayley-Neumann adapter saved before 0.18, whose series differed: this is the new one
        "peft_version": PEFT_OFT_VERSION,
        "base_model_name_or_path": _base_model_name(model.config),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "oft_block_size": block_size,
        "module_dropout": adapter_config.block_dropout,
        "target_modules": _module_names(set(transforms), set(modules)),
        "fan_in_fan_out": False,
        "bias": "none",
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "coft": adapter_config.coft,
        "eps": eps,
        "block_share": adapter_config.block_share,
        "use_cayley_neumann": K > 0,
        "num_cayley_neumann_terms": K + 2 if K > 0 else 5,
    }
    return peft_config, tensors


def _hra_export(model: GPT, modules: dict[str, HFModule], where: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """PEFT's HRA (`HRAConfig`, `hra_u` `(in, r)` per module) for the lit ETHER adapters of `model`.

    ETHER's `I - 2 sum_b û_b û_bᵀ` over blocks with disjoint supports is the product of the `nb` full-width
    reflections `I - 2 w_b w_bᵀ`, `w_b` being `û_b` zero-padded outside block `b` (they commute; Gram-Schmidt leaves
    orthogonal vectors as they are): PEFT's HRA with `r = nb` and the raw `u_b` (it normalises each column)."""
    transforms = _input_transforms(model, modules, where, "HRA")
    out_dtype = _export_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for hf_module, t in transforms.items():
        u = t.u.detach()
        norms = torch.linalg.vector_norm(u.to(compute_dtype(u)), dim=-1)
        if bool((norms < NORM_EPS).any()):
            block = int((norms < NORM_EPS).nonzero()[0, 0])
            raise ValueError(
                f"{where} has an all-zero vector u on block {block} of {t.nb} of the layer exported as {hf_module!r} "
                "(an identity block), which a PEFT HRA reflection cannot be: merge the adapter with "
                "scripts/merge_ether.py instead."
            )
        padded = torch.zeros(t.nb * t.k, t.nb, dtype=out_dtype)
        for b in range(t.nb):
            padded[b * t.k:(b + 1) * t.k, b] = u[b].to(out_dtype)
        tensors[f"{PEFT_PREFIX}{hf_module}.hra_u"] = padded
        counts[hf_module] = t.nb
    r = _one_value(counts, "nb (blocks)", where, "HRA r", "retrain with nb instead of block_size, or merge the "
                   "adapter with scripts/merge_ether.py")
    peft_config = {
        "peft_type": "HRA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_model_name(model.config),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "apply_GS": False,
        "target_modules": _module_names(set(transforms), set(modules)),
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "modules_to_save": None,
    }
    return peft_config, tensors


def base_export_dir(output_dir: Union[str, Path]) -> Path:
    """`<output_dir>-base-hf`, as an absolute path: the folder an export's adapter_config.json names as the base
    model where no Hub id is known, and `scripts/convert_peft_adapter.py export` asks the transformers export of the
    base (scripts/convert_lit_checkpoint.py) to be written to."""
    out = Path(os.path.abspath(output_dir))
    return out.parent / f"{out.name}{BASE_EXPORT_SUFFIX}"


def _local_path(name: str) -> bool:
    """Whether a base_model_name_or_path names a local folder rather than a Hub id (`org/name`)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def export_peft_adapter(adapter_path: Union[str, Path], checkpoint_dir: Union[str, Path],
                        output_dir: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter file `adapter_path` (`.pth` or `.safetensors`, as `save_adapters` writes it) as a PEFT
    adapter folder in `output_dir`: `adapter_config.json` and `adapter_model.safetensors`, which
    `PeftModel.from_pretrained(<the transformers export of checkpoint_dir>, output_dir)` loads into a model that
    computes the same logits as the adapted lit model. LoRA becomes PEFT's LoRA, OFT its OFT, ETHER its HRA (a
    product of `nb` reflections); modules trained in full (`train_modules`) its `modules_to_save`. Refuses, in one
    sentence, what PEFT cannot compute: ETHER+ (not a product of reflections), output-side transforms
    (`flip_side`), OFT or ETHER on GPT-2's Conv1D layers or with different transforms on the slices of a fused QKV
    layer, and an adapter trained on another base model.

    `base_model_name_or_path` is what adapter_config.json names as the base model, which
    `AutoPeftModelForCausalLM.from_pretrained(output_dir)` loads: by default the Hub id of the model the checkpoint
    was converted from where its config names one (`org/name`), else `base_export_dir(output_dir)`, where the
    transformers export of `checkpoint_dir` is then to be written (scripts/convert_lit_checkpoint.py)."""
    from lit_gpt.merge import check_same_base, read_finetuned

    if base_model_name_or_path is not None and not (isinstance(base_model_name_or_path, str)
                                                    and base_model_name_or_path.strip()):
        raise ValueError(f"--base_model_name_or_path {base_model_name_or_path!r} names no model: pass a Hub id "
                         "(org/name) or the folder holding the base model's transformers export.")

    finetuned = read_finetuned(adapter_path, checkpoint_dir)
    where = str(finetuned.path)
    if finetuned.kind != "adapter":
        raise ValueError(
            f"{where!r} holds full fine-tuning weights, not an adapter: export the whole model with "
            "scripts/convert_lit_checkpoint.py instead."
        )
    method = finetuned.method
    merge_instead = ("merge it with scripts/merge_ether.py and export the merged checkpoint with "
                     "scripts/convert_lit_checkpoint.py")
    if method not in PEFT_TYPE_OF:
        raise ValueError(
            f"{where!r} holds {method} adapters, whose blocks I - ûûᵀ + v̂v̂ᵀ are not products of reflections, "
            f"so no PEFT method computes them (ETHER exports as HRA, OFT as OFT): {merge_instead}."
        )
    if finetuned.payload["adapter_config"].get("flip_side"):
        raise ValueError(
            f"{where!r} transforms the layers' outputs (flip_side=True), while PEFT's {PEFT_TYPE_OF[method]} "
            f"transforms only a layer's input: {merge_instead}."
        )
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    output_dir = check_output_dir(output_dir, "--output_dir")
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--output_dir {str(output_dir)!r} is the base checkpoint directory: pick a new folder.")
    config = Config.from_checkpoint(checkpoint_dir)
    modules = hf_linear_modules(config)
    with torch.device("meta"):
        model = GPT(config)
    check_same_base(finetuned, model, checkpoint_dir)
    if finetuned.payload["adapter_config"].get("dora"):  # (the norms of rows without an adapter: `_export_factors`)
        load_model_weights(model, checkpoint_dir / WEIGHTS_FILENAME)
    load_adapters(model, finetuned.payload)  # the adapter tensors replace their meta placeholders
    saved = finetuned.payload["state_dict"]
    dtype = next((v.dtype for v in saved.values() if v.is_floating_point()), torch.float32)
    if method == "lora":
        peft_config, tensors = _lora_export(model, modules, dtype)
    elif method == "oft":
        peft_config, tensors = _oft_export(model, modules, repr(where), dtype)
    else:
        peft_config, tensors = _hra_export(model, modules, repr(where), dtype)
    adapted = {m for m in modules if any(k.startswith(f"{PEFT_PREFIX}{m}.") for k in tensors)}
    apart = sorted(m for m in adapted if m.endswith((".mlp.gate_proj", ".mlp.up_proj")))
    if apart and config_to_hf(config)["model_type"] == "phi3":
        raise ValueError(
            f"{where!r} adapts the MLP's gate and up projections (mlp.fc_1, mlp.fc_2), which the transformers export "
            f"of {str(checkpoint_dir)!r} (a Phi-3 rotating part of each head) fuses into one gate_up_proj, where a "
            f"PEFT adapter would have to be one transform of both: {merge_instead}."
        )
    _note_fused_experts(adapted, peft_config, config, where, method)
    layers = finetuned.payload["adapter_config"].get("layers")
    if layers is not None:  # as a PEFT user writes it: layer names, and the blocks in layers_to_transform; layers
        # outside them (the head) by their full names, which PEFT adapts whatever the blocks
        inside = {m for m in modules if block_index(m) in layers}
        peft_config["target_modules"] = _module_names(adapted & inside, inside) + sorted(adapted - inside)
        peft_config["layers_to_transform"] = list(layers)
    # a module transformers 5 names otherwise (GPT-NeoX's head): adapted under both names, PEFT finds the one the
    # running transformers has (the other matches nothing, and its tensors are not loaded)
    for old, new in _RENAMED_MODULES.get(config_to_hf(config)["model_type"], {}).items():
        if old in adapted:
            peft_config["target_modules"] = sorted(set(peft_config["target_modules"]) | {new})
            for field in ("rank_pattern", "alpha_pattern"):  # (LoRA: a head whose rank is not the config's)
                pattern = peft_config.get(field) or {}
                if re.escape(old) in pattern:
                    pattern[re.escape(new)] = pattern[re.escape(old)]
            tensors.update({f"{PEFT_PREFIX}{new}.{k[len(PEFT_PREFIX) + len(old) + 1:]}": v.clone()
                            for k, v in list(tensors.items()) if k.startswith(f"{PEFT_PREFIX}{old}.")})
    to_save, trained = _train_modules_export(model, saved, adapted, repr(where))
    if to_save:
        peft_config["modules_to_save"] = to_save
        tensors.update(trained)
        embed = _hf_embedding(config, config_to_hf(config)["model_type"])
        if method == "lora" and config.tie_embeddings and f"{PEFT_PREFIX}{embed}.weight" in trained:
            peft_config["ensure_weight_tying"] = True  # PEFT then trains the head and the embeddings as one tensor
    _note_dropped_dropout(finetuned.payload["adapter_config"], method, where)
    # a name AutoPeftModelForCausalLM can load the base from, never null: the Hub id, else the export's folder
    if base_model_name_or_path and _local_path(base_model_name_or_path):  # absolute: it loads from any directory
        base_model_name_or_path = os.path.abspath(os.path.expanduser(base_model_name_or_path))
    peft_config["base_model_name_or_path"] = (base_model_name_or_path or _base_model_name(config)
                                              or str(base_export_dir(output_dir)))
    from safetensors.torch import save_file

    from lit_gpt.merge import PROMPT_STYLE_FILENAME, prompt_style_text, trained_prompt_style

    output_dir.mkdir(parents=True, exist_ok=True)
    # the format the run trained with (PEFT ignores the file; an import reads it back), in the same set: a re-export
    # stopped part way leaves the earlier export whole, its prompt format included
    style = trained_prompt_style(finetuned)[0]
    names = [PEFT_CONFIG_FILENAME, PEFT_WEIGHTS_FILENAME] + ([PROMPT_STYLE_FILENAME] if style is not None else [])
    # the config first: without it PEFT reads nothing, so an interrupted write never leaves a loadable mix
    with atomic_paths(*(output_dir / name for name in names)) as temps:
        temps[0].write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(temps[1]), metadata={"format": "pt"})
        if style is not None:
            temps[2].write_text(prompt_style_text(style), encoding="utf-8")
    if style is None:  # an earlier export's would be taken for this adapter's
        (output_dir / PROMPT_STYLE_FILENAME).unlink(missing_ok=True)
    return output_dir


def _note_fused_experts(adapted: set[str], peft_config: dict, config: Config, where: str, method: str) -> None:
    """A note where the folder adapts a mixture's routed experts or router in a way PEFT on transformers 5 does not
    load as written (measured with PEFT 0.21, transformers 5.24): transformers 5 keeps each block's experts fused in
    one tensor and its router is not a linear module. PEFT converts per-expert adapters onto the fused tensor only
    for plain LoRA without dropout (it drops OFT's and HRA's on experts silently, and refuses DoRA's), only when
    every expert's layer is named alike (`gate_proj`), and for a Qwen2-MoE not at all (it adapts the shared expert
    alone); it adapts a router with LoRA only. transformers 4, with one module per expert, loads them all.
    A LoRA's dropout, the one thing in the way that changes nothing the export computes, is written as 0."""
    experts = sorted(m for m in adapted if ".experts." in m)
    routers = sorted(m for m in adapted if m.endswith((".block_sparse_moe.gate", ".mlp.gate")))
    if not experts and not routers:
        return
    model_type = config_to_hf(config)["model_type"]
    names = peft_config.get("target_modules") or []
    some = [t for t in names if re.search(r"(^|\.)\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)$", t)]
    kind = {"lora": "DoRA" if peft_config.get("use_dora") else "LoRA", "oft": "OFT", "ether": "HRA"}[method]
    why = None
    if experts and model_type == "qwen2_moe":
        why = "PEFT on transformers 5 applies a Qwen2-MoE's shared-expert adapters only, not the routed experts'"
    elif experts and kind != "LoRA":
        why = (f"PEFT on transformers 5, whose experts are one fused tensor per block, leaves out or refuses {kind} "
               "adapters on experts (it converts plain LoRA only)")
    elif experts and some:
        why = (f"it adapts some experts only ({', '.join(some[:3])}{', ...' if len(some) > 3 else ''}), which PEFT "
               "on transformers 5, whose experts are one fused tensor per block, does not load")
    elif routers and kind != "LoRA":
        why = f"PEFT on transformers 5, whose router is not a linear module, cannot put {kind} on it"
    if why is not None:
        print(f"Note: {where!r}: {why}; load this PEFT folder with transformers 4 (one module per expert), or use "
              "the adapter file itself with lit_gpt.", file=sys.stderr)
    elif experts and kind == "LoRA" and peft_config.get("lora_dropout"):
        print(f"Note: {where!r} trained with lora_dropout={peft_config['lora_dropout']:g}, which PEFT on transformers 5 "
              "refuses on a mixture's fused experts: the export writes 0, which computes the same (training it "
              "further in PEFT runs without dropout).", file=sys.stderr)
        peft_config["lora_dropout"] = 0.0


def _note_dropped_dropout(adapter_config: dict, method: str, where: str) -> None:
    """A note for the training-time dropouts PEFT's OFT or HRA has no setting for (LoRA's dropout is `lora_dropout`,
    OFT's block dropout `module_dropout`): the export computes the same, but training it on in PEFT drops them."""
    dropped = []
    if method != "lora" and adapter_config.get("dropout"):
        dropped.append(f"dropout={adapter_config['dropout']:g} on the layer input (--ether_dropout)")
    if method == "ether" and adapter_config.get("block_dropout"):
        dropped.append(f"block dropout={adapter_config['block_dropout']:g} (--block_dropout)")
    if dropped:
        print(f"note: {where!r} trained with {' and '.join(dropped)}, which PEFT's {PEFT_TYPE_OF[method]} has no "
              "setting for: the export computes the same, but training it further in PEFT runs without "
              f"{'it' if len(dropped) == 1 else 'them'}.", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- import
def _version(text: Any) -> tuple[int, ...]:
    """`"0.18.0"` (or `"0.18.0.dev0@abc"`) as `(0, 18, 0)`; `()` for anything else."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_peft_config(peft_dir: Path) -> dict:
    """The `adapter_config.json` of a PEFT LoRA, OFT or HRA folder, refusing in one sentence what a lit adapter
    cannot compute."""
    path = peft_dir / PEFT_CONFIG_FILENAME
    where = repr(str(path))
    cfg = read_json_object(path, "save the adapter again with PEFT", holds="a PEFT adapter config")
    peft_type = cfg.get("peft_type")
    if peft_type not in LIT_METHOD_OF:
        raise ValueError(
            f"{where} is a {peft_type} adapter (peft_type), but only LORA, OFT and HRA adapters convert to lit_gpt: "
            "merge it into the base with PEFT (merge_and_unload) and convert that model with "
            "scripts/convert_hf_checkpoint.py."
        )
    ours = {"LORA": "LoRA", "OFT": "OFT", "HRA": "ETHER"}[peft_type]
    fix = ("retrain without it, or merge the adapter into the base with PEFT (merge_and_unload) and convert that "
           "model with scripts/convert_hf_checkpoint.py")
    if cfg.get("bias", "none") != "none":
        raise ValueError(
            f"{where} sets bias={cfg['bias']!r}, which trains the base model's biases, while a lit {ours} adapter "
            f"holds only its own tensors: {fix}."
        )
    for key, what in UNSUPPORTED_SETTINGS.items():
        if key == "target_parameters" and peft_type == "LORA" and _fused_expert_parameters(cfg.get(key)):
            continue  # (LoRA on transformers 5's fused experts: `_split_fused_experts`)
        if cfg.get(key):
            raise ValueError(f"{where} sets {key}={cfg[key]!r}, {what}, which lit_gpt's {ours} does not "
                             f"implement: {fix}.")
    if cfg.get("target_modules") is None:
        raise ValueError(f"{where} has no target_modules: save the adapter again with PEFT.")
    if isinstance(cfg["target_modules"], str) and cfg.get("layers_to_transform") not in (None, []):
        raise ValueError(f"{where} sets layers_to_transform with a regular expression as target_modules, which PEFT "
                         "refuses too: put the blocks in the regular expression, or list the module names.")
    to_save = cfg.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(m, str) and m for m in to_save)):
        raise ValueError(f"{where} has modules_to_save={to_save!r}, which is not a list of module names: save the "
                         "adapter again with PEFT.")
    if peft_type == "LORA":
        init = str(cfg.get("init_lora_weights", True)).lower()
        if init.startswith(BASE_CHANGING_INITS):
            raise ValueError(
                f"{where} sets init_lora_weights={cfg['init_lora_weights']!r}, which rewrites the base weights, so "
                "the adapter only fits that changed base: save it again with PEFT's save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...) so it applies to the original base model."
            )
        for key in ("r", "lora_alpha"):
            if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
                raise ValueError(f"{where} has no positive number {key} (got {cfg.get(key)!r}): save it again.")
    elif peft_type == "OFT":
        if "oft_block_size" not in cfg:  # what PEFT's OFTConfig.check_kwargs refuses too
            raise ValueError(f"{where} has no oft_block_size: it was saved by PEFT before 0.14, whose OFT layout "
                             "differs; retrain the adapter with PEFT >= 0.14.")
        r, size = cfg.get("r", 0), cfg.get("oft_block_size")
        if not (_is_count(r, 0) and _is_count(size, 0)) or (r == 0) == (size == 0):
            raise ValueError(f"{where} must set exactly one of r and oft_block_size to a positive integer (got "
                             f"r={r!r}, oft_block_size={size!r}): save the adapter again with PEFT.")
        if cfg.get("use_cayley_neumann", True):
            terms = cfg.get("num_cayley_neumann_terms", 5)
            if not _is_count(terms, 3):
                raise ValueError(
                    f"{where} sets num_cayley_neumann_terms={terms!r}, whose series (the identity, or I + 2Q) is "
                    "not a Cayley-Neumann block lit_gpt's OFT implements (3 or more terms are): retrain with more "
                    "terms or use_cayley_neumann=false, or merge the adapter into the base with PEFT "
                    "(merge_and_unload)."
                )
            if _version(cfg.get("peft_version")) < (0, 18):
                raise ValueError(
                    f"{where} uses the Cayley-Neumann series and was saved by PEFT "
                    f"{cfg.get('peft_version') or 'before 0.18 (no peft_version)'}, whose series differs from the "
                    "one PEFT >= 0.18 and lit_gpt compute: retrain it with PEFT >= 0.18, or merge it into the base "
                    "with that older PEFT (merge_and_unload) and convert that model with "
                    "scripts/convert_hf_checkpoint.py."
                )
        if cfg.get("coft") and not (isinstance(cfg.get("eps"), (int, float)) and cfg["eps"] > 0):
            raise ValueError(f"{where} sets coft=true without a positive eps (got {cfg.get('eps')!r}): save it again.")
    elif not _is_count(cfg.get("r"), 1):
        raise ValueError(f"{where} has no positive integer r (got {cfg.get('r')!r}): save it again with PEFT.")
    return cfg


def peft_selects(cfg: dict, module: str, output_head: str) -> bool:
    """Whether PEFT puts a LoRA layer on the linear `module` (its name in the transformers model) for `cfg`: its
    `exclude_modules`, `target_modules` (a list of names, a regex string, or `all-linear`) and `layers_to_transform`
    / `layers_pattern`, as `peft.tuners.tuners_utils.check_target_module_exists` reads them, never a module
    `modules_to_save` names (PEFT trains it in full instead)."""
    if _excluded_from_targets(module, cfg.get("modules_to_save") or []):
        return False
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif any(_matches(e, module) for e in exclude):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return module != output_head
        return re.fullmatch(targets, module) is not None
    if module in targets:  # a module named exactly: whatever layers_to_transform says
        return True
    if not any(_matches(t, module) for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """`rank_pattern` / `alpha_pattern` as PEFT reads them (`get_pattern_key`): the first key matching the end of
    the module's name, as a regular expression."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft_tensors(peft_dir: Path) -> dict[str, torch.Tensor]:
    path = peft_dir / PEFT_WEIGHTS_FILENAME
    if not path.is_file():
        if (peft_dir / PEFT_PICKLE_FILENAME).is_file():
            raise ValueError(
                f"{str(peft_dir)!r} holds {PEFT_PICKLE_FILENAME}, a pickle file, which lit_gpt never loads (it can "
                "run code): save the adapter again with PEFT's save_pretrained(..., safe_serialization=True) to get "
                f"{PEFT_WEIGHTS_FILENAME}."
            )
        raise FileNotFoundError(
            f"{str(peft_dir)!r} has {PEFT_CONFIG_FILENAME} but no {PEFT_WEIGHTS_FILENAME}: copy the whole folder "
            "PEFT's save_pretrained wrote."
        )
    return load_file(path)


def _split_fused(A: torch.Tensor, B_full: torch.Tensor, slices: list[tuple[str, int, int]], scaling: float,
                 alpha_of, block_form: bool = True) -> dict[str, _Factors]:
    """One transformers LoRA on a whole fused QKV layer (`B_full` in lit row order) as per-slice factors: the block
    form back as rank-`r` slices where it is one (see the module docstring) and `block_form` allows it, else every
    slice with all of `A`."""
    if not block_form:
        return {s: _Factors(A.clone(), B_full[lo:hi].clone(), scaling, alpha_of(A.shape[0])) for s, lo, hi in slices}
    support = [[s for s, lo, hi in slices if bool(B_full[lo:hi, j].ne(0).any())] for j in range(A.shape[0])]
    columns: dict[str, list[int]] = {}
    for j, owners in enumerate(support):
        if len(owners) == 1:
            columns.setdefault(owners[0], []).append(j)
    if all(len(o) == 1 for o in support) and len({len(c) for c in columns.values()}) == 1:
        rank = len(next(iter(columns.values())))
        return {s: _Factors(A[cols].clone(), B_full[lo:hi, cols].clone(), scaling, alpha_of(rank))
                for s, lo, hi in slices if (cols := columns.get(s))}
    return {s: _Factors(A.clone(), B_full[lo:hi].clone(), scaling, alpha_of(A.shape[0])) for s, lo, hi in slices}


def _targets(adapted: set[tuple[str, str]], config: Config, model: GPT, where: str
             ) -> tuple[list[str], Optional[list[int]]]:
    """`AdapterConfig.targets` and `.layers` that adapt exactly the `(lit layer, slice)` pairs of `adapted` in
    `model`: the same layers in some blocks only (PEFT's `layers_to_transform`) as those blocks; q/k/v in some blocks
    only as those blocks, the other layers by their full names (which `layers` keeps); else the GPT's named targets
    where a kind of layer is adapted on every block, module names for the other linear layers."""
    n = config.n_layer
    shape = [frozenset((layer[len(f"transformer.h.{i}."):], s) for layer, s in adapted
                       if layer.startswith(f"transformer.h.{i}.")) for i in range(n)]
    used = [i for i in range(n) if shape[i]]
    head = ["head"] if _HEAD in {layer for layer, _ in adapted} else []
    qkv = [frozenset(s for layer, s in shape[i] if layer == _ATTN) for i in range(n)]

    def named_qkv(block: int) -> list[str]:
        return [s for s in ("query", "key", "value") if s in qkv[block]]

    if used and len(used) < n and len({shape[i] for i in used}) == 1:
        kinds = shape[used[0]]
        targets = named_qkv(used[0])
        if any(layer == _PROJ for layer, _ in kinds):
            targets.append("projection")
        mlp = [f"mlp.{child}" for child in mlp_target_layers(model.transformer.h[used[0]].mlp)]
        chosen = sorted(layer for layer, _ in kinds if layer.startswith("mlp."))
        targets += ["mlp"] if chosen == sorted(mlp) else chosen
        return targets + head, used
    with_qkv = [i for i in range(n) if qkv[i]]
    if len({qkv[i] for i in with_qkv}) > 1:
        which = [i for i in with_qkv if qkv[i] != qkv[with_qkv[0]]]
        raise ValueError(
            f"{where} adapts other query/key/value projections in block {with_qkv[0]} than in block "
            f"{', '.join(map(str, which[:4]))}{' …' if len(which) > 4 else ''}, which lit_gpt's fused QKV layer "
            "cannot express: adapt the same ones in every block that has any, or merge the adapter into the base "
            "with PEFT (merge_and_unload)."
        )
    if with_qkv and len(with_qkv) < n:  # those blocks as the layers; the rest by full names, which layers keeps
        rest = sorted({layer for layer, _ in adapted if not layer.endswith(_ATTN)} - {_HEAD})
        return named_qkv(with_qkv[0]) + head + rest, with_qkv
    targets = named_qkv(0)
    layers = {layer for layer, _ in adapted if not layer.endswith(_ATTN)}
    proj = [f"transformer.h.{i}.{_PROJ}" for i in range(n)]
    if all(p in layers for p in proj):
        targets.append("projection")
        layers -= set(proj)
    mlp = [f"transformer.h.{i}.mlp.{child}" for i in range(n)
           for child in mlp_target_layers(model.transformer.h[i].mlp)]
    if all(m in layers for m in mlp):
        targets.append("mlp")
        layers -= set(mlp)
    if _HEAD in layers:
        targets.append("head")
        layers.discard(_HEAD)
    return targets + sorted(layers), None


# the tensor names `PeftModel.save_pretrained` writes per adapted module (after `PEFT_PREFIX<module>`), by peft_type
TENSOR_NAMES = {"LORA": (r"lora_([AB])\.weight", ("A", "B")),
                "DORA": (r"lora_([AB])\.weight|lora_(magnitude)_vector", ("A", "B", "magnitude")),  # use_dora
                "OFT": (r"(oft_R)\.weight", ("oft_R",)), "HRA": (r"(hra_u)", ("hra_u",))}


def _check_peft_dir(peft_dir: Union[str, Path]) -> Path:
    """The import's PEFT folder, refused in one sentence before anything is read when it is not one."""
    peft_dir = Path(peft_dir)
    if peft_dir.is_file():
        raise ValueError(f"--peft_dir {str(peft_dir)!r} is a file: pass the folder PEFT's save_pretrained wrote "
                         f"(with {PEFT_CONFIG_FILENAME} and {PEFT_WEIGHTS_FILENAME}).")
    if not peft_dir.is_dir():
        raise FileNotFoundError(f"--peft_dir {str(peft_dir)!r} does not exist: pass the folder PEFT's "
                                "save_pretrained wrote.")
    if not (peft_dir / PEFT_CONFIG_FILENAME).is_file():
        what = " (it holds a transformers model: config.json)" if (peft_dir / "config.json").is_file() else ""
        raise FileNotFoundError(f"--peft_dir {str(peft_dir)!r} has no {PEFT_CONFIG_FILENAME}{what}: pass the folder "
                                "PEFT's save_pretrained wrote for the adapter.")
    return peft_dir


def _check_adapter_path(adapter_path: Union[str, Path]) -> Path:
    """The import's output file, refused in one sentence before anything is read when it cannot be written."""
    adapter_path = Path(adapter_path)
    if adapter_path.suffix not in ADAPTER_SUFFIXES:
        raise ValueError(f"--adapter_path {str(adapter_path)!r} must end in .pth or .safetensors (the two adapter "
                         "file formats lit_gpt reads).")
    check_output_dir(adapter_path.parent, "--adapter_path's folder")
    if adapter_path.is_dir():
        raise ValueError(f"--adapter_path {str(adapter_path)!r} is a folder: pass a file name ending in .pth or "
                         ".safetensors.")
    return adapter_path


def _import_style(peft_dir: Path, prompt_style: Optional[str], system_prompt: Optional[str]) -> Optional[dict]:
    """The prompt style an import stores: `prompt_style` (and `system_prompt`), else the `prompt_style.yaml` an
    export wrote beside the adapter, else none."""
    from lit_gpt.merge import read_prompt_style_file

    style = read_prompt_style_file(peft_dir)  # what an export wrote beside the adapter, unless given here
    if prompt_style is not None:
        from lit_gpt.data.prompts import PROMPT_STYLE_NAMES

        if prompt_style not in PROMPT_STYLE_NAMES:
            raise ValueError(f"--prompt_style {prompt_style!r} is not one of {', '.join(PROMPT_STYLE_NAMES)}.")
        style = {"prompt_style": prompt_style, "system_prompt": None}
    if system_prompt is not None:
        if style is None:
            raise ValueError("--system_prompt needs --prompt_style (the format it is given in).")
        style = {**style, "system_prompt": system_prompt}
    return style


def _check_head_copy(key: str, tensor: torch.Tensor, weights: str, ckpt: str) -> None:
    """PEFT saves the base output head next to the adapter when `target_modules` names `lm_head`
    (`save_embedding_layers="auto"`) and loads it back over the model's: it must be the checkpoint's own head."""
    sd = load_file(Path(ckpt) / WEIGHTS_FILENAME)
    head = sd.get(f"{_HEAD}.weight", sd.get("transformer.wte.weight"))
    low = tensor.dtype if tensor.element_size() <= head.element_size() else head.dtype  # compare as saved
    if head.shape != tensor.shape or not torch.equal(tensor.to(low), head.to(low)):
        raise ValueError(
            f"{weights!r} holds {key!r}, a copy of the output head that differs from the head of {ckpt!r} (PEFT "
            "saves one when target_modules names lm_head; it differs where the head was trained or resized): pass "
            "the --checkpoint_dir converted from the model the adapter was trained on, or merge the adapter into the "
            "base with PEFT (merge_and_unload) and convert that model with scripts/convert_hf_checkpoint.py."
        )


def _saved_modules(cfg: dict, config: Config, parameters: dict[str, torch.Size]) -> set[str]:
    """The transformers modules PEFT trains in full for `cfg`'s `modules_to_save` (`_save_matches`), among those
    holding the export's `parameters`; with `ensure_weight_tying` a head tied to the token embeddings goes with them
    (PEFT keeps one tensor for both)."""
    names = cfg.get("modules_to_save") or []
    model_type = config_to_hf(config)["model_type"]
    renamed = _renamed_modules(config)
    chosen = {m for m in _hf_modules(parameters)
              if any(_save_matches(n, m) or (m in renamed and _save_matches(n, renamed[m])) for n in names)}
    if chosen and config.tie_embeddings and cfg.get("ensure_weight_tying"):
        pair = {_hf_head(config, model_type), _hf_embedding(config, model_type)}
        if chosen & pair:
            chosen |= pair
    return chosen


def _inside(name: str, modules: set[str]) -> bool:
    """Whether the parameter `name` belongs to one of `modules` (or to a module inside one)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


# Phi-3's fused layers, and the layers they are apart: {fused: (the parts in row order)}
_PHI3_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
# the adapter tensors of one output row each (split with the rows); every other one acts on the inputs (copied)
_ROW_TENSORS = ("lora_B.weight", "lora_magnitude_vector")


# the fused expert parameters of transformers 5's mixtures (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts), each
# `(n_expert, out, in)`: PEFT's `target_parameters` LoRA on them is a ParamWrapper
_FUSED_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


def _fused_expert_parameters(names: Any) -> bool:
    """Whether `target_parameters` names only fused expert parameters (and at least one)."""
    return (isinstance(names, list) and bool(names)
            and all(isinstance(n, str) and n.endswith(_FUSED_EXPERT_PARAMETERS) for n in names))


def _split_fused_experts(tensors: dict[str, torch.Tensor], modules: dict[str, HFModule], config: Config,
                         weights: str, ckpt: str) -> set[str]:
    """LoRA on transformers 5's fused experts (PEFT's `target_parameters`, a `ParamWrapper` per parameter, nested
    when one module has two: `experts.lora_A`, `experts.base_layer.lora_A`, ...) as LoRA on each expert's layers of
    the checkpoint's export, where they are apart (`tensors` changed in place). A wrapper's `lora_A` is
    `(rank * n_expert, in)` with expert e's rows at `e * rank ...`, its `lora_B` `(out, rank * n_expert)` with
    expert e's columns at `e, e + n_expert, ...` (PEFT's `ParamWrapper.get_delta_weight`), and the update of
    expert e is `scaling * B_e A_e` on its `(out, in)` slice. Which parameter a wrapper adapts shows in its shapes:
    gate_up_proj takes n_embd inputs to twice the expert width (the gate's rows, then the up projection's: each
    part gets those rows of B_e and the same A_e), down_proj the expert width to n_embd. Returns the modules made."""
    made: set[str] = set()
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+\.experts)((?:\.base_layer)*)\.lora_(A|B)\.weight", key)
        if m is not None and config.n_expert:
            groups.setdefault((m[1], m[2]), {})[m[3]] = tensors.pop(key)
    n, width, n_embd = config.n_expert, config.expert_intermediate_size, config.n_embd
    for (path, nesting), pair in sorted(groups.items()):
        where = f"{PEFT_PREFIX}{path}{nesting}"
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights!r} has {where}.lora_{'A' if 'B' in pair else 'B'}.weight missing: the file is "
                             "incomplete; save the adapter again with PEFT.")
        A, B = pair["A"], pair["B"]
        shapes = (A.ndim == 2 and B.ndim == 2 and A.shape[0] % n == 0 and B.shape[1] == A.shape[0])
        kind = ("gate_up" if shapes and (A.shape[1], B.shape[0]) == (n_embd, 2 * width) else
                "down" if shapes and (A.shape[1], B.shape[0]) == (width, n_embd) else None)
        base = next((b for b in (path, path.replace(".mlp.experts", ".block_sparse_moe.experts"))
                     if f"{b}.0.gate_proj" in modules or f"{b}.0.w1" in modules), None)
        if kind is None or base is None:
            raise ValueError(
                f"{weights!r} adapts the fused experts {where!r} with lora_A {list(A.shape)} and lora_B "
                f"{list(B.shape)}, which fit neither gate_up_proj nor down_proj of the {n} experts of {ckpt!r}: the "
                "adapter was trained on another base model; pass the --checkpoint_dir converted from that model."
            )
        names = (("gate_proj", "up_proj", "down_proj") if f"{base}.0.gate_proj" in modules else ("w1", "w3", "w2"))
        parts = ([(names[0], slice(0, width)), (names[1], slice(width, 2 * width))] if kind == "gate_up"
                 else [(names[2], slice(None))])
        r = A.shape[0] // n
        A_e, B_e = A.reshape(n, r, A.shape[1]), B.reshape(B.shape[0], r, n)
        for e in range(n):
            for part, rows in parts:
                module = f"{base}.{e}.{part}"
                if f"{PEFT_PREFIX}{module}.lora_A.weight" in tensors:
                    raise ValueError(f"{weights!r} adapts {module!r} twice, as a module and in the fused experts "
                                     f"{where!r}: save the adapter again with PEFT.")
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A_e[e].clone()
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B_e[rows, :, e].clone()
                made.add(module)
    return made


def _split_phi3_fused(tensors: dict[str, torch.Tensor], modules: dict[str, HFModule]) -> dict[str, str]:
    """Adapters on Phi-3's fused qkv_proj and gate_up_proj (PEFT's usual Phi-3 targets) as adapters on the layers
    they fuse, where the checkpoint's export has those apart (`tensors` changed in place): the parts' rows of
    `lora_B` (and of DoRA's magnitudes) are the fused layer's rows, in order, and the transforms of the inputs
    (`lora_A`, `oft_R`, `hra_u`) are each part's too, so the parts compute what the fused layer computes. Returns
    {part: fused layer} of the modules made."""
    made = {}
    for key in [k for k in tensors if k.startswith(PEFT_PREFIX)]:
        for fused, parts in _PHI3_FUSED.items():
            head, sep, tail = key[len(PEFT_PREFIX):].partition(f".{fused}.")
            names = [f"{head}.{part}" for part in parts]
            if not sep or not all(n in modules for n in names):
                continue
            t = tensors.pop(key)
            sizes = [len(modules[n].rows) for n in names]
            pieces = t.split(sizes) if tail in _ROW_TENSORS else [t] * len(names)
            if tail in _ROW_TENSORS and t.shape[0] != sum(sizes):
                raise ValueError(f"{key} has {t.shape[0]} rows, but the {fused} it adapts has {sum(sizes)}: the "
                                 "adapter was trained on another base model; pass the --checkpoint_dir converted "
                                 "from that model.")
            for name, piece in zip(names, pieces):
                tensors[f"{PEFT_PREFIX}{name}.{tail}"] = piece.clone()
                made[name] = f"{head}.{fused}"
    return made


def _module_tensors(peft_dir: Path, cfg: dict, modules: dict[str, HFModule], ckpt: str,
                    parameters: dict[str, torch.Size], saved: set[str], renamed: dict[str, str], config: Config,
                    multimodal: bool = False) -> tuple[dict[str, dict], dict, dict[str, str]]:
    """The adapter tensors of `adapter_model.safetensors` by transformers module and part (`A`/`B`, `oft_R`,
    `hra_u`), checked against the modules of the checkpoint's export and the config's selection of them; and the
    tensors of the modules PEFT trains in full (`saved`: `_saved_modules`), by their names in the export, whose
    shapes `parameters` gives. Tensors under a module's transformers-5 name (`_RENAMED_MODULES`) count as the
    export's (`renamed`: new name -> that name). `multimodal`: the checkpoint is the text model of a multimodal
    Gemma 3, whose adapters name its modules inside the multimodal model (`_text_model_tensors`). Also returns
    {part: fused layer} of the adapters on Phi-3's fused layers it split (`_split_phi3_fused`). LoRA on a mixture's
    fused experts (`target_parameters`) becomes LoRA on each expert's layers (`_split_fused_experts`)."""
    kind = cfg["peft_type"]
    dora = kind == "LORA" and bool(cfg.get("use_dora"))
    pattern, parts = TENSOR_NAMES["DORA" if dora else kind]
    tensors = _read_peft_tensors(peft_dir)
    weights = str(peft_dir / PEFT_WEIGHTS_FILENAME)
    if multimodal:
        tensors = _text_model_tensors(tensors, weights)
    fused = _split_phi3_fused(tensors, modules)  # (a part is selected where its fused layer is)
    # (selected by target_parameters)
    experts = _split_fused_experts(tensors, modules, config, weights, ckpt) if cfg.get("target_parameters") else set()
    for new, old in renamed.items():
        for key in [k for k in tensors if k.startswith(f"{PEFT_PREFIX}{new}.")]:
            t, alias = tensors.pop(key), f"{PEFT_PREFIX}{old}.{key[len(PEFT_PREFIX) + len(new) + 1:]}"
            if alias in tensors and not torch.equal(tensors[alias], t):
                raise ValueError(f"{weights!r} holds {key!r} and {alias!r}, one module under its transformers 5 and "
                                 "4 names, with different values: keep the one the adapter was trained with.")
            tensors[alias] = t
    found: dict[str, dict[str, torch.Tensor]] = {}
    trained: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        copy = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.base_layer\.weight", key)
        if copy is not None and copy[1] in modules and modules[copy[1]].lit == _HEAD:
            _check_head_copy(key, t, weights, ckpt)
            continue
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(?:{pattern})", key)
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if m is None and _inside(name, saved):
            if name not in parameters:
                raise ValueError(f"{weights!r} holds {key!r} (modules_to_save), which the transformers export of "
                                 f"{ckpt!r} does not have: pass the --checkpoint_dir converted from the model the "
                                 "adapter was trained on.")
            if list(t.shape) != list(parameters[name]):
                raise ValueError(f"{key} in {weights!r} has shape {list(t.shape)}, but {ckpt!r}'s is "
                                 f"{list(parameters[name])}: the adapter was trained on another base model; pass the "
                                 "--checkpoint_dir converted from that model.")
            trained[name] = t
            continue
        if m is None:
            what = ("a DoRA magnitude, while use_dora is false" if "lora_magnitude_vector" in key else
                    "a LoRA on an embedding" if "lora_embedding" in key else
                    "an OFT on an embedding" if "oft_embedding_R" in key else
                    f"not a {kind} tensor of a linear layer")
            raise ValueError(f"{weights!r} holds {key!r} ({what}), which lit_gpt cannot load: merge the adapter "
                             "into the base with PEFT (merge_and_unload) instead.")
        found.setdefault(m[1], {})[next(g for g in m.groups()[1:] if g)] = t
    if not found:
        raise ValueError(f"{weights!r} holds no {kind} tensors: save the adapter again with PEFT.")
    for module, got in sorted(found.items()):
        if module not in modules and module.rsplit(".", 1)[-1] in ("qkv_proj", "gate_up_proj"):
            raise ValueError(
                f"{weights!r} adapts {module!r}, one of Phi-3's fused layers, which {ckpt!r} does not have: pass the "
                "--checkpoint_dir converted from the model the adapter was trained on."
            )
        if module not in modules:
            raise ValueError(
                f"{weights!r} adapts {module!r}, which the transformers export of {ckpt!r} does not have: pass the "
                "--checkpoint_dir converted from the model the adapter was trained on."
            )
        missing = next((part for part in parts if part not in got), None)
        if missing is not None:
            name = "lora_magnitude_vector" if missing == "magnitude" else f"lora_{missing}.weight"
            why = f", which {PEFT_CONFIG_FILENAME}'s use_dora=true needs" if missing == "magnitude" else ""
            raise ValueError(f"{weights!r} has no {PEFT_PREFIX}{module}.{name}{why}: the file is incomplete; save "
                             "the adapter again with PEFT.")
    head = next((m for m, info in modules.items() if info.lit == _HEAD), None)
    other_name = {old: new for new, old in renamed.items()}  # (selected under either of its transformers names)
    selected = {m for m in modules if peft_selects(cfg, m, head) or m in experts
                or (m in other_name and peft_selects(cfg, other_name[m], other_name[m]))
                or (multimodal and peft_selects(cfg, _multimodal_name(m), head))
                or (m in fused and peft_selects(cfg, fused[m], head))}
    for module in sorted(selected - set(found)):
        raise ValueError(f"{str(peft_dir / PEFT_CONFIG_FILENAME)!r} selects {module!r} (target_modules) but "
                         f"{weights!r} has no {kind} tensors for it: the folder is incomplete or from another base "
                         "model; copy the whole folder PEFT wrote.")
    for module in sorted(set(found) - selected):
        if _excluded_from_targets(module, cfg.get("modules_to_save") or []):
            raise ValueError(f"{weights!r} holds {kind} tensors for {module!r}, which {PEFT_CONFIG_FILENAME}'s "
                             "modules_to_save trains in full, so PEFT would not adapt it (a module is either adapted "
                             f"or trained in full): fix modules_to_save in {str(peft_dir / PEFT_CONFIG_FILENAME)!r}.")
        fields = ("target_modules" if cfg.get("layers_to_transform") in (None, []) else
                  "target_modules, layers_to_transform or layers_pattern")
        raise ValueError(f"{weights!r} holds {kind} tensors for {module!r}, which {PEFT_CONFIG_FILENAME} does not "
                         f"select, so PEFT would ignore them: fix {fields} in {str(peft_dir / PEFT_CONFIG_FILENAME)!r}.")
    # (a renamed module without tensors was named as the other transformers names it, which then selects nothing)
    saved = saved - {old for old in renamed.values() if not any(k.startswith(f"{old}.") for k in trained)}
    missing = next((k for k in sorted(parameters) if _inside(k, saved) and k not in trained), None)
    if missing is not None:
        module = missing.rpartition(".")[0]
        raise ValueError(f"{str(peft_dir / PEFT_CONFIG_FILENAME)!r} trains {module!r} in full beside the {kind} "
                         f"layers (modules_to_save) but {weights!r} has no {PEFT_PREFIX}{missing}: the folder is "
                         "incomplete or from another base model; copy the whole folder PEFT wrote.")
    return found, trained, fused


def _patterns_for_parts(cfg: dict, fused: dict[str, str]) -> dict:
    """`cfg` with `rank_pattern` / `alpha_pattern` giving each part of a split fused layer (`_split_phi3_fused`) the
    value its fused layer has (the parts' own names first, as PEFT takes the first matching key)."""
    out = dict(cfg)
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(field) or {}
        parts = {re.escape(part): _pattern_value(patterns, whole, None) for part, whole in fused.items()}
        if patterns:
            out[field] = {**{k: v for k, v in parts.items() if v is not None}, **patterns}
    return out


def _hit_slices(model: GPT, info: HFModule) -> list[tuple[str, int, int]]:
    """The `(slice, lo, hi)` of the lit layer that the rows of a transformers module come from."""
    layout = _slice_layout(model, info.lit, model.get_submodule(info.lit))
    return [(s, lo, hi) for s, lo, hi in layout if bool(((info.rows >= lo) & (info.rows < hi)).any())]


Slices = dict[tuple[str, str], dict[str, torch.Tensor]]  # (lit layer, slice) -> adapter tensor name -> tensor


def _lora_slices(cfg: dict, found: dict, modules: dict[str, HFModule], model: GPT, peft_dir: Path,
                 ckpt: str) -> tuple[Slices, dict]:
    """Per-slice LoRA factors and the `AdapterConfig` settings that compute what PEFT's LoRA computes."""
    weights = str(peft_dir / PEFT_WEIGHTS_FILENAME)
    slices: dict[tuple[str, str], _Factors] = {}
    source: dict[tuple[str, str], str] = {}  # the transformers module each slice's factors come from
    rslora = bool(cfg.get("use_rslora"))
    dora = bool(cfg.get("use_dora"))
    magnitudes: dict[tuple[str, str], torch.Tensor] = {}  # DoRA's, by lit slice
    for module, pair in sorted(found.items()):
        A, B = pair["A"], pair["B"]
        info = modules[module]
        prefix = f"{PEFT_PREFIX}{module}"
        mag = pair.get("magnitude")
        if mag is not None and list(mag.shape) != [len(info.rows)]:
            raise ValueError(
                f"{prefix}.lora_magnitude_vector in {weights!r} has shape {list(mag.shape)}, but the layer of "
                f"{ckpt!r} it adapts has {len(info.rows)} outputs: the adapter was trained on another base model; "
                "pass the --checkpoint_dir converted from that model."
            )
        if A.ndim != 2 or A.shape[1] != info.in_features:
            raise ValueError(
                f"{prefix}.lora_A.weight in {weights!r} has shape {list(A.shape)}, but the layer of {ckpt!r} it "
                f"adapts takes {info.in_features} inputs: the adapter was trained on another base model; pass the "
                "--checkpoint_dir converted from that model."
            )
        if B.ndim != 2 or list(B.shape) != [len(info.rows), A.shape[0]]:
            raise ValueError(
                f"{prefix}.lora_B.weight in {weights!r} has shape {list(B.shape)}, but the layer of {ckpt!r} it "
                f"adapts needs {[len(info.rows), A.shape[0]]}: the adapter was trained on another base model; pass the "
                "--checkpoint_dir converted from that model."
            )
        r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha_cfg = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if A.shape[0] != r_cfg:
            raise ValueError(f"{prefix}.lora_A.weight in {weights!r} has rank {A.shape[0]} but "
                             f"{PEFT_CONFIG_FILENAME} gives {module!r} r={r_cfg}: save the adapter again with PEFT.")
        scaling = alpha_cfg / (math.sqrt(r_cfg) if rslora else r_cfg)

        def alpha_of(rank: int, r_cfg=r_cfg, alpha_cfg=alpha_cfg) -> float:
            """Our alpha for a slice of `rank`: `alpha / rank` equals PEFT's scaling (rsLoRA's too)."""
            if rslora:
                return alpha_cfg * rank / math.sqrt(r_cfg)
            return float(alpha_cfg) if rank == r_cfg else alpha_cfg * rank / r_cfg

        hit = _hit_slices(model, info)
        if len(hit) == 1:
            s, lo, hi = hit[0]
            B_lit = torch.empty(hi - lo, B.shape[1], dtype=B.dtype)
            B_lit[info.rows - lo] = B
            slices[(info.lit, s)] = _Factors(A.clone(), B_lit, scaling, alpha_of(A.shape[0]))
            source[(info.lit, s)] = module
            if mag is not None:
                magnitudes[(info.lit, s)] = torch.empty(hi - lo, dtype=mag.dtype)
                magnitudes[(info.lit, s)][info.rows - lo] = mag
        else:
            n_out = model.get_submodule(info.lit).weight.shape[0]
            B_full = torch.zeros(n_out, B.shape[1], dtype=B.dtype)
            B_full[info.rows] = B
            # (DoRA rescales every row of the module, so every slice of it keeps its adapter: not the block form)
            for s, f in _split_fused(A, B_full, hit, scaling, alpha_of, block_form=not dora).items():
                slices[(info.lit, s)] = f
                source[(info.lit, s)] = module
            if mag is not None:
                m_full = torch.zeros(n_out, dtype=mag.dtype)
                m_full[info.rows] = mag
                for s, lo, hi in hit:
                    magnitudes[(info.lit, s)] = m_full[lo:hi].clone()
    r = max(f.A.shape[0] for f in slices.values())
    full = [f for f in slices.values() if f.A.shape[0] == r]
    common = Counter(round(f.scaling, 12) for f in full).most_common(1)[0][0]
    ref = next(f for f in full if math.isclose(f.scaling, common, rel_tol=1e-9))  # (its alpha as PEFT wrote it)
    scale, alpha = ref.scaling, ref.alpha
    uneven = [(k, f) for k, f in slices.items()
              if f.A.shape[0] != r or not math.isclose(f.scaling, scale, rel_tol=1e-9)]
    if uneven:
        # one r and alpha for every layer: a lower rank gets zero rows of A and zero columns of B (zero, they get
        # zero gradients and stay so in training), another scale goes into B
        for k, f in uneven:
            pad = r - f.A.shape[0]
            A = torch.cat([f.A, f.A.new_zeros(pad, f.A.shape[1])])
            B = torch.cat([f.B * (f.scaling / scale), f.B.new_zeros(f.B.shape[0], pad)], dim=1)
            slices[k] = _Factors(A, B, scale, alpha)
        k1, f1 = uneven[0]
        print(f"note: {str(peft_dir / PEFT_CONFIG_FILENAME)!r} gives its layers different LoRA ranks or scales "
              f"(rank_pattern/alpha_pattern; {source[k1]!r}: rank {f1.A.shape[0]}, scale {f1.scaling:g}), and a lit "
              f"adapter has one r and alpha: imported as rank {r}, scale {scale:g}, the lower ranks padded with "
              "zeros (which stay zero in training) and the other scales folded into B, so it computes what PEFT "
              "computes.", file=sys.stderr)
    settings = dict(method="lora", r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), dora=dora)
    tensors = {key: {"A": f.A, "B": f.B} for key, f in slices.items()}
    for key, mag in magnitudes.items():
        tensors[key]["magnitude"] = mag
    return tensors, settings


def _shape_error(name: str, weights: str, shape: list, ckpt: str, needs: str) -> ValueError:
    return ValueError(f"{name} in {weights!r} has shape {shape}, but {needs} for the layer of {ckpt!r} it adapts: "
                      "the adapter was trained on another base model; pass the --checkpoint_dir converted from that "
                      "model.")


def _blocking(sizes: dict[str, int], counts: dict[str, int], prefer_size: bool, where: str) -> dict:
    """`block_size=k` or `nb=n` for the imported layers' block sizes and counts (one of the two is uniform)."""
    if len(set(sizes.values())) == 1 and (prefer_size or len(set(counts.values())) > 1):
        return {"block_size": next(iter(sizes.values()))}
    return {"nb": _one_value(counts, "blocks", where, "r", "merge the adapter into the base with PEFT "
                             "(merge_and_unload) and convert that model with scripts/convert_hf_checkpoint.py")}


def _oft_slices(cfg: dict, found: dict, modules: dict[str, HFModule], model: GPT, peft_dir: Path,
                ckpt: str) -> tuple[Slices, dict]:
    """Per-slice OFT blocks (`R_upper`, the strict upper triangle: `2 q` for exact Cayley, `-2 q` for PEFT's
    Cayley-Neumann series, which builds the transposed rotation) and the settings that compute PEFT's OFT."""
    weights = str(peft_dir / PEFT_WEIGHTS_FILENAME)
    neumann = bool(cfg.get("use_cayley_neumann", True))
    terms = cfg.get("num_cayley_neumann_terms", 5)
    K = (2 if terms == 3 else terms - 2) if neumann else 0  # PEFT's 3-term series equals its 4-term one
    share = bool(cfg.get("block_share"))
    slices: Slices = {}
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for module, got in sorted(found.items()):
        q, info = got["oft_R"], modules[module]
        name, n = f"{PEFT_PREFIX}{module}.oft_R.weight", info.in_features
        m = q.shape[-1] if q.ndim == 2 else -1
        k = (1 + math.isqrt(1 + 8 * m)) // 2 if m > 0 else 0
        if q.ndim != 2 or k * (k - 1) // 2 != m or n % k:
            raise _shape_error(name, weights, list(q.shape), ckpt, f"its columns must be k(k-1)/2 for a block size "
                               f"k dividing the {n} inputs")
        if q.shape[0] != (1 if share else n // k):
            raise _shape_error(name, weights, list(q.shape), ckpt, f"{1 if share else n // k} rows of blocks of "
                               f"size {k} (block_share={share}) are needed")
        R_upper = q * 2 if K == 0 else q * -2
        for s, _, _ in _hit_slices(model, info):
            slices[(info.lit, s)] = {"input.R_upper": R_upper.clone()}
        sizes[module], counts[module] = k, n // k
    where = repr(str(peft_dir / PEFT_CONFIG_FILENAME))
    settings = dict(method="oft", upper_triangle=True, block_share=share, neumann_terms=K,
                    block_dropout=float(cfg.get("module_dropout") or 0.0),
                    **_blocking(sizes, counts, bool(cfg.get("oft_block_size")), where))
    if cfg.get("coft"):
        stored = 1 if share else _one_value(counts, "blocks", where, "COFT radius eps / sqrt(r)",
                                            "merge the adapter into the base with PEFT (merge_and_unload) instead")
        # PEFT's radius per block, computed as it computes it (a float32 tensor)
        settings.update(coft=True, eps=float(cfg["eps"] * 1 / torch.sqrt(torch.tensor(stored))))
    return slices, settings


def _hra_slices(cfg: dict, found: dict, modules: dict[str, HFModule], model: GPT, peft_dir: Path,
                ckpt: str) -> tuple[Slices, dict]:
    """ETHER vectors for an HRA whose `r` vectors per layer lie in `r` disjoint blocks of equal size (what an export
    of an ETHER adapter writes): their reflections commute and multiply to ETHER's block-diagonal one."""
    weights = str(peft_dir / PEFT_WEIGHTS_FILENAME)
    r = cfg["r"]
    merge = ("merge the adapter into the base with PEFT (merge_and_unload) and convert that model with "
             "scripts/convert_hf_checkpoint.py")
    slices: Slices = {}
    for module, got in sorted(found.items()):
        U, info = got["hra_u"], modules[module]
        name, n = f"{PEFT_PREFIX}{module}.hra_u", info.in_features
        if list(U.shape) != [n, r]:
            raise _shape_error(name, weights, list(U.shape), ckpt, f"[{n}, {r}] (inputs, r) is needed")
        if n % r:
            raise ValueError(f"{name} in {weights!r} has r={r} vectors for {n} inputs, which ETHER cannot split into "
                             f"{r} equal blocks: {merge}.")
        k = n // r
        u = torch.zeros(r, k, dtype=U.dtype)
        owner: dict[int, int] = {}
        for j in range(r):
            blocks = sorted(set((U[:, j].nonzero().flatten() // k).tolist()))
            if len(blocks) != 1 or blocks[0] in owner:
                what = ("is all zero" if not blocks else f"is nonzero in blocks {blocks[0]} and {blocks[1]}"
                        if len(blocks) > 1 else f"shares block {blocks[0]} with vector {owner[blocks[0]]}")
                raise ValueError(
                    f"{name} in {weights!r}: vector {j} {what} (blocks of {k} of the {n} inputs), so its "
                    "reflections are not ETHER's block-diagonal one (only HRA adapters whose r vectors lie in r "
                    f"disjoint equal blocks, as an ETHER export writes them, import): {merge}."
                )
            owner[blocks[0]] = j
            u[blocks[0]] = U[blocks[0] * k:(blocks[0] + 1) * k, j]
        for s, _, _ in _hit_slices(model, info):
            slices[(info.lit, s)] = {"input.u": u.clone()}
    return slices, dict(method="ether", nb=r)


def _train_modules_import(trained: dict[str, torch.Tensor], config: Config, model: GPT, peft_dir: Path,
                          ckpt: str) -> dict[str, torch.Tensor]:
    """The tensors of the modules PEFT trained in full (`_module_tensors`), by their names in the lit `model`. A
    head tied to the token embeddings is one tensor here: the head and the embeddings PEFT computes with must be
    equal."""
    if not trained:
        return {}
    weights = str(peft_dir / PEFT_WEIGHTS_FILENAME)
    merge = ("merge the adapter into the base with PEFT (merge_and_unload) and convert that model with "
             "scripts/convert_hf_checkpoint.py")
    model_type = config_to_hf(config)["model_type"]
    trained = dict(trained)
    lit_sd: dict[str, torch.Tensor] = {}
    if config.tie_embeddings:
        head, embed = f"{_hf_head(config, model_type)}.weight", f"{_hf_embedding(config, model_type)}.weight"
        got = {k: trained.pop(k) for k in (head, embed) if k in trained}
        if got:  # PEFT computes with the saved one(s), the base's tied weight for the other
            base = load_file(Path(ckpt) / WEIGHTS_FILENAME)["transformer.wte.weight"] if len(got) == 1 else None
            h, e = got.get(head, base), got.get(embed, base)
            low = h.dtype if h.element_size() <= e.element_size() else e.dtype
            if h.shape != e.shape or not torch.equal(h.to(low), e.to(low)):
                what = (f"{head!r} and {embed!r} as two tensors that differ" if len(got) == 2 else
                        f"{next(iter(got))!r} but not {embed if head in got else head!r}, which then differ")
                raise ValueError(
                    f"{weights!r} trains {what} (modules_to_save), while {ckpt!r} ties the output head to the token "
                    "embeddings, one tensor in lit_gpt: retrain with ensure_weight_tying=true (PEFT then trains them "
                    f"as one), or {merge}."
                )
            lit_sd[f"{_HEAD}.weight"] = got.get(embed, got.get(head))
    covered: set[str] = set()
    for name, t in model.state_dict().items():  # (meta tensors: only the names are converted)
        keys = [k for k, _ in iter_lit_to_hf([(name, t)], config, model_type)]
        if model_type == "phi" and name != "lm_head.bias":
            keys = [k for k in keys if k != "lm_head.bias"]  # the zero bias a Phi export adds, not this tensor
        have = [k for k in keys if k in trained]
        if have and len(have) < len(keys):
            missing = next(k for k in keys if k not in trained)
            raise ValueError(
                f"{weights!r} trains {have[0]!r} in full (modules_to_save) but not {missing!r}, which lit_gpt holds in "
                f"one tensor with it ({name!r}): retrain with both in modules_to_save, or {merge}."
            )
        covered.update(have)
    for key in sorted(set(trained) - covered):
        if not bool(trained[key].count_nonzero()):
            continue  # a Phi head's bias as the export wrote it (zero), which a bias-free lit head computes
        raise ValueError(f"{weights!r} trains {key!r} (modules_to_save), which {ckpt!r} has no tensor for (a trained "
                         f"output bias): {merge}.")
    try:
        lit_sd.update(iter_hf_to_lit([(k, trained[k]) for k in sorted(covered)], config))
    except ConversionError as e:  # (every tensor above has its lit name: a bug, not the user's file)
        raise RuntimeError(f"_train_modules_import: {e}") from None
    return lit_sd


def _train_module_list(model: GPT, trained: dict[str, torch.Tensor], **adapter_config) -> list[str]:
    """`AdapterConfig.train_modules` for the lit tensors `trained`: the GPT's named ones (`head`, `embeddings`,
    `norms`) where they are whole, module names for the rest."""
    rest = {k.rpartition(".")[0] for k in trained}
    names = []
    for named in GPT_TRAIN_MODULES if rest else ():
        hits = set(train_module_names(model, AdapterConfig(**adapter_config, train_modules=[named])))
        if hits <= rest:
            names.append(named)
            rest -= hits
    return names + sorted(rest)


def peft_adapter_payload(peft_dir: Union[str, Path], checkpoint_dir: Union[str, Path],
                         prompt_style: Optional[str] = None, system_prompt: Optional[str] = None) -> dict:
    """The PEFT folder `peft_dir` (LoRA, OFT, or HRA as an ETHER export writes it) as a lit adapter dict for the lit
    checkpoint `checkpoint_dir` (converted from the transformers model the adapter was trained on), in memory: what
    `import_peft_adapter` writes to a file, which `load_adapters` and `lit_gpt.merge` take as they take that file.
    The adapted lit model computes the logits `PeftModel` computes. `prompt_style` (e.g. `alpaca`) and
    `system_prompt` are stored in the dict for chat and merge (default: the `prompt_style.yaml` an export wrote
    beside the adapter, if any). `modules_to_save` becomes `train_modules`, its tensors under the lit names.
    Refuses, in one sentence, what a lit adapter cannot compute (trained biases, HRA vectors that are not in disjoint
    blocks, a tied head trained apart from the embeddings, part of a fused q/k/v trained in full, ...) and tensors
    whose shapes do not fit the checkpoint."""
    peft_dir = _check_peft_dir(peft_dir)
    style = _import_style(peft_dir, prompt_style, system_prompt)
    cfg = read_peft_config(peft_dir)
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    ckpt = str(checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    modules = hf_linear_modules(config)
    parameters = hf_parameters(config)
    renamed = {new: old for old, new in _renamed_modules(config).items()}
    found, trained, fused = _module_tensors(peft_dir, cfg, modules, ckpt, parameters,
                                            _saved_modules(cfg, config, parameters), renamed, config,
                                            multimodal=config_to_hf(config)["model_type"] == "gemma3_text")
    cfg = _patterns_for_parts(cfg, fused)
    with torch.device("meta"):
        model = GPT(config)
    read = {"LORA": _lora_slices, "OFT": _oft_slices, "HRA": _hra_slices}[cfg["peft_type"]]
    slices, settings = read(cfg, found, modules, model, peft_dir, ckpt)
    if config.tie_embeddings and any(layer == _HEAD for layer, _ in slices):
        head = next(m for m, info in modules.items() if info.lit == _HEAD)
        raise ValueError(
            f"{str(peft_dir / PEFT_WEIGHTS_FILENAME)!r} adapts {head!r}, whose weight {ckpt!r} ties to the token "
            "embeddings, and a lit adapter on a tied head could not be merged back: retrain without it in "
            "target_modules, or merge the adapter into the base with PEFT (merge_and_unload) and convert that model "
            "with scripts/convert_hf_checkpoint.py."
        )
    targets, layers = _targets(set(slices), config, model, repr(str(peft_dir)))
    trained = _train_modules_import(trained, config, model, peft_dir, ckpt)
    train_modules = _train_module_list(model, trained, targets=targets, layers=layers, **settings)
    apply_adapters(model, AdapterConfig(targets=targets, train_modules=train_modules, layers=layers, **settings))
    state_dict = dict(trained)
    for name, layer in adapted_layers(model):
        for s in layer.adapters:
            for key, tensor in slices.pop((name, s)).items():
                state_dict[f"{name}.adapters.{s}.{key}"] = tensor
    if slices:  # the targets above are built to place every slice: a bug, not the user's file
        raise RuntimeError(f"peft_adapter_payload: targets {targets} left {sorted(slices)[:2]} unplaced.")
    peft_base = cfg.get("base_model_name_or_path")
    exported = isinstance(peft_base, str) and peft_base.rstrip("/").endswith(BASE_EXPORT_SUFFIX)  # our export's base
    if isinstance(peft_base, str) and peft_base and config.name and not exported and \
            peft_base.rstrip("/").split("/")[-1] != config.name:
        print(f"warning: {PEFT_CONFIG_FILENAME} says the adapter was trained on {peft_base!r}, and {ckpt!r} is "
              f"{config.name!r}; the shapes fit, so it is converted for that model as asked.", file=sys.stderr)
    return adapter_payload(model, state_dict=state_dict, prompt_style=style)


def import_peft_adapter(peft_dir: Union[str, Path], checkpoint_dir: Union[str, Path],
                        adapter_path: Union[str, Path], prompt_style: Optional[str] = None,
                        system_prompt: Optional[str] = None) -> Path:
    """Write the PEFT folder `peft_dir` as a lit adapter file `adapter_path` (`.pth` or `.safetensors`) for the
    lit checkpoint `checkpoint_dir`: the dict `peft_adapter_payload` converts (see it for the arguments and what
    is refused), which `lit_gpt.merge` (scripts/merge_lora.py, scripts/merge_ether.py, chat, generate, eval) then
    takes like a file finetune/ wrote. Those also take `peft_dir` itself, converting it in memory each time."""
    _check_peft_dir(peft_dir)
    adapter_path = _check_adapter_path(adapter_path)  # before the conversion reads anything
    payload = peft_adapter_payload(peft_dir, checkpoint_dir, prompt_style=prompt_style, system_prompt=system_prompt)
    return write_adapter_file(payload, adapter_path)


__all__ = [
    "HFModule",
    "base_export_dir",
    "PEFT_CONFIG_FILENAME",
    "PEFT_WEIGHTS_FILENAME",
    "export_peft_adapter",
    "hf_linear_modules",
    "import_peft_adapter",
    "peft_adapter_payload",
    "peft_selects",
    "read_peft_config",
]
