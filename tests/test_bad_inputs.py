"""Bad input fails in one sentence naming the file, field or flag and the fix, never with a traceback: truncated or
foreign weight files, broken tokenizer and model-config files, files given where folders are expected (and the
reverse), a fine-tuning run given as a model, and `--device` strings."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT, Config, Tokenizer
from lit_gpt.adapters import AdapterConfig
from lit_gpt.cli import run_cli
from lit_gpt.convert_hf import config_to_hf, convert_hf_checkpoint, convert_lit_checkpoint
from lit_gpt.gguf import convert_gguf, open_gguf
from lit_gpt.utils import (
    check_checkpoint_dir,
    load_file,
    load_model_weights,
    resolve_device,
)

from test_merge import TINY, make_base, make_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny lit checkpoint and an ETHER fine-tuning run on it (what finetune/ leaves behind)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    base = make_base(root / "tiny-llama")
    adapter = make_run(root / "run", base, AdapterConfig(method="ether", nb=4))
    return base, adapter


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert "weights_only=False" not in message  # torch's advice to run pickled code must not reach the user


# ---------------------------------------------------------------------------------------------- weight files
def test_truncated_pth_is_one_sentence(tmp_path):
    path = tmp_path / "lit_model.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    truncate(path)
    for mmap in (True, False):
        with pytest.raises(ValueError, match=r"lit_model.pth' could not be read as a PyTorch/safetensors checkpoint "
                                             r"\([^)]+\): it is "
                                             r"truncated or not a checkpoint") as e:
            load_file(path, mmap=mmap)
        one_sentence(str(e.value))


def test_yaml_given_as_weights_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "hyperparameters.yaml"
    path.write_text("method: ether\nlearning_rate: 0.01\n")
    with pytest.raises(ValueError) as e:
        load_file(path)
    assert str(e.value) == (f"{str(path)!r} is a fine-tuning run's settings, not weights: pass the run's adapter "
                            f"file, {str(tmp_path / 'lit_model_<method>_finetuned.pth')!r}.")
    other = tmp_path / "notes.json"
    other.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"notes.json' is a text file \(.json\), not weights: pass the weights file"):
        load_file(other)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 10, b"hello world, this is text\n" * 10])
def test_empty_or_garbage_file_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="could not be read as a PyTorch/safetensors checkpoint") as e:
        load_file(path)
    one_sentence(str(e.value))
    # torch's legacy reader says KeyError(<the first bytes read as a number>): the user gets words instead
    assert not re.search(r"\(\d+\)", str(e.value)), str(e.value)


class _NotATensor:
    pass


def test_pickled_python_objects_are_refused_without_running_them(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"a": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"holds Python objects \(Unsupported global: GLOBAL [\w.]+_NotATensor\) "
                                         "that lit_gpt does not unpickle") as e:
        load_file(path)
    one_sentence(str(e.value))


def test_old_format_files_still_load_through_the_mmap_fallback(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"a": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(path)["a"], torch.ones(3))
    truncate(path)
    with pytest.raises(ValueError, match="could not be read as a PyTorch/safetensors checkpoint") as e:
        load_file(path)
    one_sentence(str(e.value))


def test_truncated_safetensors_is_one_sentence(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    truncate(path)
    with pytest.raises(ValueError, match=r"model.safetensors' could not be read as a PyTorch/safetensors checkpoint "
                                         r"\(Error while deserializing header") as e:
        load_file(path)
    one_sentence(str(e.value))


def test_a_directory_given_as_weights_names_the_run_file(tiny):
    _, adapter = tiny
    with pytest.raises(ValueError, match=f"is a directory, but a weights file is expected.*{adapter.name}"):
        load_file(adapter.parent)


def test_weights_that_do_not_match_the_config_are_a_value_error():
    model = GPT(Config(**TINY))
    other = GPT(Config(**{**TINY, "n_layer": 3}))
    with pytest.raises(ValueError, match="do not match the model config"):
        load_model_weights(model, other.state_dict())


def _hf_folder(d: Path) -> Path:
    d.mkdir()
    hf = config_to_hf(Config(name="tiny", **TINY))
    (d / "config.json").write_text(json.dumps(hf))
    return d


def test_convert_hf_reads_truncated_weights_as_one_sentence(tmp_path):
    from safetensors.torch import save_file

    st = _hf_folder(tmp_path / "st")
    save_file({"model.embed_tokens.weight": torch.randn(320, 64)}, str(st / "model.safetensors"))
    truncate(st / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors' could not be read as a PyTorch/safetensors checkpoint"):
        convert_hf_checkpoint(st)

    bin_ = _hf_folder(tmp_path / "bin")
    torch.save({"model.embed_tokens.weight": torch.randn(320, 64)}, bin_ / "pytorch_model.bin")
    truncate(bin_ / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin' could not be read as a PyTorch/safetensors checkpoint"):
        convert_hf_checkpoint(bin_)


# ---------------------------------------------------------------------------------------------- tokenizer files
@pytest.mark.parametrize("text, reason", [
    ('{"version": "1.0", "model": {', "EOF while parsing an object"),
    ('{"version": "1.0"}', "Model missing"),
])
def test_broken_tokenizer_json_is_one_sentence(tmp_path, text, reason):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match=f"tokenizer.json' could not be loaded by the tokenizers library "
                                         f"\\({reason}[^)]*\\); copy the tokenizer files from the original model"):
        Tokenizer(tmp_path)


def test_broken_sentencepiece_model_is_one_sentence(tmp_path):
    pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model' could not be loaded by the sentencepiece library"):
        Tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------- model_config.yaml
_SHAPE = "n_layer: 1\nvocab_size: 8\nblock_size: 8\nmlp_class_name: GptNeoxMLP\nnorm_class_name: LayerNorm\n"


@pytest.mark.parametrize("text, match", [
    ("n_layer: [\n", r"is not valid YAML \(.* at line 2, column 1\)"),
    ("garbage\n", "must hold a mapping of Config fields .* not a str"),
    ("- 1\n- 2\n", "must hold a mapping of Config fields .* not a list"),
    (_SHAPE + "n_embd: 64\nn_head: nine\n", "has an invalid value"),
    (_SHAPE + "n_embd: 64\nn_head: 4\nn_query_groups: 3\n", "n_head=4 must be a multiple of n_query_groups=3"),
    # emptied, or cut short: not the defaults' 4096-wide model (whose weights then "do not match")
    ("", r"is empty; fix it, or write it again by converting the checkpoint"),
    ("name: tiny\nblock_size: 128\nvocab_size: 300\n",
     r"lacks n_layer, n_embd, n_head, mlp_class_name, norm_class_name \(the file is cut short"),
])
def test_bad_model_config_names_the_file(tmp_path, text, match):
    (tmp_path / "model_config.yaml").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        Config.from_checkpoint(tmp_path)
    assert str(e.value).startswith(f"Model config {str(tmp_path / 'model_config.yaml')!r}")
    one_sentence(str(e.value))


@pytest.mark.parametrize("field", ["n_layer", "n_embd", "n_head", "vocab_size", "block_size", "mlp_class_name",
                                   "norm_class_name"])
def test_a_model_config_without_any_one_shape_field_is_refused(tmp_path, field):
    """Each of them: without it the default (a 50,254-token vocabulary, say) would be read, and the weights blamed."""
    data = yaml.safe_load(Config(name="tiny", **TINY).to_yaml())
    del data[field]
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=f"lacks {field} "):
        Config.from_checkpoint(tmp_path)


def test_unknown_config_fields_are_ignored_with_a_warning(tmp_path, capsys):
    """Files of other lit tools carry fields this model does not use: loaded, and the fields named (a typo shows)."""
    config = Config(name="tiny", **TINY)
    config.save(tmp_path)
    path = tmp_path / "model_config.yaml"
    path.write_text(path.read_text() + "n_layers: 2\n")
    assert Config.from_checkpoint(tmp_path) == config
    assert "field(s) this model does not use, ignored: 'n_layers' (did you mean 'n_layer'?)" in capsys.readouterr().err


def test_written_config_still_loads(tmp_path):
    config = Config(name="tiny", **TINY)
    config.save(tmp_path)
    assert Config.from_checkpoint(tmp_path) == config


# ---------------------------------------------------------------------------------------------- paths
def test_a_file_given_as_checkpoint_dir_says_to_pass_its_folder(tiny):
    base, _ = tiny
    weights = base / "lit_model.pth"
    expected = f"is a file, but a checkpoint directory .* is expected: pass the folder that holds it, {str(base)!r}"
    for load in (check_checkpoint_dir, Tokenizer, Config.from_checkpoint, GPT.from_checkpoint):
        with pytest.raises(ValueError, match=expected):
            load(weights)


def test_an_adapter_file_given_as_checkpoint_dir_says_adapter_path(tiny):
    _, adapter = tiny
    with pytest.raises(ValueError, match="is a fine-tuning output: pass the base model as --checkpoint_dir and this "
                                         "file as --adapter_path"):
        check_checkpoint_dir(adapter)


def test_a_finetuning_run_given_as_model_says_how_to_use_it(tiny):
    base, adapter = tiny
    run = adapter.parent
    expected = (f"{str(run)!r} is a fine-tuning run, not a model: pass `--checkpoint_dir {base} --adapter_path "
                f"{adapter}`")
    # chat builds the tokenizer first, generate/convert check the directory, training reads the config
    for load in (check_checkpoint_dir, Tokenizer, Config.from_checkpoint, GPT.from_checkpoint):
        with pytest.raises(ValueError) as e:
            load(run)
        assert str(e.value).startswith(expected)
        assert f"python scripts/merge_ether.py --adapter_path {adapter}" in str(e.value)
        one_sentence(str(e.value))
    assert ", or merge it first with" in str(e.value)
    # a full fine-tune has nothing to merge: the script makes it a model folder
    full = run.parent / "full-run"
    full.mkdir()
    (full / "lit_model_finetuned.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r", or make it a model folder first with `python scripts/merge_ether.py "
                                         r"--adapter_path .*lit_model_finetuned.pth`"):
        check_checkpoint_dir(full)
    # hyperparameters.yaml alone marks a run too (before its first weights are written)
    adapter.rename(run / "saved_elsewhere.pth")
    try:
        with pytest.raises(ValueError, match="is a fine-tuning run, not a model"):
            check_checkpoint_dir(run)
    finally:
        (run / "saved_elsewhere.pth").rename(adapter)


def test_an_ordinary_empty_folder_keeps_the_download_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="download it with"):
        check_checkpoint_dir(tmp_path)


def test_a_peft_adapter_folder_is_named_as_one(tmp_path):
    """What `PeftModel.save_pretrained` leaves: model-taking scripts and the conversion say what it is, rather than
    sending the user from one to the other."""
    from safetensors.torch import save_file

    peft = tmp_path / "peft_out"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "x"}')
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, peft / "adapter_model.safetensors")
    for check in (check_checkpoint_dir, convert_hf_checkpoint):
        with pytest.raises(ValueError, match="holds a PEFT adapter .*, not a model: pass its base model's folder as "
                                             "--checkpoint_dir and this folder as --adapter_path .*"
                                             "convert_peft_adapter.py import .*merge_and_unload"):
            check(peft)


def test_convert_hf_of_a_file_says_to_pass_the_folder(tmp_path):
    folder = _hf_folder(tmp_path / "hf")
    with pytest.raises(ValueError, match=f"is a file, but a Hugging Face model folder .* {str(folder)!r}"):
        convert_hf_checkpoint(folder / "config.json")


def test_output_folders_that_are_files_fail_before_any_work(tiny, tmp_path):
    base, _ = tiny
    existing = tmp_path / "a_file"
    existing.write_text("x")
    with pytest.raises(ValueError, match=f"--output_dir {str(existing)!r} is an existing file"):
        convert_lit_checkpoint(base, existing)
    with pytest.raises(ValueError, match=f"cannot be created because {str(existing)!r} is a file"):
        convert_lit_checkpoint(base, existing / "sub")
    # the GGUF file is not even opened: the output folder is checked first
    with pytest.raises(ValueError, match=f"--checkpoint_dir {str(existing)!r} is an existing file"):
        convert_gguf(tmp_path / "never_read.gguf", existing)


def test_a_directory_given_as_gguf_file(tmp_path):
    with pytest.raises(ValueError, match=f"GGUF path {str(tmp_path)!r} is a directory, but a .gguf file is "
                                         "expected"):
        open_gguf(tmp_path)
    (tmp_path / "model.Q4.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"such as '.*model\.Q4\.gguf'"):
        open_gguf(tmp_path)


@pytest.mark.parametrize("error", [FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError])
def test_run_cli_prints_user_os_errors_as_one_line(monkeypatch, capsys, error):
    def main() -> None:
        raise error(17, "File exists", "out")

    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: [Errno 17] File exists: 'out'\n"


@pytest.mark.slow
def test_scripts_print_one_line(tiny, tmp_path):
    base, _ = tiny
    existing = tmp_path / "a_file"
    existing.write_text("x")
    commands = [
        ["scripts/convert_gguf_checkpoint.py", "--gguf_path", str(tmp_path), "--checkpoint_dir", str(tmp_path / "o")],
        ["scripts/convert_gguf_checkpoint.py", "--gguf_path", str(existing), "--checkpoint_dir", str(existing)],
        ["scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(base), "--output_dir", str(existing)],
        ["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(existing)],
    ]
    for cmd in commands:
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 1, r.stderr
        lines = [line for line in r.stderr.splitlines() if "warn" not in line.lower()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


# ---------------------------------------------------------------------------------------------- --device
def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'foo' is not a device; use cpu, cuda, cuda:N"):
        resolve_device("foo")
    with pytest.raises(ValueError, match="--device 'meta' is not supported"):
        resolve_device("meta")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError) as e:
        resolve_device("cuda")
    assert str(e.value) == ("--device cuda was given but no CUDA GPU is available to this torch build; use "
                            "--device cpu.")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2 names GPU 2 but only 2 GPU\(s\) are visible; use cuda:0 "
                                         "to cuda:1"):
        resolve_device("cuda:2")


def test_a_missing_model_folder_names_the_flag_and_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # download.py's default folder: the hint names the repo id to download
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer("checkpoints/meta-llama/Llama-2-7b-hf")
    assert str(e.value) == (
        "--checkpoint_dir 'checkpoints/meta-llama/Llama-2-7b-hf' does not exist: download and convert a model into it "
        "with `python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf`, import a GGUF file with "
        "`python scripts/convert_gguf_checkpoint.py`, or pass the folder of a converted model.")
    with pytest.raises(FileNotFoundError, match=r"^--checkpoint_dir 'models/x/y' does not exist: .* --repo_id "
                                                r"ORG/NAME --checkpoint_dir models/x/y`"):
        Config.from_checkpoint("models/x/y")
    # a repo id, as litgpt takes it for checkpoints/<repo id>: download's folder named, or the command to make it
    with pytest.raises(FileNotFoundError) as e:
        Config.from_checkpoint("org/model")
    assert str(e.value) == (
        "--checkpoint_dir 'org/model' does not exist: if it is a repo id, download and convert it with `python "
        "scripts/download.py --repo_id org/model` (into 'checkpoints/org/model', the folder to pass); else pass the "
        "folder of a converted model, or import a GGUF file with `python scripts/convert_gguf_checkpoint.py`.")
    (tmp_path / "checkpoints" / "org" / "model").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        check_checkpoint_dir("org/model", flag="--io.checkpoint_dir")
    assert str(e.value) == ("--io.checkpoint_dir 'org/model' does not exist, but 'checkpoints/org/model' does (where "
                            "scripts/download.py --repo_id org/model puts it): pass --io.checkpoint_dir "
                            "checkpoints/org/model.")
    with pytest.raises(FileNotFoundError, match=r"^--checkpoint_dir 'checkpoints/o/m' does not exist: download the "
                                                r"model into it with `python scripts/download.py --repo_id o/m`, "
                                                r"which converts it too"):
        convert_hf_checkpoint("checkpoints/o/m")
    with pytest.raises(FileNotFoundError, match=r"^--io.checkpoint_dir 'x' does not exist"):
        check_checkpoint_dir("x", flag="--io.checkpoint_dir")
