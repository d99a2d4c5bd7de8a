"""LoRA adapters in Hugging Face PEFT's format, both ways, for a `lit_gpt.GPT` and its transformers export.

A PEFT LoRA folder (what `PeftModel.save_pretrained` writes) holds `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors`, whose tensors are named after the transformers modules they adapt:
`base_model.model.<module>.lora_A.weight` `(r, in)` and `...lora_B.weight` `(out, r)`, the update being
`scaling * B A x` with `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and
`alpha_pattern` override `r` and `lora_alpha` per module). The rows of `B` are the module's output rows, laid out as
the rows of its bias, so `lit_gpt.convert_hf.iter_lit_to_hf` (applied to row numbers, as if they were a bias) says
which lit rows each transformers module's rows are: one name table for weights and adapters.

Our LoRA on the fused QKV projection has one `A`/`B` per slice (query, key, value). Where transformers splits the
projection (llama, mistral, qwen2, phi: q_proj/k_proj/v_proj) each slice is one PEFT module. Where it keeps it
fused (GPT-2's `c_attn`, GPT-NeoX's interleaved `query_key_value`) PEFT has one `A` for the whole layer; both
directions are exact:

* export: slices with one shared `A` (an import of a PEFT adapter) give that `A` and the slices' `B` rows; slices
  with their own `A` give the block form, rank `k r` for `k` adapted slices: `A = [A_q; A_v]`, `B` block-diagonal,
  `lora_alpha = k alpha` (same scaling), written as that module's `rank_pattern`/`alpha_pattern` entry;
* import: the block form (every column of `B` non-zero in one slice only, as many columns per slice) comes back as
  per-slice adapters of rank `r`, anything else as every slice with the whole `A` and its rows of `B`.

Reading never runs pickled code: `adapter_model.safetensors` only (an `adapter_model.bin` is refused).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch

from lit_gpt.adapters.base import _slice_layout, adapted_layers, adapter_config_of, apply_adapters, is_adaptable
from lit_gpt.adapters.config import AdapterConfig
from lit_gpt.adapters.state import SAFETENSORS_SUFFIX, load_adapters, save_adapters
from lit_gpt.config import Config
from lit_gpt.convert_hf import config_to_hf, iter_lit_to_hf
from lit_gpt.model import GPT
from lit_gpt.utils import atomic_paths, check_checkpoint_dir, check_output_dir, load_file, read_json_object

PEFT_CONFIG_FILENAME = "adapter_config.json"
PEFT_WEIGHTS_FILENAME = "adapter_model.safetensors"
PEFT_PICKLE_FILENAME = "adapter_model.bin"
# `PeftModel.save_pretrained` names every tensor after the wrapped model's module, under this prefix
PEFT_PREFIX = "base_model.model."
ADAPTER_SUFFIXES = (".pth", SAFETENSORS_SUFFIX)
# LoraConfig settings (set: truthy) that make the adapter compute something else than `W x + scaling B A x` on the
# plain base weights, or that train other tensors as well: an import refuses them, saying what they are
UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (a learned magnitude vector on top of LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained modules besides the LoRA layers",
    "trainable_token_indices": "trained rows of the embedding",
    "layer_replication": "duplicated layers",
    "target_parameters": "LoRA on parameters instead of linear modules",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which is active only after its invocation tokens",
    "use_qalora": "QALoRA (a pooled input to lora_A)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa_config": "KaSA (a learned diagonal of singular values)",
    "monteclora_config": "MonteCLoRA (sampled LoRA weights)",
    "arrow_config": "Arrow routing between several LoRAs",
}
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
        # B's rows are laid out as a bias's: the conversion moves row numbers as it moves a bias
        for key, rows in iter_lit_to_hf([(f"{name}.bias", torch.arange(out_features))], config, model_type):
            hf_module = key.rpartition(".")[0]
            if name != _HEAD and hf_module in ("lm_head", "embed_out"):
                continue  # the zero output bias a Phi export adds, not this layer's
            modules[hf_module] = HFModule(name, rows, in_features)
    return modules


def _base_model_name(config: Config) -> Optional[str]:
    """The Hub name of the model `config` was converted from (`org/name`), None where it is not known."""
    org, name = config.hf_config.get("org"), config.hf_config.get("name")
    return f"{org}/{name}" if org and name else None


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


# ---------------------------------------------------------------------------------------------- export
def _export_factors(layer, rows: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, int, float]]:
    """`(A, B, rank, lora_alpha)` of the transformers module whose rows are the lit `rows` of the adapted `layer`
    (`B`'s rows in the transformers order), or None where none of those rows carries an adapter."""
    covered = [(lo, hi, layer.adapters[s] if s in layer.adapters else None) for s, lo, hi in layer.slices
               if bool(((rows >= lo) & (rows < hi)).any())]
    adapted = [(lo, hi, ad) for lo, hi, ad in covered if ad is not None]
    if not adapted:
        return None
    first = adapted[0][2]
    r, alpha = first.r, first.alpha
    if len(adapted) == len(covered) and all(torch.equal(ad.A, first.A) for _, _, ad in adapted):
        A, B = first.A.detach(), torch.zeros(layer.out_features, r, dtype=first.B.dtype)
        for lo, hi, ad in adapted:
            B[lo:hi] = ad.B.detach()
    else:  # one A per slice: the block form, rank k r with k times the alpha (the same scale)
        k = len(adapted)
        A = torch.cat([ad.A.detach() for _, _, ad in adapted])
        B = torch.zeros(layer.out_features, k * r, dtype=first.B.dtype)
        for i, (lo, hi, ad) in enumerate(adapted):
            B[lo:hi, i * r:(i + 1) * r] = ad.B.detach()
        r, alpha = k * r, k * alpha
    return A.clone(), B[rows].contiguous(), r, alpha


def _number(x: float) -> Union[int, float]:
    """An integral float as an int, as PEFT's own configs write `lora_alpha`."""
    return int(x) if float(x).is_integer() else float(x)


def export_peft_lora(adapter_path: Union[str, Path], checkpoint_dir: Union[str, Path],
                     output_dir: Union[str, Path]) -> Path:
    """Write the LoRA adapter file `adapter_path` (`.pth` or `.safetensors`, as `save_adapters` writes it) as a PEFT
    adapter folder in `output_dir`: `adapter_config.json` and `adapter_model.safetensors`, which
    `PeftModel.from_pretrained(<the transformers export of checkpoint_dir>, output_dir)` loads into a model that
    computes the same logits as the adapted lit model. Refuses, in one sentence, adapters of other methods
    (PEFT has no ETHER: merge them instead) and an adapter trained on another base model."""
    from lit_gpt.merge import check_same_base, read_finetuned

    finetuned = read_finetuned(adapter_path)
    where = str(finetuned.path)
    if finetuned.kind != "adapter":
        raise ValueError(
            f"{where!r} holds full fine-tuning weights, not an adapter: export the whole model with "
            "scripts/convert_lit_checkpoint.py instead."
        )
    if finetuned.method != "lora":
        raise ValueError(
            f"{where!r} holds {finetuned.method} adapters, which PEFT's LoRA format cannot hold (PEFT has no "
            f"ETHER, and its OFT is parametrised differently): merge it with scripts/merge_ether.py and export the "
            "merged checkpoint with scripts/convert_lit_checkpoint.py."
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
    load_adapters(model, finetuned.payload)  # the adapter tensors replace their meta placeholders
    adapter_config = adapter_config_of(model)
    saved = finetuned.payload["state_dict"]
    dtype = next((v.dtype for v in saved.values() if v.is_floating_point()), torch.float32)

    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, float]] = {}  # transformers module -> (rank, lora_alpha)
    for name, layer in adapted_layers(model):
        for hf_module, module in modules.items():
            if module.lit != name:
                continue
            factors = _export_factors(layer, module.rows)
            if factors is None:
                continue
            A, B, r, alpha = factors
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = A.to(dtype)
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = B.to(dtype)
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
    model_type = config_to_hf(config)["model_type"]
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_model_name(config),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": _module_names(adapted, set(modules)),
        "lora_dropout": adapter_config.dropout,
        "bias": "none",
        "fan_in_fan_out": model_type == "gpt2",  # GPT-2's Conv1D layers store their weight as (in, out)
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    # the config first: without it PEFT reads nothing, so an interrupted write never leaves a loadable mix
    with atomic_paths(output_dir / PEFT_CONFIG_FILENAME, output_dir / PEFT_WEIGHTS_FILENAME) as (cfg_tmp, st_tmp):
        cfg_tmp.write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(st_tmp), metadata={"format": "pt"})
    return output_dir


# ---------------------------------------------------------------------------------------------- import
def read_peft_config(peft_dir: Path) -> dict:
    """The `adapter_config.json` of a PEFT LoRA folder, refusing in one sentence what a lit LoRA cannot compute."""
    path = peft_dir / PEFT_CONFIG_FILENAME
    cfg = read_json_object(path, "save the adapter again with PEFT", holds="a PEFT LoraConfig")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{str(path)!r} is a {peft_type} adapter (peft_type), but only LORA adapters convert to lit_gpt: merge "
            "it into the base with PEFT (merge_and_unload) and convert that model with "
            "scripts/convert_hf_checkpoint.py."
        )
    fix = ("retrain without it, or merge the adapter into the base with PEFT (merge_and_unload) and convert that "
           "model with scripts/convert_hf_checkpoint.py")
    if cfg.get("bias", "none") != "none":
        raise ValueError(
            f"{str(path)!r} sets bias={cfg['bias']!r}, which trains the base model's biases, while a lit LoRA "
            f"adapter holds only A and B: {fix}."
        )
    for key, what in UNSUPPORTED_SETTINGS.items():
        if cfg.get(key):
            raise ValueError(f"{str(path)!r} sets {key}={cfg[key]!r}, {what}, which lit_gpt's LoRA does not "
                             f"implement: {fix}.")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"{str(path)!r} sets init_lora_weights={cfg['init_lora_weights']!r}, which rewrites the base weights, so "
            "the adapter only fits that changed base: save it again with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) so it applies to the original base model."
        )
    if cfg.get("target_modules") is None:
        raise ValueError(f"{str(path)!r} has no target_modules: save the adapter again with PEFT.")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ValueError(f"{str(path)!r} has no positive number {key} (got {cfg.get(key)!r}): save it again.")
    return cfg


def peft_selects(cfg: dict, module: str, output_head: str) -> bool:
    """Whether PEFT puts a LoRA layer on the linear `module` (its name in the transformers model) for `cfg`: its
    `exclude_modules`, `target_modules` (a list of names, a regex string, or `all-linear`) and `layers_to_transform`
    / `layers_pattern`, as `peft.tuners.tuners_utils.check_target_module_exists` reads them."""
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
                 alpha_of) -> dict[str, _Factors]:
    """One transformers LoRA on a whole fused QKV layer (`B_full` in lit row order) as per-slice factors: the block
    form back as rank-`r` slices where it is one (see the module docstring), else every slice with all of `A`."""
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


def _targets(adapted: set[tuple[str, str]], config: Config, model: GPT, where: str) -> list[str]:
    """`AdapterConfig.targets` that adapt exactly the `(lit layer, slice)` pairs of `adapted` in `model`: the GPT's
    named targets where a kind of layer is adapted on every block, module names for the other linear layers."""
    n = config.n_layer
    qkv = [frozenset(s for layer, s in adapted if layer == f"transformer.h.{i}.{_ATTN}") for i in range(n)]
    if len(set(qkv)) > 1:
        which = sorted({i for i in range(n) if qkv[i] != qkv[0]} | {0})
        raise ValueError(
            f"{where} adapts the attention's query/key/value projections on some layers only (layers "
            f"{', '.join(map(str, which[:4]))}{' …' if len(which) > 4 else ''} differ: layers_to_transform or "
            "per-layer target_modules), which lit_gpt's fused QKV layer cannot express: adapt q/k/v on every layer, "
            "or merge the adapter into the base with PEFT (merge_and_unload)."
        )
    targets = [s for s in ("query", "key", "value") if s in qkv[0]]
    layers = {layer for layer, _ in adapted if not layer.endswith(_ATTN)}
    proj = [f"transformer.h.{i}.{_PROJ}" for i in range(n)]
    if all(p in layers for p in proj):
        targets.append("projection")
        layers -= set(proj)
    mlp = [f"transformer.h.{i}.mlp.{child}" for i in range(n)
           for child, m in model.transformer.h[i].mlp.named_children() if is_adaptable(m)]
    if all(m in layers for m in mlp):
        targets.append("mlp")
        layers -= set(mlp)
    if _HEAD in layers:
        targets.append("head")
        layers.discard(_HEAD)
    return targets + sorted(layers)


def import_peft_lora(peft_dir: Union[str, Path], checkpoint_dir: Union[str, Path], adapter_path: Union[str, Path],
                     prompt_style: Optional[str] = None) -> Path:
    """Write the PEFT LoRA folder `peft_dir` as a lit adapter file `adapter_path` (`.pth` or `.safetensors`) for the
    lit checkpoint `checkpoint_dir` (converted from the transformers model the adapter was trained on), which
    `lit_gpt.merge` (scripts/merge_lora.py, chat, eval) takes like a file finetune/lora.py wrote; the adapted lit
    model computes the logits `PeftModel` computes. `prompt_style` (e.g. `alpaca`) is stored in the file for chat
    and merge. Refuses, in one sentence, what a lit LoRA cannot compute (DoRA, trained biases or modules, differing
    ranks or scales per layer, ...) and tensors whose shapes do not fit the checkpoint."""
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
    adapter_path = Path(adapter_path)
    if adapter_path.suffix not in ADAPTER_SUFFIXES:
        raise ValueError(f"--adapter_path {str(adapter_path)!r} must end in .pth or .safetensors (the two adapter "
                         "file formats lit_gpt reads).")
    check_output_dir(adapter_path.parent, "--adapter_path's folder")
    if adapter_path.is_dir():
        raise ValueError(f"--adapter_path {str(adapter_path)!r} is a folder: pass a file name ending in .pth or "
                         ".safetensors.")
    style = None
    if prompt_style is not None:
        from lit_gpt.data.prompts import PROMPT_STYLE_NAMES

        if prompt_style not in PROMPT_STYLE_NAMES:
            raise ValueError(f"--prompt_style {prompt_style!r} is not one of {', '.join(PROMPT_STYLE_NAMES)}.")
        style = {"prompt_style": prompt_style, "system_prompt": None}
    cfg = read_peft_config(peft_dir)
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    modules = hf_linear_modules(config)
    head = next((m for m, info in modules.items() if info.lit == _HEAD), None)
    tensors = _read_peft_tensors(peft_dir)
    weights = str(peft_dir / PEFT_WEIGHTS_FILENAME)
    ckpt = str(checkpoint_dir)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if m is None:
            kind = ("a DoRA magnitude" if "lora_magnitude_vector" in key else
                    "a LoRA on an embedding" if "lora_embedding" in key else "not a LoRA factor of a linear layer")
            raise ValueError(f"{weights!r} holds {key!r} ({kind}), which lit_gpt's LoRA cannot load: merge the "
                             "adapter into the base with PEFT (merge_and_unload) instead.")
        factors.setdefault(m[1], {})[m[2]] = t
    if not factors:
        raise ValueError(f"{weights!r} holds no LoRA tensors: save the adapter again with PEFT.")
    for module, pair in sorted(factors.items()):
        if module not in modules:
            raise ValueError(
                f"{weights!r} adapts {module!r}, which the transformers export of {ckpt!r} does not have: pass the "
                "--checkpoint_dir converted from the model the adapter was trained on."
            )
        missing = "A" if "A" not in pair else "B" if "B" not in pair else None
        if missing is not None:
            raise ValueError(f"{weights!r} has no {PEFT_PREFIX}{module}.lora_{missing}.weight: the file is "
                             "incomplete; save the adapter again with PEFT.")
    selected = {m for m in modules if peft_selects(cfg, m, head)}
    for module in sorted(selected - set(factors)):
        raise ValueError(f"{str(peft_dir / PEFT_CONFIG_FILENAME)!r} selects {module!r} (target_modules) but "
                         f"{weights!r} has no LoRA tensors for it: the folder is incomplete or from another base "
                         "model; copy the whole folder PEFT wrote.")
    for module in sorted(set(factors) - selected):
        raise ValueError(f"{weights!r} holds LoRA tensors for {module!r}, which {PEFT_CONFIG_FILENAME}'s "
                         "target_modules do not select, so PEFT would ignore them: fix target_modules in "
                         f"{str(peft_dir / PEFT_CONFIG_FILENAME)!r}.")

    with torch.device("meta"):
        model = GPT(config)
    slices: dict[tuple[str, str], _Factors] = {}
    source: dict[tuple[str, str], str] = {}  # the transformers module each slice's factors come from
    rslora = bool(cfg.get("use_rslora"))
    for module, pair in sorted(factors.items()):
        A, B = pair["A"], pair["B"]
        info = modules[module]
        prefix = f"{PEFT_PREFIX}{module}"
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

        layout = _slice_layout(model, info.lit, model.get_submodule(info.lit))
        hit = [(s, lo, hi) for s, lo, hi in layout if bool(((info.rows >= lo) & (info.rows < hi)).any())]
        if len(hit) == 1:
            s, lo, hi = hit[0]
            B_lit = torch.empty(hi - lo, B.shape[1], dtype=B.dtype)
            B_lit[info.rows - lo] = B
            slices[(info.lit, s)] = _Factors(A.clone(), B_lit, scaling, alpha_of(A.shape[0]))
            source[(info.lit, s)] = module
        else:
            n_out = model.get_submodule(info.lit).weight.shape[0]
            B_full = torch.zeros(n_out, B.shape[1], dtype=B.dtype)
            B_full[info.rows] = B
            for s, f in _split_fused(A, B_full, hit, scaling, alpha_of).items():
                slices[(info.lit, s)] = f
                source[(info.lit, s)] = module
    ranks = Counter(f.A.shape[0] for f in slices.values())
    scalings = [f.scaling for f in slices.values()]
    if len(ranks) > 1 or any(not math.isclose(s, scalings[0], rel_tol=1e-6) for s in scalings):
        k1, f1 = next(iter(slices.items()))
        k2, f2 = next((k, f) for k, f in slices.items()
                      if f.A.shape[0] != f1.A.shape[0] or not math.isclose(f.scaling, f1.scaling, rel_tol=1e-6))
        raise ValueError(
            f"{str(peft_dir / PEFT_CONFIG_FILENAME)!r} gives its layers different LoRA ranks or scales "
            f"(rank_pattern/alpha_pattern: rank {f1.A.shape[0]}, scale {f1.scaling:g} on {source[k1]!r} but rank "
            f"{f2.A.shape[0]}, scale {f2.scaling:g} on {source[k2]!r}), while a lit adapter has one r and alpha for "
            "all layers: merge it into the base with PEFT (merge_and_unload) instead."
        )
    rank = next(iter(ranks))
    alpha = next(iter(slices.values())).alpha
    where = repr(str(peft_dir))
    targets = _targets(set(slices), config, model, where)
    adapter_config = AdapterConfig(method="lora", r=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                                   targets=targets)
    apply_adapters(model, adapter_config)
    state_dict = {}
    for name, layer in adapted_layers(model):
        for s in layer.adapters:
            f = slices.pop((name, s))
            state_dict[f"{name}.adapters.{s}.A"] = f.A
            state_dict[f"{name}.adapters.{s}.B"] = f.B
    if slices:  # the targets above are built to place every slice: a bug, not the user's file
        raise RuntimeError(f"import_peft_lora: targets {targets} left {sorted(slices)[:2]} unplaced.")
    peft_base = cfg.get("base_model_name_or_path")
    if isinstance(peft_base, str) and peft_base and config.name and \
            peft_base.rstrip("/").split("/")[-1] != config.name:
        print(f"warning: {PEFT_CONFIG_FILENAME} says the adapter was trained on {peft_base!r}, and {ckpt!r} is "
              f"{config.name!r}; the shapes fit, so it is converted for that model as asked.", file=sys.stderr)
    return save_adapters(model, adapter_path, state_dict=state_dict, prompt_style=style)


__all__ = [
    "HFModule",
    "PEFT_CONFIG_FILENAME",
    "PEFT_WEIGHTS_FILENAME",
    "export_peft_lora",
    "hf_linear_modules",
    "import_peft_lora",
    "peft_selects",
    "read_peft_config",
]
