"""Adapter files: only the adapter tensors, plus the config and the base shapes they were trained on.

A `.pth` file is a plain dict that `torch.load(weights_only=True)` reads without running pickled code::

    {"format": "lit_gpt.adapters", "version": 1,
     "adapter_config": {...AdapterConfig.to_dict()...},
     "base_model": "Llama-2-7b-hf" or None,
     "base_shapes": {"transformer.h.0.attn.qkv.weight": [out, in], ...},
     "state_dict": {"transformer.h.0.attn.qkv.adapters.query.input.u": tensor, ...},
     "prompt_style": {"prompt_style": "alpaca", "system_prompt": None}}   # optional; absent in older files

A `.safetensors` file (PEFT's `adapter_model.safetensors`) holds the same: the `state_dict` tensors under the same
names, and every other entry in the file's metadata under its key, as JSON text (`"version": "1"`,
`"adapter_config": "{\"method\": \"ether\", ...}"`). Both are read by `load_adapters`, `read_adapter_config` and
`load_adapter_file`, the reader `lit_gpt.merge` (so merge, chat and eval) uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from lit_gpt.adapters.base import (
    adapted_layers, adapter_config_of, build_adapters, install_adapters, parameter_names, train_module_names,
    trained_module_state_dict, trained_modules,
)
from lit_gpt.adapters.config import AdapterConfig, blocks_phrase, setting
from lit_gpt.utils import atomic_path, atomic_save, load_file

# what PEFT's save_pretrained writes (`lit_gpt.adapters.peft_format` converts it): this config file beside the
# weights file, whose tensors are named after the wrapped model's modules under this prefix
PEFT_CONFIG_FILENAME = "adapter_config.json"
PEFT_WEIGHTS_FILENAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

FORMAT = "lit_gpt.adapters"
VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"
# the entries of a `.safetensors` adapter file's metadata (JSON text each); its tensors are the `state_dict`
METADATA_KEYS = ("format", "version", "adapter_config", "base_model", "base_shapes", "prompt_style")
# the key prefixes wrappers add to a model's names: DDP / DataParallel / FSDP1 (`module.`), torch.compile (`_orig_mod.`)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# settings that do not change what the adapters compute in eval mode (regularisers of training, which a resumed run
# may change too: `lit_gpt.training`): loading keeps the model's own
REGULARISERS = ("dropout", "block_dropout")
BLOCK_FIELDS = ("nb", "block_size", "flip_side", "block_dropout")
OFT_FIELDS = ("coft", "eps", "block_share", "neumann_terms", "upper_triangle")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, and the parameters of the modules trained in full (`AdapterConfig.train_modules`), under
    their names in `model.state_dict()`."""
    sd = {}
    for name, layer in adapted_layers(model):
        prefix = f"{name}.adapters." if name else "adapters."
        for key, value in layer.adapters.state_dict().items():
            sd[prefix + key] = value
    sd.update(trained_module_state_dict(model))
    return sd


def _aliases(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Every name of the parameters called `names` (a weight tied to another module has two)."""
    wanted = set(names)
    buffers = wanted & {n for n, _ in model.named_buffers()}  # (an adapter's buffers: PiSSA's starting factors)
    return buffers | {n for group in parameter_names(model).values() if wanted.intersection(group) for n in group}


def _base_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The stored shape of every adapted layer's weight (`(in, out)` for a `Conv1D`), by parameter name."""
    return {f"{name}.weight": list(layer.stored_shape()) for name, layer in adapted_layers(model)}


def _base_model_name(model: nn.Module) -> Optional[str]:
    name = getattr(getattr(model, "config", None), "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _prompt_style_record(prompt_style: Optional[dict]) -> Optional[dict]:
    if prompt_style is None:
        return None
    name = prompt_style.get("prompt_style") if isinstance(prompt_style, dict) else None
    system_prompt = prompt_style.get("system_prompt") if isinstance(prompt_style, dict) else None
    if not isinstance(name, str) or not isinstance(system_prompt, (str, type(None))):
        raise ValueError(
            "save_adapters: prompt_style must be a mapping such as {'prompt_style': 'alpaca', 'system_prompt': None} "
            f"(what the run records in hyperparameters.yaml), got {prompt_style!r}."
        )
    return {"prompt_style": name, "system_prompt": system_prompt}


def adapter_payload(
    model: nn.Module,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    prompt_style: Optional[dict] = None,
) -> dict:
    """The adapter dict `save_adapters` writes for `model` (the `.pth` layout of the module docstring), in memory:
    `load_adapters` and `lit_gpt.merge` take it as they take the file. The arguments are `save_adapters`'s."""
    config = adapter_config_of(model)
    if config is None:
        raise ValueError("The model has no adapters to save: call apply_adapters first.")
    style = _prompt_style_record(prompt_style)
    own = adapter_state_dict(model)
    if state_dict is None:
        state_dict = own
    else:  # (a trained weight tied to another module may come under both names: the model's first is kept)
        # the adapters' buffers (PiSSA's starting factors) are the model's own: a checkpoint holds the trained tensors
        buffers = {k for k in own if k not in state_dict and k in dict(model.named_buffers())}
        state_dict = {**state_dict, **{k: own[k] for k in buffers}}
        if not set(own) <= set(state_dict) or not set(state_dict) <= _aliases(model, own):
            raise ValueError("save_adapters: the given state_dict's keys are not the model's adapter keys.")
        state_dict = {k: state_dict[k] for k in own}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "adapter_config": config.to_dict(),
        "base_model": _base_model_name(model),
        "base_shapes": _base_shapes(model),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in state_dict.items()},
    }
    if style is not None:  # absent rather than None, like the files written before it existed
        payload["prompt_style"] = style
    return payload


def _check_adapter_file_path(path: Union[str, Path]) -> Path:
    if Path(path).is_dir() or str(path).endswith(("/", os.sep)):
        raise ValueError(
            f"save_adapters writes one file (the adapter settings inside it), and {str(path)!r} is a directory: pass "
            f"a file path such as {str(Path(path) / 'adapter.safetensors')!r} (or a .pth one)."
        )
    return Path(path)


def write_adapter_file(payload: dict, path: Union[str, Path]) -> Path:
    """Write an adapter dict (`adapter_payload`) to `path` atomically: a `.safetensors` file for that suffix, else
    a torch file (see the module docstring for both layouts)."""
    path = _check_adapter_file_path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        atomic_save(payload, path)
        return path
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in payload["state_dict"].items()}
    metadata = {k: json.dumps(v) for k, v in payload.items() if k != "state_dict"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def save_adapters(
    model: nn.Module,
    path: Union[str, Path],
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    prompt_style: Optional[dict] = None,
) -> Path:
    """Write the adapters of `model` to `path` atomically: a `.safetensors` file for that suffix, else a torch file
    (see the module docstring for both layouts).

    `state_dict` replaces the model's own adapter tensors, e.g. the full tensors gathered from a sharded (FSDP)
    model; its keys must be exactly the adapter keys.
    `prompt_style` is the `{"prompt_style": name, "system_prompt": text or None}` the model was trained with (what
    the run records in `hyperparameters.yaml` under `prompt_style`): stored in the file, so merging or chatting with
    the file alone, away from its run, still prompts the model in that format.
    """
    payload = adapter_payload(model, state_dict=state_dict, prompt_style=prompt_style)
    return write_adapter_file(payload, path)


def load_adapter_file(path: Union[str, Path], mmap: bool = False) -> Any:
    """What `lit_gpt.utils.load_file` reads from `path`, except that a `.safetensors` file written by `save_adapters`
    comes back as the dict a `.pth` one holds (its metadata decoded). Other `.safetensors` files stay plain tensor
    dicts."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        return load_file(path, mmap=mmap)
    tensors = load_file(path)  # refuses a missing or unreadable file in one sentence
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "adapter_config" not in metadata:
        return tensors
    obj: dict[str, Any] = {}
    for key in METADATA_KEYS:
        if key in metadata:
            try:
                obj[key] = json.loads(metadata[key])
            except ValueError:
                raise ValueError(
                    f"{str(path)} is not an adapter file written by save_adapters: its metadata entry {key!r} is not "
                    "JSON text."
                ) from None
    obj["state_dict"] = tensors
    return obj


def _read(path_or_obj: Union[str, Path, dict]) -> tuple[dict, str]:
    if isinstance(path_or_obj, dict):
        obj, where = path_or_obj, "The adapter dict"
    else:
        where = str(path_or_obj)
        check_not_peft(path_or_obj)
        obj = load_adapter_file(path_or_obj)
    if not isinstance(obj, dict) or "state_dict" not in obj or "adapter_config" not in obj:
        if not isinstance(path_or_obj, dict):
            check_not_peft(path_or_obj, obj)
        raise ValueError(
            f"{where} is not an adapter file written by save_adapters (it lacks 'adapter_config' or 'state_dict')."
        )
    # absent in the dicts `lit_gpt.merge` makes of training checkpoints, present in every file save_adapters wrote
    fmt, version = obj.get("format", FORMAT), obj.get("version", VERSION)
    if fmt != FORMAT:
        raise ValueError(
            f"{where} is not a lit_gpt adapter file (its format is {fmt!r}, not {FORMAT!r}): pass a file written by "
            "save_adapters."
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{where} has no valid adapter file version ({version!r}, where save_adapters writes 1 to {VERSION}): "
            "pass a file written by save_adapters."
        )
    if version > VERSION:
        raise ValueError(
            f"{where} is an adapter file of version {version}, newer than this lit_gpt reads (up to {VERSION}): "
            "update lit_gpt to load it."
        )
    return obj, where


def peft_folder(path: Union[str, Path]) -> Optional[Path]:
    """The PEFT adapter folder `path` names (what `PeftModel.save_pretrained` writes: `adapter_config.json` beside
    `adapter_model.safetensors`): `path` itself, or the folder of its `adapter_model.safetensors`; None for
    anything else."""
    path = Path(path)
    if path.is_dir() and (path / PEFT_CONFIG_FILENAME).is_file():
        return path
    if path.name == PEFT_WEIGHTS_FILENAME and path.is_file() and (path.parent / PEFT_CONFIG_FILENAME).is_file():
        # (`save_adapters` may have written a lit adapter under that name: its metadata says so)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                ours = "adapter_config" in (f.metadata() or {})
        except (OSError, SafetensorError):  # unreadable: the import says so, naming the file
            ours = False
        return None if ours else path.parent
    return None


def check_not_peft(path: Union[str, Path], contents: Any = None) -> None:
    """Refuse a PEFT adapter (its folder, or the tensors of its `adapter_model.safetensors` as `contents`) given
    where a lit_gpt adapter file is expected (`load_adapters`; `lit_gpt.merge` imports a whole PEFT folder)."""
    path = Path(path)
    if contents is None and peft_folder(path) is not None:
        raise peft_adapter_given(str(path), peft_folder(path))
    if isinstance(contents, dict) and contents and all(isinstance(k, str) and k.startswith(PEFT_PREFIX)
                                                       for k in contents):
        raise peft_adapter_given(str(path), path.parent)


def peft_adapter_given(where: str, folder: Path) -> ValueError:
    """The error `check_not_peft` raises."""
    if not (folder / PEFT_CONFIG_FILENAME).is_file():  # the weights alone: nothing says what they adapt
        return ValueError(
            f"{where!r} holds the tensors of a Hugging Face PEFT adapter, without the {PEFT_CONFIG_FILENAME} PEFT's "
            "save_pretrained writes beside them: copy the whole folder PEFT wrote and pass that folder as "
            "--adapter_path with --checkpoint_dir (chat, generate, eval and merge import it), or load it with "
            "peft.PeftModel.from_pretrained on a transformers model."
        )
    return ValueError(
        f"{where!r} is a Hugging Face PEFT adapter (what PEFT's save_pretrained writes), not a lit_gpt adapter file: "
        "load it with peft.PeftModel.from_pretrained on a transformers model, convert it for a lit checkpoint "
        f"with `python scripts/convert_peft_adapter.py import --peft_dir {str(folder)!r} --checkpoint_dir BASE "
        "--adapter_path adapter.safetensors` and pass that file, or turn it into an adapter dict with "
        "lit_gpt.adapters.peft_format.peft_adapter_payload(peft_dir, BASE)."
    )


def read_adapter_config(path_or_obj: Union[str, Path, dict]) -> AdapterConfig:
    """The `AdapterConfig` an adapter file (`.pth` or `.safetensors`) was trained with."""
    obj, _ = _read(path_or_obj)
    return AdapterConfig.from_dict(obj["adapter_config"])


def _wrapper_prefix(keys: Iterable[str]) -> str:
    """The run of wrapper prefixes (`WRAPPER_PREFIXES`) that every key starts with."""
    keys = list(keys)
    prefix = ""
    while keys:
        step = next((w for w in WRAPPER_PREFIXES if all(k.startswith(prefix + w) for k in keys)), None)
        if step is None:
            break
        prefix += step
    return prefix


def _adapted_weights(obj: dict) -> list[str]:
    """The weight names of the layers an adapter file adapted: its base shapes' keys, else from its tensor names."""
    if obj.get("base_shapes"):
        return list(obj["base_shapes"])
    layers = {("." + k).rpartition(".adapters.")[0][1:] for k in obj["state_dict"]}
    return sorted(f"{name}.weight" if name else "weight" for name in layers)


def align_adapter_keys(obj: dict, model: nn.Module) -> dict:
    """`obj` (an adapter dict) with its names moved onto `model`'s where it was saved through a wrapper (DDP's
    `module.`, torch.compile's `_orig_mod.`) that `model` lacks, or the other way round; `obj` itself when its
    names already fit or another prefix would not make them fit."""
    weights = _adapted_weights(obj)
    params = {name for name, _ in model.named_parameters()}
    if not weights or all(w in params for w in weights):
        return obj
    old, new = _wrapper_prefix(weights), _wrapper_prefix(params)
    if old == new or not all(k.startswith(old) for k in obj["state_dict"]):
        return obj
    if not all(new + w[len(old):] in params for w in weights):
        return obj
    aligned = dict(obj)
    if obj.get("base_shapes"):
        aligned["base_shapes"] = {new + k[len(old):]: v for k, v in obj["base_shapes"].items()}
    aligned["state_dict"] = {new + k[len(old):]: v for k, v in obj["state_dict"].items()}
    return aligned


def _same_trained_modules(model: nn.Module, saved: AdapterConfig) -> bool:
    """Whether `saved.train_modules` selects in `model` the modules it trains in full (`head` and `lm_head` do)."""
    try:
        return set(train_module_names(model, saved)) == {name for name, _ in trained_modules(model)}
    except ValueError:
        return False


def _setting_differences(saved: AdapterConfig, own: AdapterConfig, same_trained: bool = False) -> list[str]:
    """`"nb=4 in the file, nb=8 in this model"` for every setting of one method that changes what its adapters
    compute from their tensors. Targets are left to the tensor names, regularisers (`REGULARISERS`) to the model;
    `train_modules` written otherwise for the same modules (`same_trained`) are the same."""
    ignore = {"method", "targets", "layers", *REGULARISERS} | ({"train_modules"} if same_trained else set())
    ignore.update(BLOCK_FIELDS if saved.method == "lora" else ("r", "alpha"))
    if saved.method != "oft":
        ignore.update(OFT_FIELDS)
    elif not (saved.coft or own.coft):
        ignore.add("eps")  # the COFT radius
    if saved.block_size is not None and own.block_size is not None:
        ignore.add("nb")  # block_size decides
    a, b = saved.to_dict(), own.to_dict()
    return [f"{setting(k, a[k])} in the file, {setting(k, b[k])} in this model" for k in a
            if k not in ignore and a[k] != b[k]]


def load_adapters(model: nn.Module, path_or_obj: Union[str, Path, dict, Any], where: Optional[str] = None
                  ) -> nn.Module:
    """Load an adapter file (`.pth` or `.safetensors`) into `model`, first applying its config if `model` has no
    adapters yet.

    A model that already has adapters must have them with the file's settings (its own `dropout` and
    `block_dropout` are kept: they do not change what it computes in eval mode). Refuses in one sentence naming the
    file: the settings that differ, else the first mismatching tensor (an adapter trained on another base model).
    A refused file leaves the model untouched. A file saved through a wrapper (DDP's `module.`, torch.compile's
    `_orig_mod.`) loads into the unwrapped model, and the other way round. `where` names an adapter dict in
    errors (the file it was read from; default "The adapter dict").
    """
    obj, read_from = _read(path_or_obj)
    where = where if where is not None and isinstance(path_or_obj, dict) else read_from
    saved_config = AdapterConfig.from_dict(obj["adapter_config"])
    obj = align_adapter_keys(obj, model)
    # the base shapes are checked before anything is applied, so a refused file leaves the model untouched
    for key, shape in (obj.get("base_shapes") or {}).items():
        try:
            tensor = model.get_parameter(key)
        except AttributeError:
            raise ValueError(
                f"{where} was trained on another base model: its adapted layer weight {key!r} does not exist in "
                f"this {type(model).__name__}."
            ) from None
        if list(tensor.shape) != list(shape):
            raise ValueError(
                f"{where} was trained on another base model: base tensor {key!r} had shape {list(shape)} there "
                f"but has {list(tensor.shape)} in this model."
            )
    current = adapter_config_of(model)
    built = None
    if current is None:
        from lit_gpt.adapters.lora import skipping_base_init

        with skipping_base_init():  # (PiSSA's factors are in the file: no decomposition of the base weights)
            built = build_adapters(model, saved_config)
        own = {f"{name}.adapters.{sname}.{k}": v for name, _, _, adapters in built
               for sname, ad in adapters.items() for k, v in ad.state_dict().items()}
        own.update({f"{name}.{k}": p for name in train_module_names(model, saved_config)
                    for k, p in model.get_submodule(name).named_parameters()})
    elif current.method != saved_config.method:
        raise ValueError(
            f"{where} holds {saved_config.method} adapters but the model has {current.method} adapters: "
            f"load it into a model without adapters, or into one adapted with method {saved_config.method!r}."
        )
    else:
        differ = _setting_differences(saved_config, current, _same_trained_modules(model, saved_config))
        if differ:
            raise ValueError(
                f"{where} was trained with other adapter settings than this model's ({'; '.join(differ)}): load it "
                "into a model without adapters, which then gets the file's settings."
            )
        own = adapter_state_dict(model)

    saved: dict[str, torch.Tensor] = obj["state_dict"]
    # a training checkpoint names a trained weight tied to another module under both names: one is enough
    aliases = _aliases(model, own) - set(own)
    saved = {k: v for k, v in saved.items() if k not in aliases}
    for key, value in saved.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            what = "adapter tensor" if ".adapters." in key else "tensor (of a module trained in full)"
            raise ValueError(
                f"{where} was trained on another base model: {what} {key!r} has shape {list(value.shape)} "
                f"in the file but {list(own[key].shape)} in this model."
            )
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        if missing:
            detail = f"this model's {missing[0]!r} is missing from it"
        else:
            detail = f"its {unexpected[0]!r} has no place in this model"
        def placed(config: AdapterConfig) -> str:
            return f"targets {config.targets}" + ("" if config.layers is None else f" in {blocks_phrase(config.layers)}")

        mine = f"; this model has {placed(current)}" if current is not None else ""
        raise ValueError(
            f"{where} does not fit this model's adapters ({detail}): it was trained with other targets or blocks, "
            f"or on another base model (it says {obj.get('base_model')!r}, {placed(saved_config)}{mine})."
        )
    if built is not None:
        install_adapters(model, saved_config, built)

    params = dict(model.named_parameters(remove_duplicate=False))
    names = parameter_names(model)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in saved.items():
            if key in buffers:  # (PiSSA's starting factors)
                owner_name, _, attr = key.rpartition(".")
                owner = model.get_submodule(owner_name)
                if buffers[key].is_meta:
                    owner.register_buffer(attr, value.to(dtype=buffers[key].dtype))
                else:
                    buffers[key].copy_(value)
                continue
            p = params[key]
            if p.is_meta:  # a new tensor, under every name of the old one (a weight tied to another module)
                new = nn.Parameter(value.to(dtype=p.dtype), requires_grad=p.requires_grad)
                for alias in names[id(p)]:
                    owner_name, _, attr = alias.rpartition(".")
                    setattr(model.get_submodule(owner_name) if owner_name else model, attr, new)
            else:
                p.copy_(value)
    return model
