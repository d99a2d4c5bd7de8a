"""Evaluate a lit checkpoint (merged, or base + adapter) on lm-evaluation-harness tasks."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.cli import run_cli  # noqa: E402

Precision = Literal["32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]


class TaskDataError(ValueError):
    """A task's data could not be loaded (run_cli prints it as one line)."""


def main(
    checkpoint_dir: Path,
    adapter_path: Optional[Path] = None,
    eval_tasks: list[str] = ["arc_challenge", "piqa", "hellaswag", "hendrycksTest-*"],
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 16,
    include_path: Optional[Path] = None,
    save_filepath: Optional[Path] = None,
    precision: Optional[Precision] = None,
    device: Optional[str] = None,
    seed: int = 1234,
    max_length: Optional[int] = None,
    bootstrap_iters: int = 100000,
) -> dict:
    """Run lm-eval tasks on a lit checkpoint and print lm-eval's results table.

    Examples:
        python eval/lm_eval_harness.py --checkpoint_dir out/merged --eval_tasks "['arc_challenge', 'mmlu']"
        python eval/lm_eval_harness.py --checkpoint_dir checkpoints/base --adapter_path out/run/lit_model_ether_finetuned.pth
        python eval/lm_eval_harness.py --checkpoint_dir out/merged --include_path tests/eval_tasks --eval_tasks "['lit_mc']"

    Args:
        checkpoint_dir: A lit checkpoint directory: a merged fine-tuned model (scripts/merge_ether.py,
            scripts/merge_lora.py), or the base model of --adapter_path.
        adapter_path: An adapter file from fine-tuning (lit_model_ether_finetuned.pth, lit_model_lora_finetuned.pth),
            evaluated unmerged on top of --checkpoint_dir; or a full fine-tuning lit_model_finetuned.pth.
        eval_tasks: lm-eval task or group names; glob patterns work ("mmlu_*"). The lm-eval 0.3 names of the reference
            code are mapped with a printed note: truthfulqa_mc -> truthfulqa_mc1 and truthfulqa_mc2,
            hendrycksTest-<subject> -> mmlu_<subject>. lm-eval's built-in tasks download their data from the Hugging
            Face Hub.
        num_fewshot: Few-shot examples per prompt (default: each task's own setting, else 0).
        limit: Evaluate only this many documents per task (a number below 1 is a fraction). For testing only.
        batch_size: Sequences per forward pass.
        include_path: A folder of local task YAMLs (e.g. tests/eval_tasks), searched before lm-eval's own tasks.
        save_filepath: Write lm-eval's results JSON here (`results` -> task -> metric).
        precision: "bf16-true", "32-true", ...; default bf16-true on a GPU that supports it, else 32-true.
        device: "cpu", "cuda", "cuda:1", ...; default the first GPU if there is one.
        seed: Seed for sampling, few-shot example selection and every other random choice lm-eval makes.
        max_length: Context length in tokens (default: the model's block_size).
        bootstrap_iters: Bootstrap resamples for the standard errors of non-mean metrics (0 skips them).
    """
    import json

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from lit_gpt.lm_eval import LitGPTLM, build_task_manager, resolve_tasks, top_level_items
    from lit_gpt.utils import atomic_write_text

    if isinstance(eval_tasks, str):
        eval_tasks = [t for t in eval_tasks.split(",") if t.strip()]
    if not eval_tasks:
        raise ValueError("--eval_tasks is empty; name at least one lm-eval task.")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}.")
    if save_filepath is not None and save_filepath.is_dir():
        raise ValueError(f"--save_filepath {str(save_filepath)!r} is a directory; give a file name such as results.json.")

    task_manager = build_task_manager(include_path, names=eval_tasks)
    notes: list[str] = []
    names = resolve_tasks(eval_tasks, task_manager, notes)
    for note in notes:
        print(note, file=sys.stderr)

    # the tasks (and their data) are loaded before the model, so a missing dataset is reported in seconds
    tasks = top_level_items(_load_tasks(task_manager, names))

    model = LitGPTLM(checkpoint_dir=checkpoint_dir, adapter_path=adapter_path, batch_size=batch_size, device=device,
                     precision=precision, max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=task_manager, num_fewshot=num_fewshot, limit=limit,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if save_filepath is not None:
        save_filepath.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(save_filepath, json.dumps(results, indent=2, default=handle_non_serializable))
        print(f"Saved results to {save_filepath}", file=sys.stderr)
    return results


def _load_tasks(task_manager, names: list[str]) -> dict:
    try:
        return task_manager.load(names)
    except (ConnectionError, OSError) as e:
        raise TaskDataError(
            f"Could not load the data of task(s) {', '.join(names)}: lm-eval's built-in tasks download it from the "
            f"Hugging Face Hub, which is not reachable from here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "run where the Hub is reachable, or pass local task YAMLs with --include_path."
        ) from None
    except Exception as e:
        # the datasets library reports an offline or missing dataset with its own exception classes
        if type(e).__module__.startswith(("datasets", "huggingface_hub", "requests", "urllib3")):
            raise TaskDataError(
                f"Could not load the data of task(s) {', '.join(names)} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); run where the Hugging Face Hub is reachable, or pass "
                "local task YAMLs with --include_path."
            ) from None
        raise


if __name__ == "__main__":
    run_cli(main)
