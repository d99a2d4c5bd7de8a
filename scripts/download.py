"""Download a model from the Hugging Face Hub (and convert it to a lit checkpoint), or list the named models."""

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huggingface_hub import HfApi, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    HFValidationError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id  # noqa: E402
from jsonargparse.typing import SecretStr  # noqa: E402

from lit_gpt.config import configs  # noqa: E402
from lit_gpt.convert_hf import (  # noqa: E402
    TOKENIZER_FILES,
    ConversionError,
    config_from_hf,
    convert_hf_checkpoint,
    read_hf_config,
)
from lit_gpt.utils import error_chain, hub_unreachable, hub_unreachable_sentence, secret_text  # noqa: E402

# what a transformers model folder needs besides its weights
CONFIG_FILES = ["config.json", "generation_config.json"]


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says why and what to do, and never contains the token."""


def main(
    repo_id: Optional[str] = None,
    access_token: Optional[SecretStr] = None,
    from_safetensors: bool = True,
    tokenizer_only: bool = False,
    checkpoint_dir: Optional[Path] = None,
    convert_checkpoint: bool = True,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
) -> None:
    """Download a transformers model from the Hugging Face Hub into `checkpoints/<repo_id>` and convert it.

    Without --repo_id, prints the models lit_gpt has a named config for, one `org/name` per line (`python
    scripts/download.py | grep meta`). Any Hub repo of a supported type (llama, mistral, mixtral, qwen2, qwen2_moe,
    qwen3, qwen3_moe, phi, phi3, gemma, gemma2, gemma3_text, gemma3's text model, gpt2, gpt_neox) works, listed or
    not: the conversion reads the repo's own config.json.

    Only what a lit checkpoint needs is fetched: config.json, generation_config.json, the tokenizer files and the
    weights, either the safetensors files or (when the repo has none, or with --from_safetensors false) the
    pytorch_model*.bin files. After the download, `scripts/convert_hf_checkpoint.py` runs on the folder unless
    --convert_checkpoint false, in which case the command to run is printed.

    Args:
        repo_id: The Hub repository, e.g. meta-llama/Llama-2-7b-hf. Without it (or with `list`), the models
            lit_gpt has a named config for are listed, one org/name per line; other repos of a supported type work
            too.
        access_token: A Hugging Face token, needed for gated models (Llama, some Mistral repos) once you accepted
            their license on the Hub. Defaults to the HF_TOKEN environment variable (then to `hf auth login`).
        from_safetensors: Download the safetensors weights (falls back to .bin when the repo has none); false
            forces the pytorch_model*.bin files.
        tokenizer_only: Download the tokenizer files (and generation_config.json) only.
        checkpoint_dir: Where to put the files; default checkpoints/<repo_id>.
        convert_checkpoint: Convert the download to lit_model.pth + model_config.yaml right away (as
            scripts/convert_hf_checkpoint.py does); false prints that command instead.
        dtype: Dtype of the converted weights; by default they keep the dtype they are stored in.
    """
    if repo_id is None or repo_id == "list":  # (litgpt's `download list`; no Hub repo is named "list")
        try:
            for c in configs:
                print(f"{c['hf_config']['org']}/{c['hf_config']['name']}")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head` closed the pipe: the reader has what it wanted
            from lit_gpt.cli import silence_stdout
            silence_stdout()
        return

    check_repo_id(repo_id)
    # typed SecretStr so that --print_config masks it
    token = secret_text(access_token) or os.environ.get("HF_TOKEN") or None
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path("checkpoints") / repo_id
    with hub_errors(repo_id, token):
        if tokenizer_only:
            patterns = list(TOKENIZER_FILES) + ["generation_config.json"]
        else:
            files = [s.rfilename for s in (HfApi(token=token).model_info(repo_id).siblings or [])]
            weights = weight_files(files, repo_id, from_safetensors)
            if convert_checkpoint:
                # config.json first: a model the conversion would refuse is refused before gigabytes of weights
                snapshot_download(repo_id, local_dir=checkpoint_dir, allow_patterns=CONFIG_FILES, token=token)
                check_convertible(checkpoint_dir / "config.json", repo_id)
            patterns = CONFIG_FILES + list(TOKENIZER_FILES) + weights
        snapshot_download(repo_id, local_dir=checkpoint_dir, allow_patterns=patterns, token=token)
    print(f"Downloaded {repo_id} to {checkpoint_dir}", file=sys.stderr)

    if tokenizer_only:
        return
    if convert_checkpoint:
        config = convert_hf_checkpoint(checkpoint_dir, dtype=dtype, model_name=repo_id)
        print(f"Converted {config.name!r} into {checkpoint_dir / 'lit_model.pth'}", file=sys.stderr)
    else:
        print(
            "Next, convert it with:\n"
            f"  python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}"
            + (f" --dtype {dtype}" if dtype else "")
        )


def check_convertible(hf_config_path: Path, repo_id: str) -> None:
    """Refuse, before the weights come down, a repo whose config.json the conversion would refuse (an unsupported
    model type or RoPE scaling, ...); a repo without one is refused by the conversion itself."""
    if not hf_config_path.is_file():
        return
    try:
        config_from_hf(read_hf_config(hf_config_path), name=repo_id)
    except ConversionError as e:
        raise ConversionError(f"{str(e).rstrip('.')}; only the config was downloaded (--convert_checkpoint false "
                              "downloads the weights without converting them).") from None


def check_repo_id(repo_id: str) -> None:
    """Refuse a --repo_id the Hub cannot name (checked by huggingface_hub's own rule) before any request."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise DownloadError(
            f"--repo_id {repo_id!r} is not a Hub model id: give it as org/name, e.g. meta-llama/Llama-2-7b-hf "
            "(`python scripts/download.py` lists the named models)."
        ) from None


def weight_files(files: list[str], repo_id: str, from_safetensors: bool) -> list[str]:
    """The weight files to fetch among a repo's files: top-level transformers weights only (not the `original/`
    Meta checkpoints or Mistral's `consolidated.safetensors`, which duplicate them in another layout)."""
    top = [f for f in files if "/" not in f]
    safetensors = _loaded_files(top, "model.safetensors", [
        f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")])
    bins = _loaded_files(top, "pytorch_model.bin", [
        f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")])
    if from_safetensors and safetensors:
        return safetensors
    if not from_safetensors and bins:
        return bins
    if from_safetensors and bins:
        print(f"{repo_id} has no safetensors weights; downloading its pytorch_model*.bin files.", file=sys.stderr)
        return bins
    if safetensors:
        raise DownloadError(
            f"{repo_id} has no pytorch_model*.bin weights, only safetensors: run again without "
            "--from_safetensors false."
        )
    raise DownloadError(
        f"{repo_id} has no transformers weights (model*.safetensors or pytorch_model*.bin) at its top level; "
        "pick the repo of the transformers version of the model."
    )


def _loaded_files(top: list[str], single: str, candidates: list[str]) -> list[str]:
    """Among a repo's `candidates` weight files, those transformers loads: `single` when the repo has it, else the
    index and the shards it names (by their standard names), else all of them. Not `adapter_model.safetensors`,
    `model.fp16.safetensors` and the like next to them, which would be downloaded for nothing (and converted
    into the model if the conversion read them)."""
    if single in top:
        return [single]
    index = f"{single}.index.json"
    if index in top:
        stem, suffix = single.rsplit(".", 1)
        shards = [f for f in candidates if re.fullmatch(rf"{stem}-\d+-of-\d+\.{suffix}", f)]
        return [index, *(shards or candidates)]
    return candidates


@contextmanager
def hub_errors(repo_id: str, token: Optional[str]) -> Iterator[None]:
    """Turn a Hub failure into one `DownloadError` sentence, without the token and without the Hub's own text."""
    try:
        yield
    except DownloadError:
        raise
    except Exception as error:
        message = explain_hub_error(error, repo_id, token is not None)
        if message is None:
            raise
        if token:
            message = message.replace(token, "***")
        raise DownloadError(message) from None


def explain_hub_error(error: BaseException, repo_id: str, has_token: bool) -> Optional[str]:
    """One sentence for a failed Hub call, or None for an error that is not the Hub's (a bug: keep the traceback).

    snapshot_download re-raises some failures as a local-cache miss, so the chain of causes is searched for the most
    specific error first.
    """
    chain = error_chain(error)
    url = f"https://huggingface.co/{repo_id}"
    token_hint = "pass --access_token or set HF_TOKEN" if not has_token else "check that your token is valid"
    for e in chain:
        if isinstance(e, GatedRepoError):
            return (
                f"{repo_id} is a gated repository: accept its license at {url} while logged in, then {token_hint} "
                "with a token of that account."
            )
    for e in chain:
        if isinstance(e, RevisionNotFoundError):
            return f"{repo_id} has no such revision on the Hugging Face Hub."
        if isinstance(e, RepositoryNotFoundError):
            return (
                f"{repo_id} was not found on the Hugging Face Hub (or it is private and you have no access): check "
                f"the repo id (`python scripts/download.py` lists known models), or {token_hint}."
            )
    for e in chain:
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 401:
                return f"The Hugging Face Hub rejected the request for {repo_id} (401): {token_hint}."
            return f"The Hugging Face Hub answered HTTP {status} for {repo_id}; try again later."
    if hub_unreachable(error):  # (every answer of the Hub returned above)
        return f"{hub_unreachable_sentence(repo_id)} and try again."
    return None


def inline_config_error(args: list[str]) -> Optional[str]:
    """The one-line error for a `--config` given as YAML text that does not parse, or None.

    jsonargparse's own error repeats the text, which may hold the access token; this one says only where it broke.
    """
    import yaml

    from lit_gpt.cli import config_values

    for _, text, _ in config_values(args):
        if Path(text).is_file():
            continue  # a config file: jsonargparse names the file, not its contents
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "not valid YAML"
            return (f"--config: the YAML text does not parse ({problem}{where}); it is not repeated here because it "
                    "may hold your access token (see --help)")
    return None


if __name__ == "__main__":
    from lit_gpt.cli import run_cli

    run_cli(main, errors=(DownloadError,), arg_check=inline_config_error)
