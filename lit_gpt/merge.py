"""Fine-tuned models for inference: load a base checkpoint plus an adapter (or full fine-tuning weights), decide how
to prompt it, and fold adapters into a standalone checkpoint.

Everything is read from the files a run wrote, never from directory names:

* an adapter file (`lit_model_ether_finetuned.pth`, `lit_model_lora_finetuned.pth`, or a `.safetensors` file
  written by `save_adapters`) carries its `AdapterConfig`, the base model's name, the shapes of the layers it
  adapted and (files written since `save_adapters` took `prompt_style`) the prompt style it was trained with, so
  that it can be used away from its run;
* a full fine-tuning file (`lit_model_finetuned.pth`) is a plain lit state dict;
* a training checkpoint (`checkpoints/step-*.pth`) holds the trainable tensors under `"model"`; its method comes
  from the run's `hyperparameters.yaml`;
* a Hugging Face PEFT adapter folder (`PeftModel.save_pretrained`: `adapter_config.json` +
  `adapter_model.safetensors`; LoRA, OFT, or HRA in ETHER's block form) is imported in memory for the lit base
  checkpoint given with it (`lit_gpt.adapters.peft_format.peft_adapter_payload`, exactly what
  `scripts/convert_peft_adapter.py import` writes), its prompt style read from a `prompt_style.yaml` beside it;
* `hyperparameters.yaml` next to the file names the base checkpoint (`base_checkpoint_dir`) and the training data
  directory, whose `prepare_config.yaml` names the prompt style the model was trained with.

    model = load_finetuned("checkpoints/meta-llama/Llama-2-7b-hf", "out/run/lit_model_ether_finetuned.pth")
    style = resolve_prompt_style("checkpoints/meta-llama/Llama-2-7b-hf", "out/run/lit_model_ether_finetuned.pth")
    merge_checkpoint("out/run/lit_model_ether_finetuned.pth", precision="bf16-true")   # -> out/run/merged/
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
import yaml

from lit_gpt.config import CONFIG_FILENAME, Config, read_yaml_file
from lit_gpt.model import GPT
from lit_gpt.utils import (
    IDENTITY_KEYS,
    MERGED_DIRNAME,
    WEIGHTS_FILENAME,
    atomic_path,
    atomic_paths,
    atomic_write_text,
    check_checkpoint_dir,
    check_output_dir,
    file_identity,
    lit_state_dict,
    load_model_weights,
    merge_info_record,
    merge_source,
    read_merge_info,
)

HPARAMS_FILENAME = "hyperparameters.yaml"
PROMPT_STYLE_FILENAME = "prompt_style.yaml"
MERGE_INFO_FILENAME = "merge_info.yaml"
# what a standalone checkpoint needs besides weights and config, copied when the base has them
TOKENIZER_FILENAMES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
PRECISIONS = {
    "bf16-true": torch.bfloat16,
    "bf16-mixed": torch.float32,
    "16-true": torch.float16,
    "16-mixed": torch.float32,
    "32-true": torch.float32,
}

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------- reading a run
@dataclass
class FineTuned:
    """What a fine-tuning output file holds, normalised.

    `kind` is ``"adapter"`` (`payload` is an adapter dict as `load_adapters` reads it) or ``"full"`` (`payload` is
    a plain lit state dict). `hparams` is the run's `hyperparameters.yaml` (empty when there is none)."""

    path: Path
    kind: str
    payload: dict
    hparams: dict

    @property
    def method(self) -> str:
        return self.payload["adapter_config"]["method"] if self.kind == "adapter" else "full"


def find_run_dir(path: PathLike) -> Optional[Path]:
    """The run directory of a fine-tuning output: the folder holding `hyperparameters.yaml`, next to the file or
    one level up (for `checkpoints/step-*.pth`)."""
    path = Path(path)
    for d in (path.parent, path.parent.parent):
        if (d / HPARAMS_FILENAME).is_file():
            return d
    return None


# tokenizer side files the writers may copy that `Tokenizer` does not read: JSON ones, and text ones
_SIDE_JSON = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "chat_template.json")
_SIDE_TEXT = ("merges.txt",)


def check_tokenizer_files(checkpoint_dir: PathLike) -> None:
    """Load the tokenizer of `checkpoint_dir` once, compile its chat template and parse the side files it does not
    read (special_tokens_map.json, added_tokens.json, vocab.json, merges.txt, chat_template.json), so that a merge
    or an export that copies them stops, before the long weight work, on a corrupt one (in one sentence naming it)
    rather than publish it. A folder without a vocabulary passes (the writers warn about it)."""
    from lit_gpt.tokenizer import Tokenizer
    from lit_gpt.utils import read_json_object, read_text_file

    checkpoint_dir = Path(checkpoint_dir)
    fix = "copy the tokenizer files from the original model again, or delete the file"
    for name in _SIDE_JSON:
        if (checkpoint_dir / name).is_file():
            read_json_object(checkpoint_dir / name, fix)
    for name in _SIDE_TEXT:
        if (checkpoint_dir / name).is_file():
            read_text_file(checkpoint_dir / name, fix)
    try:
        tokenizer = Tokenizer(checkpoint_dir)
    except FileNotFoundError:  # no tokenizer.json/tokenizer.model (its JSON files were read, and parsed, first)
        return
    if tokenizer.chat_template is not None:
        tokenizer.compile_chat_template()


def read_hparams(path: PathLike) -> dict:
    """The `hyperparameters.yaml` of the run that wrote `path`, or `{}` when the file sits outside a run dir."""
    run_dir = find_run_dir(path)
    if run_dir is None:
        return {}
    hp = read_yaml_file(run_dir / HPARAMS_FILENAME, ": fix it, or pass the flags yourself.")
    if not isinstance(hp, dict):
        raise ValueError(f"{str(run_dir / HPARAMS_FILENAME)!r} is not a YAML mapping; it was not written by finetune/.")
    return hp


def read_finetuned(path: PathLike, checkpoint_dir: Optional[PathLike] = None) -> FineTuned:
    """Open an adapter file, a full fine-tuning state dict or a training checkpoint (see the module docstring).

    A Hugging Face PEFT adapter folder (or its `adapter_model.safetensors`) is imported in memory for the lit
    checkpoint `checkpoint_dir` (`peft_adapter_payload`, with a note on stderr), which it then needs: PEFT records
    no lit base checkpoint."""
    from lit_gpt.adapters.state import check_not_peft, peft_folder

    path = Path(path)
    folder = peft_folder(path)
    if folder is not None:
        return _read_peft_folder(folder, checkpoint_dir)
    check_not_peft(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("lit_model*finetuned.pth"))
        hint = f"the run's final file is {str(path / found[0])!r}" if found else "pass a lit_model_*finetuned.pth"
        raise ValueError(f"Adapter/fine-tuned path {str(path)!r} is a folder, not a file: {hint}.")
    if not path.is_file():
        raise FileNotFoundError(f"Adapter/fine-tuned file {str(path)!r} does not exist.")
    from lit_gpt.adapters import load_adapter_file

    obj = load_adapter_file(path, mmap=True)  # an adapter `.safetensors` file comes back as the `.pth` dict
    hp = read_hparams(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} is not a lit_gpt fine-tuning output (it holds a {type(obj).__name__}).")
    if "adapter_config" in obj and "state_dict" in obj:
        return FineTuned(path, "adapter", obj, hp)
    if "model" in obj and isinstance(obj["model"], dict) and "step" in obj:
        # a resumable training checkpoint: the trainable tensors only; the run's hyperparameters say what they are
        if not hp:
            raise ValueError(
                f"{str(path)!r} is a training checkpoint, and no {HPARAMS_FILENAME} was found next to it or one "
                "folder up to say which method trained it; pass the run's final lit_model_*_finetuned.pth instead."
            )
        if hp.get("adapter_config"):
            payload = {"adapter_config": hp["adapter_config"], "base_model": None, "base_shapes": None,
                       "state_dict": obj["model"]}
            return FineTuned(path, "adapter", payload, hp)
        return FineTuned(path, "full", obj["model"], hp)
    check_not_peft(path, obj)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return FineTuned(path, "full", obj, hp)
    raise ValueError(
        f"{str(path)!r} is neither an adapter file (no 'adapter_config'/'state_dict'), a full fine-tuning state dict "
        "nor a training checkpoint; pass a file written by finetune/ (lit_model_*finetuned.pth)."
    )


def _peft_base_name(folder: Path) -> Optional[str]:
    """The `base_model_name_or_path` a PEFT folder's `adapter_config.json` records, or None (the import itself
    refuses, in its own words, a config that is not readable)."""
    import json

    from lit_gpt.adapters.state import PEFT_CONFIG_FILENAME

    try:
        name = json.loads((folder / PEFT_CONFIG_FILENAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def _read_peft_folder(folder: Path, checkpoint_dir: Optional[PathLike]) -> FineTuned:
    """A PEFT adapter folder as a `FineTuned` adapter, imported in memory for `checkpoint_dir`."""
    from lit_gpt.adapters.peft_format import LIT_METHOD_OF, peft_adapter_payload

    if checkpoint_dir is None:
        named = _peft_base_name(folder)
        named = f" ({named!r}, as its adapter_config.json says)" if named else ""
        raise ValueError(
            f"{str(folder)!r} is a Hugging Face PEFT adapter, which records no lit base checkpoint: pass "
            f"--checkpoint_dir with the lit checkpoint converted (scripts/convert_hf_checkpoint.py) from the adapter's "
            f"base model{named}."
        )
    payload = peft_adapter_payload(folder, checkpoint_dir)
    kind = next((k for k, m in LIT_METHOD_OF.items() if m == payload["adapter_config"]["method"]), "")
    print(f"Imported the PEFT {kind.replace('LORA', 'LoRA')} adapter {str(folder)!r} in memory (`python "
          "scripts/convert_peft_adapter.py import` writes it as a lit adapter file).", file=sys.stderr)
    return FineTuned(folder, "adapter", payload, {})


def _recorded_path(hp: dict, *keys: str) -> Optional[Path]:
    """The first path a run recorded under `keys` (dotted: `io.checkpoint_dir`) that exists from here, else the
    first one recorded (None when none is). Runs record absolute paths; older ones the paths as given."""
    recorded = []
    for key in keys:
        value = hp
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value:
            recorded.append(Path(value))
    return next((p for p in recorded if p.exists()), recorded[0] if recorded else None)


def base_checkpoint_of(finetuned: FineTuned, checkpoint_dir: Optional[PathLike]) -> Path:
    """`checkpoint_dir`, or the run's `base_checkpoint_dir` (or its `io.checkpoint_dir`) when it is not given."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    recorded = _recorded_path(finetuned.hparams, "base_checkpoint_dir", "io.checkpoint_dir")
    if recorded is None:
        raise ValueError(
            f"No --checkpoint_dir given and no base_checkpoint_dir recorded in a {HPARAMS_FILENAME} next to "
            f"{str(finetuned.path)!r}: pass --checkpoint_dir with the base model the adapter was trained on."
        )
    if not recorded.is_dir():
        raise FileNotFoundError(
            f"The base model recorded in the run's {HPARAMS_FILENAME} ({str(recorded)!r}) does not exist here: pass "
            "--checkpoint_dir with the base model the adapter was trained on."
        )
    return recorded


def checkpoint_dir_for(checkpoint_dir: Optional[PathLike], adapter_path: Optional[PathLike]) -> Path:
    """`--checkpoint_dir`, or with only `--adapter_path` the base model its run recorded (as merging finds it)."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    if adapter_path is None:
        raise ValueError("--checkpoint_dir is required: pass a lit checkpoint directory (a merged model, or the base "
                         "model of an --adapter_path).")
    return base_checkpoint_of(read_finetuned(adapter_path), None)


def check_same_base(finetuned: FineTuned, model: nn.Module, checkpoint_dir: PathLike) -> None:
    """Refuse, in one sentence, weights trained on another base model than the one in `checkpoint_dir`.

    Works on a model on the `meta` device, so a wrong pairing fails before gigabytes are read."""
    where, ckpt = str(finetuned.path), str(checkpoint_dir)
    own = getattr(getattr(model, "config", None), "name", None)
    if finetuned.kind == "adapter":
        from lit_gpt.adapters import align_adapter_keys

        trained_on = finetuned.payload.get("base_model")
        # a file saved through a wrapper (`module.`, `_orig_mod.`) names the layers with its prefix
        aligned = align_adapter_keys(finetuned.payload, model)
        # the adapted layers' weights, then the tensors of the modules trained in full (`train_modules`)
        shapes = dict(aligned.get("base_shapes") or {})
        shapes.update({k: list(v.shape) for k, v in aligned["state_dict"].items() if ".adapters." not in k})
        for key, shape in shapes.items():
            try:
                actual = list(model.get_parameter(key).shape)
            except AttributeError:
                actual = None
            if actual != list(shape):
                found = "has no such layer" if actual is None else f"has shape {actual}"
                raise ValueError(
                    f"{where} was trained on another base model ({trained_on!r}): its {key!r} had shape "
                    f"{list(shape)} there but {ckpt!r} ({own!r}) {found}; pass the --checkpoint_dir it was "
                    f"trained on{_recorded_base(finetuned)}."
                )
        if trained_on and own and trained_on != own:
            raise ValueError(
                f"{where} was trained on base model {trained_on!r} but {ckpt!r} holds {own!r}; pass the "
                f"--checkpoint_dir it was trained on{_recorded_base(finetuned)}."
            )
        warn_other_base(finetuned, checkpoint_dir)
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in finetuned.payload.items():
        key = key.removeprefix("_orig_mod.")
        if key not in expected or tuple(value.shape) != expected[key]:
            found = "has no such tensor" if key not in expected else f"has shape {list(expected[key])}"
            raise ValueError(
                f"{where} was trained on another base model: its tensor {key!r} has shape {list(value.shape)} but "
                f"{ckpt!r} ({own!r}) {found}; pass the --checkpoint_dir it was trained on{_recorded_base(finetuned)}."
            )
    warn_other_base(finetuned, checkpoint_dir)


def warn_other_base(finetuned: FineTuned, checkpoint_dir: PathLike) -> None:
    """A warning when `checkpoint_dir` is not the base model the run recorded, which still exists: the shapes
    match (same architecture), but it may be another model of that shape (a base for its -Instruct version)."""
    recorded = _recorded_path(finetuned.hparams or {}, "base_checkpoint_dir", "io.checkpoint_dir")
    if recorded is None or not recorded.is_dir() or recorded.resolve() == Path(checkpoint_dir).resolve():
        return
    print(f"warning: {str(finetuned.path)!r} was trained on {str(recorded)!r} (its run's {HPARAMS_FILENAME}), not on "
          f"--checkpoint_dir {str(checkpoint_dir)!r}; the shapes match, so it is applied to that model as asked.",
          file=sys.stderr)


def check_not_merged_into(finetuned: FineTuned, checkpoint_dir: PathLike) -> None:
    """Refuse, in one sentence, an adapter given with a checkpoint that already holds it: the base model's own
    weights passed as the fine-tuned file, or a merged checkpoint (`merge_info.yaml`) made from this very file,
    where applying it again would transform the weights twice."""
    checkpoint_dir = Path(checkpoint_dir)
    where, ckpt = str(finetuned.path), str(checkpoint_dir)
    if (checkpoint_dir / WEIGHTS_FILENAME).resolve() == finetuned.path.resolve():
        raise ValueError(f"{where} is the base checkpoint's own weights, not a fine-tuning output: pass the run's "
                         "lit_model_*finetuned.pth as the adapter.")
    info = read_merge_info(checkpoint_dir)
    if info is None:
        return
    source = merge_source(checkpoint_dir, info)  # (also where a run moved with its merged/ has it now)
    recorded = {key: info[key] for key in IDENTITY_KEYS if key in info}
    if ((source is not None and source.resolve() == finetuned.path.resolve())
            or (recorded and _identity_or_none(finetuned.path) == recorded)):  # a copy of the merged file
        base = info.get("base_checkpoint_dir")
        raise ValueError(
            f"{ckpt!r} already has {where} merged into it ({MERGE_INFO_FILENAME}), so applying it again would "
            f"transform the weights twice: drop the adapter, or pass the base model{f' {base!r}' if base else ''}."
        )


def _identity_or_none(path: Path) -> Optional[dict]:
    try:
        return file_identity(path)
    except OSError:
        return None


def _recorded_base(finetuned: FineTuned) -> str:
    recorded = finetuned.hparams.get("base_checkpoint_dir")
    return f" (the run recorded {recorded!r})" if recorded else ""


# ---------------------------------------------------------------------------------------------- loading
def load_finetuned(
    checkpoint_dir: PathLike,
    adapter_path: Optional[PathLike] = None,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
) -> GPT:
    """The base checkpoint with the fine-tuned weights of `adapter_path` on top, in eval mode.

    An adapter file is applied *unmerged* (`load_adapters`: the model computes `W (H x)` on the fly); a full
    fine-tuning file (`lit_model_finetuned.pth`, a plain lit state dict) replaces the base weights it holds.
    The base is memory-mapped, so only the weights actually replaced or cast cost memory.
    Weights trained on another base model are refused with one sentence, before the base weights are read.
    `quantize` (`nf4`, `int8`): the blocks' linear weights (adapted ones too) are kept in that format
    (`lit_gpt.quantize`), each made on `device` from the memory-mapped file, so the device never holds the
    unquantized model.
    """
    from lit_gpt.adapters import load_adapters
    from lit_gpt.quantize import check_kind, quantize_model

    check_kind(quantize)
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    if quantize is not None:  # loaded on the CPU (memory-mapped), quantized onto the device
        model = load_finetuned(checkpoint_dir, adapter_path, device=None, dtype=dtype).requires_grad_(False)
        quantize_model(model, quantize, device=None if device is None else torch.device(device))
        return model.to(device) if device is not None else model
    if adapter_path is None:
        return GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype).eval()
    finetuned = read_finetuned(adapter_path, checkpoint_dir)
    check_not_merged_into(finetuned, checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    check_same_base(finetuned, model, checkpoint_dir)
    load_model_weights(model, checkpoint_dir / WEIGHTS_FILENAME, device=device, dtype=dtype)
    if finetuned.kind == "adapter":
        load_adapters(model, finetuned.payload, where=str(finetuned.path))
    else:
        load_model_weights(model, finetuned.payload, device=device, dtype=dtype or _float_dtype(model), strict=False)
    return model.eval()


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


# ---------------------------------------------------------------------------------------------- prompt style
def read_prompt_style_file(checkpoint_dir: PathLike) -> Optional[dict]:
    path = Path(checkpoint_dir) / PROMPT_STYLE_FILENAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("prompt_style"), str):
        raise ValueError(
            f"{str(path)!r} must be a YAML mapping with a 'prompt_style' name (e.g. prompt_style: alpaca)."
        )
    return data


def write_prompt_style_file(folder: PathLike, spec: Optional[dict]) -> None:
    """Write `spec` (`{"prompt_style": ..., "system_prompt": ...}`) as `folder`'s `prompt_style.yaml`; with None,
    remove one an earlier write left there (it would be taken for this model's)."""
    path = Path(folder) / PROMPT_STYLE_FILENAME
    if spec is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, prompt_style_text(spec))


def prompt_style_text(spec: dict) -> str:
    """The text of a `prompt_style.yaml` for `spec`."""
    return yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False)


def _style_spec(recorded: Any) -> Optional[dict]:
    """`{"prompt_style": name, "system_prompt": ...}` from a recorded mapping; None when it names no style."""
    if isinstance(recorded, dict) and isinstance(recorded.get("prompt_style"), str):
        return {"prompt_style": recorded["prompt_style"], "system_prompt": recorded.get("system_prompt")}
    return None


def trained_prompt_style(finetuned: Union[FineTuned, PathLike]) -> tuple[Optional[dict], Optional[str]]:
    """`({"prompt_style": ..., "system_prompt": ...}, None)`: the style the run trained with, from the first of
    the run's `hyperparameters.yaml`, the adapter file itself (`save_adapters(prompt_style=...)`) and, for runs
    that recorded neither, the `prepare_config.yaml` of its training data. `(None, why)` when none of them says,
    `why` being the start of a sentence for the caller's warning, which also names the format it falls back to."""
    from lit_gpt.adapters.state import peft_folder
    from lit_gpt.data import read_prepare_config

    folder = peft_folder(finetuned.path if isinstance(finetuned, FineTuned) else finetuned)
    if folder is not None:  # what an export wrote beside the adapter, as its import reads it: no conversion needed
        spec = _style_spec(read_prompt_style_file(folder))
        if spec is not None:
            return spec, None
        return None, (f"the PEFT adapter {str(folder)!r} does not record the prompt format it was trained with (no "
                      f"{PROMPT_STYLE_FILENAME} beside it, which scripts/convert_peft_adapter.py export writes)")
    if not isinstance(finetuned, FineTuned):
        finetuned = read_finetuned(finetuned)
    where = str(finetuned.path)
    hp = finetuned.hparams
    spec = _style_spec(hp.get("prompt_style"))
    if spec is None and finetuned.kind == "adapter":
        # an adapter file copied away from its run still carries the style (older files do not)
        spec = _style_spec(finetuned.payload.get("prompt_style"))
    if spec is not None:
        return spec, None
    data_dir = _recorded_path(hp, "io.train_data_dir")
    if data_dir is None:
        own = ("the file was written without one: by an older version, or imported without --prompt_style"
               if finetuned.kind == "adapter"
               else "a full fine-tuning state dict has no place for it")
        beside = (f"the {HPARAMS_FILENAME} of its run records none" if hp
                  else f"there is no run {HPARAMS_FILENAME} beside it")
        return None, f"{where!r} does not record the prompt format it was trained with ({own}, and {beside})"
    try:
        prepared = read_prepare_config(data_dir)
    except FileNotFoundError:
        return None, (f"the training data {str(data_dir)!r} recorded by the run of {where!r} is not found from "
                      "here (run from the directory the run was started in), so the prompt format it was trained "
                      "with is unknown")
    spec = {"prompt_style": prepared.get("prompt_style", "alpaca"), "system_prompt": prepared.get("system_prompt")}
    return spec, None


def _fallback_style_name(checkpoint_dir: PathLike, tokenizer: Any = None) -> str:
    """The style `resolve_prompt_style` uses for `checkpoint_dir` when nothing records one."""
    if tokenizer is None:
        from lit_gpt.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer(checkpoint_dir)
        except (OSError, ValueError):  # no usable tokenizer: loading the model will say so
            return "alpaca"
    return "chat_template" if tokenizer.chat_template is not None else "alpaca"


def resolve_prompt_style(checkpoint_dir: PathLike, adapter_path: Optional[PathLike] = None, tokenizer: Any = None):
    """How to format a prompt for this model, by the first rule that applies:

    1. with `adapter_path`: the style the run trained with (`trained_prompt_style`: its `hyperparameters.yaml`,
       the adapter file, or the `prepare_config.yaml` of its training data), also on a merged checkpoint whose own
       style another run set (the adapter learnt its run's format, as `merge_checkpoint` then records);
    2. `prompt_style.yaml` in `checkpoint_dir` (what `merge_checkpoint` writes: the style the model was trained with);
    3. the checkpoint's chat template (tokenizer), for chat models;
    4. Alpaca, the format of the instruction data the ETHER paper trained on.

    With `adapter_path`, falling through to 3 or 4 prints one warning on stderr naming the format used, since it
    may not be the one the model learnt.
    """
    from lit_gpt.data import prompt_style_from_name

    spec, unknown = trained_prompt_style(adapter_path) if adapter_path is not None else (None, None)
    if spec is None:
        spec = read_prompt_style_file(checkpoint_dir)
    if spec is not None:
        return prompt_style_from_name(
            spec["prompt_style"], checkpoint_dir=checkpoint_dir, system_prompt=spec.get("system_prompt"),
            tokenizer=tokenizer,
        )
    if tokenizer is None:
        from lit_gpt.tokenizer import Tokenizer

        tokenizer = Tokenizer(checkpoint_dir)
    name = _fallback_style_name(checkpoint_dir, tokenizer)
    if unknown is not None:
        used = "the checkpoint's chat template" if name == "chat_template" else "the Alpaca format"
        print(f"warning: {unknown}: prompting with {used}; pass --prompt_style to choose the right one.",
              file=sys.stderr)
    if name == "chat_template":
        return prompt_style_from_name("chat_template", tokenizer=tokenizer)
    return prompt_style_from_name("alpaca")


# ---------------------------------------------------------------------------------------------- merging
def probe_batch(config: Config, length: int = 16, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids for comparing merged and unmerged logits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (2, min(length, config.block_size)), generator=g)


def _copy_file(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


@torch.no_grad()
def merge_checkpoint(
    adapter_path: PathLike,
    checkpoint_dir: Optional[PathLike] = None,
    out_dir: Optional[PathLike] = None,
    precision: Optional[str] = None,
    probe: bool = True,
    log=print,
) -> Path:
    """Fold a fine-tuned adapter into the base weights and write a standalone lit checkpoint directory.

    The base is loaded memory-mapped in its stored dtype, the adapters are applied, and `merge_adapters` folds each
    layer in float32 and casts it back, one layer at a time, so a 7B model merges on the CPU in the memory of one
    copy. With `probe`, logits on a fixed batch are computed before merging and compared after it (no second
    model). `precision` picks the saved dtype (`bf16-true` bfloat16, `16-true` float16, `32-true`/`*-mixed`
    float32; default: the base checkpoint's dtype); one wider than the base's is applied before the adapters, so
    the folded weights and the modules trained in full keep what it holds.

    Writes `lit_model.pth` (base architecture, no adapter keys), `model_config.yaml`, the tokenizer files,
    `generation_config.json`, `prompt_style.yaml` (the style the run trained with, see `trained_prompt_style`; else
    the base's; else none, with a warning, and one an earlier merge left in `out_dir` is removed) and
    `merge_info.yaml`. Returns the output directory (default `<adapter's dir>/merged`; for a PEFT adapter folder,
    which is imported in memory for `checkpoint_dir`, `merged/` inside it).
    """
    from lit_gpt.adapters import load_adapters, merge_adapters

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    finetuned = read_finetuned(adapter_path, checkpoint_dir)
    checkpoint_dir = check_checkpoint_dir(base_checkpoint_of(finetuned, checkpoint_dir))
    check_tokenizer_files(checkpoint_dir)  # copied into out_dir at the end: a corrupt one stops the merge now
    check_not_merged_into(finetuned, checkpoint_dir)
    if out_dir is None:  # a PEFT folder's own merged/, as a file's folder's
        out_dir = (finetuned.path if finetuned.path.is_dir() else finetuned.path.parent) / MERGED_DIRNAME
    out_dir = check_output_dir(out_dir, "--out_dir")
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out_dir {str(out_dir)!r} is the base checkpoint directory; choose another folder.")

    config = Config.from_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    check_same_base(finetuned, model, checkpoint_dir)
    load_model_weights(model, checkpoint_dir / WEIGHTS_FILENAME)  # memory-mapped, stored dtype
    target = PRECISIONS[precision] if precision is not None else None
    if target is not None and target.itemsize > _float_dtype(model).itemsize:
        _cast(model, target)  # a wider dtype first: the folds and the trained modules keep what it can hold
    if finetuned.kind == "adapter":
        load_adapters(model, finetuned.payload, where=str(finetuned.path))
        description = f"adapter {read_config_description(finetuned)}"
    else:
        load_model_weights(model, finetuned.payload, dtype=_float_dtype(model), strict=False)
        description = "full fine-tuning weights"
    # after load_adapters: the adapter modules it creates start in training mode, and their dropout would make
    # the probe's unmerged logits random
    model.eval()

    before = None
    if probe:
        tokens = probe_batch(config)
        before = model(tokens).float()
    if finetuned.kind == "adapter":
        _adapters_to_file_precision(model, finetuned.payload["state_dict"])
        merge_adapters(model)
    # the cast first: the probe measures the weights that are written
    if target is not None:
        _cast(model, target)

    max_diff = rel_diff = None
    if probe:
        after = model(tokens).float()
        max_diff = (after - before).abs().max().item()
        rel_diff = max_diff / max(before.abs().max().item(), 1e-12)
        dtype = str(_float_dtype(model)).removeprefix("torch.")
        log(f"merged ({dtype}) vs unmerged logits on a {tuple(tokens.shape)} probe batch: max |diff| {max_diff:.3e} "
            f"({rel_diff:.2e} of the largest logit)")
        tol = 1e-4 if _float_dtype(model) == torch.float32 else 5e-2
        if not rel_diff <= tol:
            log(f"warning: the difference exceeds {tol:g} of the logit scale expected for "
                f"{dtype} weights")

    write_checkpoint_folder(out_dir, checkpoint_dir, finetuned, config, _float_dtype(model),
                            lambda path: torch.save(lit_state_dict(model), path), probe_max_abs_diff=max_diff, log=log)
    log(f"Merged {description} into {str(checkpoint_dir)!r}; wrote {str(out_dir)!r}")
    return out_dir


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():  # one tensor at a time: never a second full copy (a tied weight stays tied)
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def write_checkpoint_folder(
    out_dir: Path,
    checkpoint_dir: Path,
    finetuned: FineTuned,
    config: Config,
    dtype: torch.dtype,
    save_weights: Callable[[Path], None],
    probe_max_abs_diff: Optional[float] = None,
    replace: bool = False,
    log=print,
) -> Path:
    """Write a standalone lit checkpoint folder for the weights of `finetuned` on the base `checkpoint_dir`:
    `save_weights(path)` writes `lit_model.pth` (in `dtype`), and beside it go `model_config.yaml` (`config`), the
    base's tokenizer files and `generation_config.json`, `prompt_style.yaml` (the style the run trained with, see
    `trained_prompt_style`; else the base's; else none, with a warning) and `merge_info.yaml`.

    The files are written as one set: a write stopped part way (Ctrl-C, a full disk) leaves an earlier checkpoint in
    `out_dir` whole, never its weights beside this one's config. With `replace`, the folder itself is replaced
    (`_replacing_folder`): nothing of an earlier checkpoint there is left over, and the files this one does not
    write (an `eval/` folder of results) are kept."""
    if replace:
        with _replacing_folder(out_dir) as tmp_dir:
            write_checkpoint_folder(tmp_dir, checkpoint_dir, finetuned, config, dtype, save_weights,
                                    probe_max_abs_diff, log=_naming(tmp_dir, out_dir, log))
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    style, unknown = trained_prompt_style(finetuned)
    if style is None:
        style = read_prompt_style_file(checkpoint_dir)
    if unknown is not None:
        if style is not None:
            used = f"the base checkpoint's {PROMPT_STYLE_FILENAME} ({style['prompt_style']})"
        else:
            fallback = _fallback_style_name(checkpoint_dir)
            used = "its chat template" if fallback == "chat_template" else "the Alpaca format"
            used = f"no {PROMPT_STYLE_FILENAME}, so chat and generate will prompt it with {used}"
        log(f"warning: {unknown}: the checkpoint folder gets {used}; if that is not the format it was trained with, "
            f"write the right one into {str(out_dir / PROMPT_STYLE_FILENAME)!r} (e.g. prompt_style: alpaca).")
    # the source by path and by content: a run moved with its merged/, or resumed since, is told apart
    info = {**merge_info_record(finetuned.path), "method": finetuned.method,
            "base_checkpoint_dir": str(checkpoint_dir.resolve()),
            "dtype": str(dtype).removeprefix("torch."), "probe_max_abs_diff": probe_max_abs_diff}
    texts = {CONFIG_FILENAME: config.to_yaml(), MERGE_INFO_FILENAME: yaml.safe_dump(info, sort_keys=False)}
    if style is not None:
        texts[PROMPT_STYLE_FILENAME] = prompt_style_text(style)
    copies = [name for name in TOKENIZER_FILENAMES if (checkpoint_dir / name).is_file()]
    names = [WEIGHTS_FILENAME, *texts, *copies]
    # one set: a merge into an earlier merge's folder, stopped part way (Ctrl-C, a full disk), leaves that merge
    # whole, never its weights beside this one's config, prompt format and merge_info.yaml
    with atomic_paths(*(out_dir / name for name in names)) as temps:
        tmp = dict(zip(names, temps))
        save_weights(tmp[WEIGHTS_FILENAME])
        for name, text in texts.items():
            tmp[name].write_text(text, encoding="utf-8")
        for name in copies:
            shutil.copyfile(checkpoint_dir / name, tmp[name])
    # what an earlier merge into this folder, from another base, may have left
    for name in set(TOKENIZER_FILENAMES) - set(copies) | ({PROMPT_STYLE_FILENAME} if style is None else set()):
        (out_dir / name).unlink(missing_ok=True)
    return out_dir


def _naming(tmp_dir: Path, out_dir: Path, log):
    """`log`, with the temporary folder's path in a message replaced by the folder it becomes."""
    return lambda text: log(text.replace(str(tmp_dir), str(out_dir)))


# a folder being written (`.final.<random>.new`) and one being replaced (`.final.<random>.old`)
_NEW_FOLDER, _OLD_FOLDER = ".new", ".old"


@contextmanager
def _replacing_folder(path: Path) -> Iterator[Path]:
    """Yield a new, empty folder next to `path`; once the block succeeds it becomes `path`. An earlier folder there
    is renamed aside, the new one renamed into its place, then what the new one does not hold (an `eval/` folder) is
    moved over from the earlier one, which is deleted. A block that fails, or is stopped, leaves `path` as it was
    and removes the new folder; the leftovers of a writer killed outright (SIGKILL) are cleared by the next write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        if leftover.is_dir() and leftover.name.endswith(_OLD_FOLDER):  # killed between the two renames, or after
            if path.is_dir():
                _finish_replacing(path, leftover)
            else:
                os.replace(leftover, path)
        elif leftover.is_dir() and leftover.name.endswith(_NEW_FOLDER):
            shutil.rmtree(leftover)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, but the checkpoint folder goes there: move the file away.")
    new = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_NEW_FOLDER, dir=path.parent))
    os.chmod(new, 0o777 & ~_umask())  # mkdtemp makes it 0700; the folder should read as any other
    try:
        yield new
        old = None
        if path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_OLD_FOLDER, dir=path.parent))
            os.replace(path, old)  # (onto the empty folder just made: a rename cannot replace a folder that has files)
        os.replace(new, path)
        if old is not None:
            _finish_replacing(path, old)
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)


def _finish_replacing(path: Path, old: Path) -> None:
    """Move what the earlier folder `old` holds and the new `path` does not into `path`, then delete `old`."""
    for entry in old.iterdir():
        if not (path / entry.name).exists():
            os.replace(entry, path / entry.name)
    shutil.rmtree(old)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_config_description(finetuned: FineTuned) -> str:
    from lit_gpt.adapters import AdapterConfig

    return AdapterConfig.from_dict(finetuned.payload["adapter_config"]).describe()


def _adapters_to_file_precision(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put the adapter tensors back at the precision they were saved in before folding.

    `load_adapters` stores them in the base weight's dtype (what the unmerged forward computes in); an adapter trained
    in float32 on top of bf16 weights would otherwise be rounded to bf16 before it is folded in float32."""
    from lit_gpt.adapters.base import trained_module_state_dict

    params = dict(model.named_parameters(remove_duplicate=False))
    # modules trained in full are written in the model's dtype (by identity: a training checkpoint also names a
    # tied one by its other name)
    trained = {id(p) for p in trained_module_state_dict(model).values()}
    buffers = dict(model.named_buffers())  # (an adapter's buffers: PiSSA's starting factors)
    for key, value in saved.items():
        p = params.get(key, buffers.get(key))
        if id(p) not in trained and value.is_floating_point() and value.dtype != p.dtype:
            p.data = value.to(device=p.device, dtype=torch.promote_types(value.dtype, p.dtype))


def merge_cli(
    adapter_path: Optional[Path],
    checkpoint_dir: Optional[Path],
    out_dir: Optional[Path],
    precision: Optional[str],
    probe: bool,
    flag: str,
) -> Path:
    """What `scripts/merge_ether.py` and `scripts/merge_lora.py` run after parsing their flags."""
    if adapter_path is None:
        from lit_gpt.utils import finetuning_run_hint, run_adapter_file

        if checkpoint_dir is not None and finetuning_run_hint(checkpoint_dir) is not None:  # litgpt's `merge_lora RUN`
            raise ValueError(f"--checkpoint_dir {str(checkpoint_dir)!r} is a fine-tuning run, not its base model: pass "
                             f"{flag} {run_adapter_file(checkpoint_dir)} (the base model comes from the run's "
                             "hyperparameters.yaml).")
        raise ValueError(f"Pass the fine-tuned file to merge with {flag} (or --adapter_path).")
    return merge_checkpoint(adapter_path, checkpoint_dir=checkpoint_dir, out_dir=out_dir, precision=precision,
                            probe=probe, log=lambda s: print(s, file=sys.stderr))


__all__ = [
    "FineTuned",
    "PROMPT_STYLE_FILENAME",
    "base_checkpoint_of",
    "check_same_base",
    "checkpoint_dir_for",
    "find_run_dir",
    "load_finetuned",
    "merge_checkpoint",
    "read_finetuned",
    "read_hparams",
    "resolve_prompt_style",
    "trained_prompt_style",
    "write_prompt_style_file",
]
