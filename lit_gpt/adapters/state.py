"""Adapter files: only the adapter tensors, plus the config and the base shapes they were trained on.

A file is a plain dict that `torch.load(weights_only=True)` reads without running pickled code::

    {"format": "lit_gpt.adapters", "version": 1,
     "adapter_config": {...AdapterConfig.to_dict()...},
     "base_model": "Llama-2-7b-hf" or None,
     "base_shapes": {"transformer.h.0.attn.qkv.weight": [out, in], ...},
     "state_dict": {"transformer.h.0.attn.qkv.adapters.query.input.u": tensor, ...},
     "prompt_style": {"prompt_style": "alpaca", "system_prompt": None}}   # optional; absent in older files
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from lit_gpt.adapters.base import adapted_layers, adapter_config_of, apply_adapters
from lit_gpt.adapters.config import AdapterConfig
from lit_gpt.utils import atomic_save, load_file

FORMAT = "lit_gpt.adapters"
VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under their names in `model.state_dict()`."""
    sd = {}
    for name, layer in adapted_layers(model):
        prefix = f"{name}.adapters." if name else "adapters."
        for key, value in layer.adapters.state_dict().items():
            sd[prefix + key] = value
    return sd


def _base_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The stored shape of every adapted layer's weight (`(in, out)` for a `Conv1D`), by parameter name."""
    return {f"{name}.weight": list(layer.weight.shape) for name, layer in adapted_layers(model)}


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


def save_adapters(
    model: nn.Module,
    path: Union[str, Path],
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    prompt_style: Optional[dict] = None,
) -> Path:
    """Write the adapters of `model` to `path` atomically (see the module docstring for the layout).

    `state_dict` replaces the model's own adapter tensors, e.g. the full tensors gathered from a sharded (FSDP)
    model; its keys must be exactly the adapter keys.
    `prompt_style` is the `{"prompt_style": name, "system_prompt": text or None}` the model was trained with (what
    the run records in `hyperparameters.yaml` under `prompt_style`): stored in the file, so merging or chatting with
    the file alone, away from its run, still prompts the model in that format.
    """
    config = adapter_config_of(model)
    if config is None:
        raise ValueError("The model has no adapters to save: call apply_adapters first.")
    style = _prompt_style_record(prompt_style)
    if state_dict is None:
        state_dict = adapter_state_dict(model)
    elif set(state_dict) != set(adapter_state_dict(model)):
        raise ValueError("save_adapters: the given state_dict's keys are not the model's adapter keys.")
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
    path = Path(path)
    atomic_save(payload, path)
    return path


def _read(path_or_obj: Union[str, Path, dict]) -> tuple[dict, str]:
    if isinstance(path_or_obj, dict):
        obj, where = path_or_obj, "the adapter dict"
    else:
        where = str(path_or_obj)
        obj = load_file(path_or_obj, mmap=False)
    if not isinstance(obj, dict) or "state_dict" not in obj or "adapter_config" not in obj:
        raise ValueError(
            f"{where} is not an adapter file written by save_adapters (it lacks 'adapter_config' or 'state_dict')."
        )
    return obj, where


def read_adapter_config(path_or_obj: Union[str, Path, dict]) -> AdapterConfig:
    """The `AdapterConfig` an adapter file was trained with."""
    obj, _ = _read(path_or_obj)
    return AdapterConfig.from_dict(obj["adapter_config"])


def load_adapters(model: nn.Module, path_or_obj: Union[str, Path, dict, Any]) -> nn.Module:
    """Load an adapter file into `model`, first applying its config if `model` has no adapters yet.

    Refuses, in one sentence naming the file, the first mismatching tensor and both shapes, an adapter trained on
    another base model.
    """
    obj, where = _read(path_or_obj)
    saved_config = AdapterConfig.from_dict(obj["adapter_config"])
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
    if current is None:
        apply_adapters(model, saved_config)
    elif current.method != saved_config.method:
        raise ValueError(
            f"{where} holds {saved_config.method} adapters but the model has {current.method} adapters: "
            f"load it into a model without adapters, or into one adapted with method {saved_config.method!r}."
        )

    saved: dict[str, torch.Tensor] = obj["state_dict"]
    own = adapter_state_dict(model)
    for key, value in saved.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{where} was trained on another base model: adapter tensor {key!r} has shape {list(value.shape)} "
                f"in the file but {list(own[key].shape)} in this model."
            )
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        if missing:
            detail = f"this model's {missing[0]!r} is missing from it"
        else:
            detail = f"its {unexpected[0]!r} has no place in this model"
        raise ValueError(
            f"{where} does not fit this model's adapters ({detail}): it was trained with other targets or on "
            f"another base model (it says {obj.get('base_model')!r}, targets {saved_config.targets})."
        )

    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in saved.items():
            p = params[key]
            if p.is_meta:
                owner_name, _, attr = key.rpartition(".")
                owner = model.get_submodule(owner_name)
                setattr(owner, attr, nn.Parameter(value.to(dtype=p.dtype), requires_grad=p.requires_grad))
            else:
                p.copy_(value)
    return model
