"""Evaluate a lit checkpoint (merged, or base + adapter) on lm-evaluation-harness tasks."""

import os
import re
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.cli import run_cli  # noqa: E402

Precision = Literal["32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]
# the reference code's evaluation set (lm-eval 0.3 names, mapped to lm-eval 0.4's with a printed note)
DEFAULT_TASKS = ("arc_challenge", "piqa", "hellaswag", "hendrycksTest-*")
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class TaskDataError(ValueError):
    """A task's data could not be loaded (run_cli prints it as one line)."""


def main(
    checkpoint_dir: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    eval_tasks: Optional[Union[str, list[str]]] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 16,
    include_path: Optional[Path] = None,
    metadata: Optional[dict[str, Any]] = None,
    save_filepath: Union[bool, str, None] = None,
    precision: Optional[Precision] = None,
    device: Optional[str] = None,
    seed: int = 1234,
    max_length: Optional[int] = None,
    bootstrap_iters: int = 100000,
    apply_chat_template: bool = False,
    system_instruction: Optional[str] = None,
    fewshot_as_multiturn: Optional[bool] = None,
    gen_kwargs: Optional[Union[str, dict[str, Any]]] = None,
    log_samples: bool = False,
    quantize: Optional[str] = None,
) -> dict:
    """Run lm-eval tasks on a lit checkpoint, write lm-eval's results JSON and print its results table.

    The results JSON goes to --save_filepath, by default to a new file in the model's folder:
    <folder>/eval/results_<UTC time YYYY-MM-DDTHH-MM-SS>.json, where <folder> is the fine-tuning run of
    --adapter_path (the folder holding its hyperparameters.yaml, else the adapter file's own) or else
    --checkpoint_dir. An earlier file is never overwritten, and a folder that cannot be written is reported before
    the model is loaded.

    For example, the offline quickstart's held-out set: `python eval/lm_eval_harness.py --checkpoint_dir out/merged
    --include_path eval/tasks/quickstart --eval_tasks quickstart`; two built-in tasks on a base model plus an
    unmerged adapter: `... --checkpoint_dir checkpoints/base --adapter_path out/run/lit_model_ether_finetuned.pth
    --eval_tasks arc_easy,piqa`.

    Args:
        checkpoint_dir: A lit checkpoint directory: a merged fine-tuned model (scripts/merge_ether.py,
            scripts/merge_lora.py), or the base model of --adapter_path (default with --adapter_path: the base model
            its run recorded).
        adapter_path: An adapter file from fine-tuning (lit_model_ether_finetuned.pth, lit_model_lora_finetuned.pth,
            or a .safetensors one `save_adapters` wrote), evaluated unmerged on top of --checkpoint_dir, or a Hugging
            Face PEFT adapter folder (LoRA, OFT, or HRA as an export writes it), imported in memory for
            --checkpoint_dir; or a full fine-tuning lit_model_finetuned.pth.
        eval_tasks: lm-eval task or group names: one name (--eval_tasks arc_easy), several separated by commas
            (--eval_tasks arc_easy,piqa) or a list (--eval_tasks "[arc_easy, piqa]", or a YAML list in --config);
            --eval_tasks+ NAME adds one to those given before it. Glob patterns work ("mmlu_*"). Default: the
            reference code's set, arc_challenge, piqa, hellaswag and hendrycksTest-* (MMLU). Its lm-eval 0.3 names
            are mapped with a printed note: truthfulqa_mc -> truthfulqa_mc1 and truthfulqa_mc2,
            hendrycksTest-<subject> -> mmlu_<subject>. lm-eval's built-in tasks download their data from the Hugging
            Face Hub.
        num_fewshot: Few-shot examples per prompt (default: each task's own setting, else 0).
        limit: Evaluate only this many documents per task (a number below 1 is a fraction). For testing only.
        batch_size: Sequences per forward pass.
        include_path: A folder of local task YAMLs (e.g. eval/tasks/quickstart), searched before lm-eval's own tasks.
        metadata: Settings for the tasks, as JSON: merged into every task's `metadata`, which lm-eval passes to
            a task's data loading function, e.g. --metadata '{"data_file": "data/quickstart/test.jsonl"}' for the
            quickstart task.
        save_filepath: Write lm-eval's results JSON (`results` -> task -> metric) to this file, replacing one that
            is there. Default (or true): a new results_<UTC time>.json in the eval/ folder of the fine-tuning run of
            --adapter_path, else of --checkpoint_dir (see above); false writes no file.
        precision: "bf16-true", "32-true", ...; default bf16-true on a GPU that supports it, else 32-true.
        device: "cpu", "cuda", "cuda:1", ...; default the first GPU if there is one.
        seed: Seed for sampling, few-shot example selection and every other random choice lm-eval makes.
        max_length: Context length in tokens (default: the model's block_size).
        bootstrap_iters: Bootstrap resamples for the standard errors of non-mean metrics (0 skips them).
        apply_chat_template: Write every prompt in the checkpoint's chat template (as lm-eval's
            --apply_chat_template does; for instruction-tuned chat models).
        system_instruction: A system message put before every prompt (in the chat template's system turn with
            --apply_chat_template, else as text before the prompt).
        fewshot_as_multiturn: With --apply_chat_template, give the few-shot examples as earlier user/assistant
            turns (default: true with --apply_chat_template, as lm-eval does).
        gen_kwargs: Generation settings for every generation task, overriding the tasks' own: lm-eval's
            "temperature=0.7,do_sample=True" form or a JSON object. This backend applies until, max_gen_toks,
            do_sample, temperature, top_k and top_p; others are refused.
        log_samples: Also write every document's prompt(s), answers and scores, one JSON Lines file per task next
            to the results JSON (<its name without .json>_samples_<task>.jsonl), to inspect or compare runs.
        quantize: `nf4` (QLoRA's 4-bit NormalFloat, 0.56 bytes per weight), `nf4-dq` (with QLoRA's double
            quantization, 0.52) or `int8` (1 byte): keep the linear weights of the transformer blocks,
            adapted ones too, in that format (`lit_gpt/quantize.py`), for a model that would not fit on the
            device otherwise; each weight is decoded at every forward pass, so tokens come slower.
    """
    import json

    from lit_gpt.merge import checkpoint_dir_for
    from lit_gpt.quantize import check_kind
    from lit_gpt.utils import atomic_write_text, check_output_file, resolve_device

    checkpoint_dir = checkpoint_dir_for(checkpoint_dir, adapter_path)
    names = task_names(eval_tasks)
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}.")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be 0 or more, got {num_fewshot}.")
    # found now, not after hours of evaluation
    results_dir = None  # the default folder, where a new file is named at the end
    if isinstance(save_filepath, (str, Path)):  # (a str keeps the `/` that says `new/folder/` is a folder)
        save_filepath = check_output_file(save_filepath, "--save_filepath", example="results.json")
    elif save_filepath is False:
        if log_samples:
            raise ValueError("--log_samples writes its files next to the results JSON, which --save_filepath false "
                             "turns off: drop one of the two.")
    else:
        results_dir = default_results_dir(checkpoint_dir, adapter_path)
    if fewshot_as_multiturn and not apply_chat_template:
        raise ValueError("--fewshot_as_multiturn true needs --apply_chat_template true (the turns are the chat "
                         "template's).")
    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = apply_chat_template
    torch_device = resolve_device(device)
    check_kind(quantize)
    # the offline switches the user set, which an unreachable-Hub error then names
    switched_off = [k for k in OFFLINE_SWITCHES if os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")]

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from lit_gpt.lm_eval import LitGPTLM, build_task_manager, check_gen_kwargs, resolve_tasks, top_level_items

    if isinstance(gen_kwargs, str):
        from lm_eval.utils import simple_parse_args_string

        gen_kwargs = simple_parse_args_string(gen_kwargs)
    if gen_kwargs:
        check_gen_kwargs(gen_kwargs, "--gen_kwargs")

    task_manager = build_task_manager(include_path, names=names, metadata=metadata)
    notes: list[str] = []
    names = resolve_tasks(names, task_manager, notes)
    for note in notes:
        print(note, file=sys.stderr)

    # lm-eval seeds before it loads the tasks: a task that shuffles its choices while its documents are processed
    # (GPQA's zero-shot variants, ...) then gets the same order on every machine, the one lm-eval's own runs get
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(seed, verbose=False)  # Python's, NumPy's and torch's generators, as simple_evaluate's seeds
    # the tasks (and their data) are loaded before the model, so a missing dataset is reported in seconds
    with quiet_data_file_hint(own_tasks(task_manager)):
        loaded = _load_tasks(task_manager, names, switched_off)
    for name, task in _leaf_tasks(loaded):  # refused now rather than after the tasks before it have run
        if getattr(task, "OUTPUT_TYPE", None) == "generate_until":  # (--gen_kwargs updates the task's own)
            check_gen_kwargs({**(task.config.generation_kwargs or {}), **(gen_kwargs or {})},
                             f"Task {name!r}'s generation_kwargs")
    tasks = top_level_items(loaded)

    model = LitGPTLM(checkpoint_dir=checkpoint_dir, adapter_path=adapter_path, batch_size=batch_size,
                     device=torch_device, precision=precision, max_length=max_length, quantize=quantize)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=task_manager, num_fewshot=num_fewshot, limit=limit,
        bootstrap_iters=bootstrap_iters, log_samples=log_samples, apply_chat_template=apply_chat_template,
        system_instruction=system_instruction, fewshot_as_multiturn=fewshot_as_multiturn, gen_kwargs=gen_kwargs,
        # (seeded above, before the tasks were loaded: not again here)
        random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=seed,
        # only recorded (in the results' `config`) for an already built model
        batch_size=model.batch_size, device=str(model.device),
    )
    # recorded as lm-eval's own CLI records them (its evaluation tracker's fields), so two runs can be told apart
    results["config"].update(apply_chat_template=apply_chat_template, system_instruction=system_instruction,
                             fewshot_as_multiturn=fewshot_as_multiturn,
                             chat_template=model.chat_template(apply_chat_template),
                             random_seed=seed, numpy_seed=seed, torch_seed=seed)  # (seeded here, not by lm-eval)
    # saved before the tables are printed (an error there, or a closed stdout, does not lose the evaluation), the
    # small results JSON before the samples; a file that cannot be written (a full disk) still lets the tables show.
    # Where they went is said after the tables, where it is seen at the end of a long run.
    not_saved, saved = None, []
    if save_filepath is not False:
        samples = results.pop("samples", None) or {}
        try:
            if results_dir is not None:
                save_filepath = new_results_file(results_dir)
            else:
                save_filepath.parent.mkdir(parents=True, exist_ok=True)
            try:
                atomic_write_text(save_filepath, json.dumps(results, indent=2, default=handle_non_serializable))
            except BaseException:
                if results_dir is not None:  # (the empty file that reserved the name)
                    save_filepath.unlink(missing_ok=True)
                raise
            saved.append(f"Saved results to {save_filepath}")
            for task_name, rows in samples.items():
                path = samples_path(save_filepath, task_name)
                atomic_write_text(path, "".join(json.dumps(row, default=handle_non_serializable) + "\n"
                                                for row in rows))
                saved.append(f"Saved {len(rows)} samples of {task_name} to {path}")
        except OSError as e:
            not_saved = e
        if samples:
            results["samples"] = samples
    try:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    finally:  # (stderr: also when stdout was closed)
        for line in saved:
            print(line, file=sys.stderr)
    if not_saved is not None:  # (run_cli says it in one line, after the tables)
        raise not_saved
    return results


def default_results_dir(checkpoint_dir: Path, adapter_path: Optional[Path]) -> Path:
    """The folder the results JSON goes to without --save_filepath: `eval/` in the fine-tuning run of
    `adapter_path` (else beside the adapter file), or in `checkpoint_dir`. Refused in one sentence, before anything
    is evaluated, when it cannot be written; not checked when the model's folder does not exist (loading it fails
    anyway, with an error that names it)."""
    from lit_gpt.merge import find_run_dir

    if adapter_path is not None:
        from lit_gpt.adapters.state import peft_folder

        folder = peft_folder(adapter_path) or find_run_dir(adapter_path) or Path(adapter_path).parent
    else:
        folder = Path(checkpoint_dir)
    results_dir = folder / "eval"
    if not folder.is_dir():
        return results_dir
    for p in (results_dir, folder):  # the nearest existing one is the one written into
        if not p.exists():
            continue
        why = None
        if not p.is_dir():
            why = f"{str(p)!r} is a file, not a folder"
        elif not os.access(p, os.W_OK | os.X_OK):
            why = f"there is no permission to write in {str(p)!r}"
        elif hasattr(os, "statvfs") and os.statvfs(p).f_flag & os.ST_RDONLY:
            why = f"{str(p)!r} is on a read-only file system"
        if why is not None:
            raise ValueError(f"The results JSON cannot be written to its default folder {str(results_dir)!r} "
                             f"because {why}; pass --save_filepath with a file you can write (or --save_filepath "
                             "false to write none).")
        break
    return results_dir


def new_results_file(results_dir: Path, now: Optional[datetime] = None) -> Path:
    """A new, empty `results_<UTC time>.json` in `results_dir` (the time `now`, default the current one), created
    here so that no other run takes the name: when the name is taken (a run finished in the same second), `_2`,
    `_3`, ... is added to it instead of the earlier file being replaced."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "results_" + (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    for n in range(1, 1000):
        path = results_dir / (f"{stem}.json" if n == 1 else f"{stem}_{n}.json")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{str(results_dir)!r} already holds 999 results files named {stem}*.json; pass "
                          "--save_filepath.")


def samples_path(save_filepath: Path, task_name: str) -> Path:
    """Where --log_samples writes a task's samples: beside the results JSON, named after it and the task."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_name)
    return save_filepath.with_name(f"{save_filepath.stem}_samples_{safe}.jsonl")


def _leaf_tasks(loaded: dict) -> Iterator[tuple[str, Any]]:
    """(name, task) of every task in `TaskManager.load`'s result, groups opened."""
    for key, value in loaded.items():
        if isinstance(value, dict):  # a group: its tasks
            yield from _leaf_tasks(value)
        else:
            yield str(key), value


def task_names(eval_tasks: Optional[Union[str, list[str]]]) -> list[str]:
    """--eval_tasks as a list of names: None is the default set; a string or list item may hold several, comma
    separated."""
    if eval_tasks is None:
        return list(DEFAULT_TASKS)
    items = [eval_tasks] if isinstance(eval_tasks, str) else eval_tasks
    names = [name.strip() for item in items for name in str(item).split(",") if name.strip()]
    if not names:
        raise ValueError("--eval_tasks is empty; name at least one lm-eval task, e.g. --eval_tasks arc_easy.")
    return names


def own_tasks(task_manager) -> list[str]:
    """The tasks whose YAML is one of this repository's (eval/tasks/)."""
    ours = Path(__file__).resolve().parent / "tasks"
    names = []
    for name, entry in getattr(task_manager, "task_index", {}).items():
        yaml_path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
        if isinstance(yaml_path, (str, Path)) and Path(yaml_path).resolve().is_relative_to(ours):
            names.append(name)
    return names


@contextmanager
def quiet_data_file_hint(names: Sequence[str]) -> Iterator[None]:
    """Leave out lm-eval's warning that a task with its own data loader takes settings from --metadata, for this
    repository's tasks: their YAML and --help say which (`data_file`), and the quickstart's user needs none."""
    import logging

    prefixes = tuple(f"{name}: Custom kwargs can be passed" for name in names)

    def keep(record: logging.LogRecord) -> bool:
        return not (prefixes and str(record.msg).startswith(prefixes))

    logger = logging.getLogger("lm_eval.api.task")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _load_tasks(task_manager, names: list[str], switched_off: Sequence[str] = ()) -> dict:
    try:
        return task_manager.load(names)
    except Exception as e:
        # the datasets library reports an offline or missing dataset with its own exception classes
        library = type(e).__module__.startswith(("datasets", "huggingface_hub", "requests", "urllib3"))
        if isinstance(e, FileNotFoundError) and not library:
            raise  # a local task's data file (the quickstart task's, say): its own message names it
        unreachable = isinstance(e, OSError) and not isinstance(e, FileNotFoundError)  # ConnectionError included
        if not (unreachable or library):
            raise
        error = type(e).__name__ + (f": {str(e).splitlines()[0]}" if str(e).strip() else "")
        tasks = ", ".join(names)
        # datasets names the Hub dataset it could not find: "Couldn't reach 'allenai/ai2_arc' on the Hub (...)"
        reached = re.search(r"Couldn't reach '([^']+)'", str(e))
        dataset = f"the dataset {reached[1]!r}" if reached else "the task data"
        fix = "run where the Hugging Face Hub is reachable (or download the dataset there into the cache)"
        retries = ""
        if switched_off and "OfflineModeIsEnabled" in str(e):
            settings = " and ".join(f"{k}={os.environ.get(k)}" for k in switched_off)
            message = (f"{dataset} is not in the Hugging Face datasets cache, and {settings} turns off the Hugging "
                       "Face Hub that lm-eval's built-in tasks download it from")
            fix = f"unset {' and '.join(switched_off)} where the Hub is reachable"
        elif unreachable:
            # huggingface_hub retries an unreachable Hub for ~23 s before this error; the offline switch skips that
            message = (f"{dataset} is not in the Hugging Face datasets cache, and the Hugging Face Hub that lm-eval's "
                       f"built-in tasks download it from is not reachable from here, so this machine looks offline "
                       f"({error})")
            retries = ("; without network, set HF_HUB_OFFLINE=1 to get this error at once instead of after "
                       "huggingface_hub's retries")
        else:
            message = error
        raise TaskDataError(
            f"Could not load the data of task(s) {tasks}: {message}; {fix}, or pass local task YAMLs with "
            f"--include_path{retries}."
        ) from None


RUN_CONFIG_FIX = ("evaluate its adapter unmerged, --checkpoint_dir {base} --adapter_path {adapter}, or its merged "
                  "checkpoint (scripts/merge_ether.py or merge_lora.py write {merged}) as --checkpoint_dir")


def lm_eval_flag_hint(args: Sequence[str]) -> Optional[str]:
    """The one-line error for lm-eval's own `--tasks` flag, which this script calls --eval_tasks (jsonargparse
    would only say that it is unrecognized)."""
    if any(a == "--tasks" or a.startswith("--tasks=") for a in args):
        return ("--tasks is lm-eval's own flag; this script names the tasks with --eval_tasks (e.g. --eval_tasks "
                "arc_easy,piqa).")
    return None


if __name__ == "__main__":
    run_cli(main, run_config_fix=RUN_CONFIG_FIX, arg_check=lm_eval_flag_hint)
