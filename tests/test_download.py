"""scripts/download.py with huggingface_hub mocked: the model listing, which files are fetched, the token, and the
one-sentence errors (which never contain the token)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from jsonargparse.typing import SecretStr

from lit_gpt.config import configs

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_TOKEN_must_never_show_0123456789"


def load_download():
    spec = importlib.util.spec_from_file_location("_script_download", ROOT / "scripts" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


download = load_download()

LLAMA_FILES = [
    ".gitattributes", "README.md", "LICENSE.txt", "config.json", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "original/consolidated.00.pth", "original/params.json",
]


class FakeHub:
    """Stands in for `HfApi` and `snapshot_download`; records what the script asked for."""

    def __init__(self, files, error=None, error_in="snapshot_download", contents=None):
        self.files, self.error, self.error_in = files, error, error_in
        self.contents = contents or {}  # name -> text that snapshot_download writes when the patterns ask for it
        self.api_tokens, self.downloads = [], []

    def api(self, token=None):
        self.api_tokens.append(token)
        return self

    def model_info(self, repo_id):
        if self.error is not None and self.error_in == "model_info":
            raise self.error
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in self.files])

    def snapshot_download(self, repo_id, **kwargs):
        if self.error is not None and self.error_in == "snapshot_download":
            raise self.error
        self.downloads.append(dict(repo_id=repo_id, **kwargs))
        for name, text in self.contents.items():
            if name in kwargs["allow_patterns"]:
                Path(kwargs["local_dir"]).mkdir(parents=True, exist_ok=True)
                (Path(kwargs["local_dir"]) / name).write_text(text)
        return str(kwargs["local_dir"])


@pytest.fixture
def hub(monkeypatch):
    def install(files=LLAMA_FILES, **kwargs):
        fake = FakeHub(files, **kwargs)
        monkeypatch.setattr(download, "HfApi", fake.api)
        monkeypatch.setattr(download, "snapshot_download", fake.snapshot_download)
        return fake

    monkeypatch.delenv("HF_TOKEN", raising=False)
    return install


def http_error(cls, status, message="boom"):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(message, response=response)


def test_listing_prints_every_named_model(capsys):
    download.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{c['hf_config']['org']}/{c['hf_config']['name']}" for c in configs]
    assert "meta-llama/Llama-2-7b-hf" in lines and "EleutherAI/pythia-160m" in lines
    download.main(repo_id="list")  # litgpt's `download list`
    assert capsys.readouterr().out.splitlines() == lines


def test_safetensors_chosen_and_only_what_lit_needs(hub, tmp_path):
    fake = hub()
    download.main(repo_id="meta-llama/Llama-2-7b-hf", checkpoint_dir=tmp_path, convert_checkpoint=False)
    (call,) = fake.downloads
    patterns = call["allow_patterns"]
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "config.json", "tokenizer.model", "tokenizer.json"} <= set(patterns)
    assert not [p for p in patterns if p.endswith(".bin") or p.startswith("original/") or p.endswith(".md")]
    assert call["local_dir"] == tmp_path


def test_bin_forced_or_as_fallback(hub, tmp_path, capsys):
    fake = hub()
    download.main(repo_id="o/m", from_safetensors=False, checkpoint_dir=tmp_path, convert_checkpoint=False)
    weights = [p for p in fake.downloads[0]["allow_patterns"] if "model" in p and p != "tokenizer.model"]
    assert sorted(weights) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                               "pytorch_model.bin.index.json"]

    bin_only = [f for f in LLAMA_FILES if "safetensors" not in f]
    fake = hub(files=bin_only)
    download.main(repo_id="o/m", checkpoint_dir=tmp_path, convert_checkpoint=False)
    assert "pytorch_model-00001-of-00002.bin" in fake.downloads[0]["allow_patterns"]
    assert "has no safetensors weights" in capsys.readouterr().err


def test_mistral_consolidated_file_is_skipped(hub, tmp_path):
    files = ["config.json", "consolidated.safetensors", "model-00001-of-00003.safetensors",
             "model.safetensors.index.json", "params.json", "tokenizer.model.v3"]
    fake = hub(files=files)
    download.main(repo_id="mistralai/Mistral-7B-v0.3", checkpoint_dir=tmp_path, convert_checkpoint=False)
    patterns = fake.downloads[0]["allow_patterns"]
    assert "model-00001-of-00003.safetensors" in patterns and "consolidated.safetensors" not in patterns


def test_repo_without_weights_is_a_clear_error(hub, tmp_path):
    hub(files=["config.json", "README.md", "original/consolidated.00.pth"])
    with pytest.raises(download.DownloadError, match="has no transformers weights"):
        download.main(repo_id="o/m", checkpoint_dir=tmp_path)
    hub(files=["config.json", "model.safetensors"])
    with pytest.raises(download.DownloadError, match="only safetensors"):
        download.main(repo_id="o/m", checkpoint_dir=tmp_path, from_safetensors=False)


def test_tokenizer_only(hub, tmp_path):
    fake = hub()
    download.main(repo_id="o/m", tokenizer_only=True, checkpoint_dir=tmp_path)
    patterns = fake.downloads[0]["allow_patterns"]
    assert "tokenizer.json" in patterns and "tokenizer.model" in patterns
    assert not [p for p in patterns if "safetensors" in p or p.endswith(".bin") or p == "config.json"]


def test_default_checkpoint_dir_and_printed_next_step(hub, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    fake = hub()
    download.main(repo_id="meta-llama/Llama-2-7b-hf", convert_checkpoint=False, dtype="bfloat16")
    assert fake.downloads[0]["local_dir"] == Path("checkpoints/meta-llama/Llama-2-7b-hf")
    out = capsys.readouterr().out
    assert "python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf" in out
    assert "--dtype bfloat16" in out


def test_download_then_convert_by_default(hub, monkeypatch, tmp_path):
    fake = hub()
    converted = []
    monkeypatch.setattr(
        download, "convert_hf_checkpoint",
        lambda d, dtype=None, model_name=None: converted.append((d, dtype, model_name)) or SimpleNamespace(name="x"),
    )
    download.main(repo_id="meta-llama/Llama-2-7b-hf", checkpoint_dir=tmp_path)
    # config.json first (checked before the weights come down), then the rest
    assert [d["allow_patterns"] for d in fake.downloads][0] == ["config.json", "generation_config.json"]
    assert "model-00001-of-00002.safetensors" in fake.downloads[1]["allow_patterns"]
    assert converted == [(tmp_path, None, "meta-llama/Llama-2-7b-hf")]


@pytest.mark.parametrize("config, match", [
    ('{"model_type": "gemma", "hidden_size": 64}', "model_type 'gemma'"),
    ('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, '
     '"num_attention_heads": 4, "vocab_size": 128, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}', "yarn"),
    ("{not json", "is not valid JSON"),
])
def test_a_model_the_conversion_refuses_is_refused_before_its_weights(hub, tmp_path, config, match):
    from lit_gpt.convert_hf import ConversionError

    fake = hub(contents={"config.json": config})
    with pytest.raises(ConversionError, match=match) as e:
        download.main(repo_id="google/gemma-2b", checkpoint_dir=tmp_path)
    assert "only the config was downloaded" in str(e.value) or "JSON" in str(e.value)
    (call,) = fake.downloads
    assert not [p for p in call["allow_patterns"] if "safetensors" in p or p.endswith(".bin")]
    # without converting, the user gets what they asked for
    fake = hub(contents={"config.json": config})
    download.main(repo_id="google/gemma-2b", checkpoint_dir=tmp_path, convert_checkpoint=False)
    assert len(fake.downloads) == 1 and "model-00001-of-00002.safetensors" in fake.downloads[0]["allow_patterns"]


def test_token_from_flag_or_hf_token(hub, monkeypatch, tmp_path, capsys):
    fake = hub()
    download.main(repo_id="o/m", access_token=TOKEN, checkpoint_dir=tmp_path, convert_checkpoint=False)
    assert fake.api_tokens == [TOKEN] and fake.downloads[0]["token"] == TOKEN

    fake = hub()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    download.main(repo_id="o/m", checkpoint_dir=tmp_path, convert_checkpoint=False)
    assert fake.api_tokens == [TOKEN] and fake.downloads[0]["token"] == TOKEN
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize(
    "error, where, expected",
    [
        (http_error(GatedRepoError, 403, f"403 for token {TOKEN}"), "snapshot_download", "is a gated repository"),
        (http_error(RepositoryNotFoundError, 404), "model_info", "was not found on the Hugging Face Hub"),
        (http_error(HfHubHTTPError, 401, f"Invalid credentials {TOKEN}"), "model_info", "rejected the request"),
        (http_error(HfHubHTTPError, 503), "snapshot_download", "answered HTTP 503"),
        (LocalEntryNotFoundError("cannot find the requested files"), "snapshot_download", "Could not reach"),
        (ConnectionError("[Errno -2] Name or service not known"), "model_info", "Could not reach"),
    ],
)
def test_hub_failures_are_one_sentence_without_the_token(hub, tmp_path, capsys, error, where, expected):
    hub(error=error, error_in=where)
    with pytest.raises(download.DownloadError) as info:
        download.main(repo_id="meta-llama/Llama-2-7b-hf", access_token=TOKEN, checkpoint_dir=tmp_path)
    message = str(info.value)
    assert expected in message and "meta-llama/Llama-2-7b-hf" in message
    assert TOKEN not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # the Hub's own text is not shown
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_gated_error_behind_a_cache_miss_is_still_recognised(hub, tmp_path):
    """snapshot_download reports a failed Hub call as a local-cache miss whose cause is the real error."""
    try:
        try:
            raise http_error(GatedRepoError, 403)
        except GatedRepoError as gated:
            raise LocalEntryNotFoundError("not in cache") from gated
    except LocalEntryNotFoundError as wrapped:
        error = wrapped
    hub(error=error)
    with pytest.raises(download.DownloadError, match="is a gated repository.*pass --access_token or set HF_TOKEN"):
        download.main(repo_id="meta-llama/Llama-2-7b-hf", checkpoint_dir=tmp_path)


def test_a_bug_is_not_disguised_as_a_hub_error(hub, tmp_path):
    hub(error=TypeError("unexpected keyword"), error_in="snapshot_download")
    with pytest.raises(TypeError):
        download.main(repo_id="o/m", checkpoint_dir=tmp_path)


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "download.py"), *args], capture_output=True, text=True, env=env,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_lists_models_without_arguments():
    done = _run()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(configs) and "meta-llama/Llama-2-7b-hf" in lines
    assert all(line.count("/") == 1 for line in lines)


@pytest.mark.slow
def test_cli_offline_error_and_masked_token(tmp_path):
    # HF_HUB_OFFLINE makes huggingface_hub fail before any network access, as on an offline machine
    done = _run("--repo_id", "o/m", f"--access_token={TOKEN}", "--checkpoint_dir", str(tmp_path),
                env_extra={"HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert done.stderr.startswith("error: Could not reach the Hugging Face Hub") and "Traceback" not in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    shown = _run("--repo_id", "o/m", f"--access_token={TOKEN}", "--print_config")
    assert shown.returncode == 0 and TOKEN not in shown.stdout and "access_token: '**********'" in shown.stdout


def test_only_the_files_transformers_loads_are_fetched(hub, tmp_path):
    """Next to model.safetensors (or an index), variants and adapters are not the model: transformers skips them."""
    extras = ["adapter_model.safetensors", "model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors"]
    cases = [
        (["model.safetensors", *extras], True, ["model.safetensors"]),
        (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
          *extras], True,
         ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
        (["pytorch_model.bin", "pytorch_model.fp16.bin", "model.safetensors"], False, ["pytorch_model.bin"]),
        (["weights.safetensors"], True, ["weights.safetensors"]),  # nothing standard: what there is
    ]
    for files, from_safetensors, expected in cases:
        assert download.weight_files(["config.json", *files], "o/m", from_safetensors) == expected


def test_a_token_that_is_not_text_is_one_sentence(hub, tmp_path):
    hub(error=LocalEntryNotFoundError("cannot find the requested files"))
    for value, kind in ((12345, "number"), (["hf_x"], "list"), ({"tok": TOKEN}, "mapping")):
        with pytest.raises(ValueError) as info:
            download.main(repo_id="o/m", access_token=SecretStr(value), checkpoint_dir=tmp_path)
        assert str(info.value).startswith(f"--access_token must be text (a token such as hf_...), but it was read "
                                           f"as a YAML {kind}")
        assert TOKEN not in str(info.value)


def test_an_inline_config_that_does_not_parse_is_not_echoed():
    args = ["--config", f"{{access_token: {TOKEN}, repo_id: ["]
    message = download.inline_config_error(args)
    assert message.startswith("--config: the YAML text does not parse") and TOKEN not in message
    assert download.inline_config_error([f"--config=access_token: {TOKEN}\n bad: ["]) is not None
    assert download.inline_config_error(["--config", f"{{access_token: {TOKEN}}}"]) is None
    assert download.inline_config_error(["--repo_id", "{not: [yaml"]) is None


@pytest.mark.slow
def test_cli_config_errors_never_show_the_token(tmp_path):
    done = _run("--config", f"{{access_token: {TOKEN}, repo_id: [")
    assert done.returncode == 2 and TOKEN not in done.stdout + done.stderr
    assert done.stderr.startswith("error: --config: the YAML text does not parse")
    (tmp_path / "c.yaml").write_text("repo_id: o/m\naccess_token: 12345\n")
    done = _run("--config", str(tmp_path / "c.yaml"), "--checkpoint_dir", str(tmp_path / "x"),
                env_extra={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: --access_token must be text (a token such as hf_...), but it was read as "
                                   "a YAML number: put it in quotes in the --config file.")


@pytest.mark.parametrize("repo_id", ["a/b/c", "org/name with space", "/model"])
def test_a_repo_id_the_hub_cannot_name_is_refused_before_any_request(hub, tmp_path, repo_id):
    fake = hub()
    with pytest.raises(download.DownloadError, match=r"--repo_id .* is not a Hub model id: give it as org/name"):
        download.main(repo_id=repo_id, checkpoint_dir=tmp_path)
    assert fake.api_tokens == [] and fake.downloads == []
