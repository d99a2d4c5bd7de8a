"""The quickstart's pipeline end to end on the real SmolLM2-135M, shortened: generate the data, prepare it, fine-tune
with ETHER+, merge, and evaluate base and merged models with the lm-eval task (scripts/quickstart.sh runs the same
steps at full length)."""

import csv
import sys
from pathlib import Path

import pytest

from lit_gpt.args import EvalArgs, IOArgs, TrainArgs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "finetune"))


def quickstart_accuracy(checkpoint_dir: Path, data_file: Path, limit: int) -> float:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lit_gpt.lm_eval import LitGPTLM

    # (only the local task: indexing lm-eval's thousands of built-in tasks takes 20-40 s each time)
    manager = TaskManager(include_path=str(REPO / "eval" / "tasks" / "quickstart"), include_defaults=False,
                          metadata={"data_file": str(data_file)})
    results = lm_eval.simple_evaluate(
        model=LitGPTLM(checkpoint_dir=checkpoint_dir, batch_size=8, precision="32-true"), tasks=["quickstart"],
        task_manager=manager, limit=limit, bootstrap_iters=0,
    )
    assert results["results"]["quickstart"]["sample_len"] == limit
    return results["results"]["quickstart"]["exact_match,none"]


@pytest.mark.slow
def test_generate_prepare_finetune_merge_and_evaluate_smollm2(smollm2_checkpoint, tmp_path):
    import ether
    import prepare_json

    from lit_gpt import GPT
    from lit_gpt.data.quickstart import write_dataset
    from lit_gpt.merge import merge_checkpoint

    paths = write_dataset(tmp_path / "data", n_train=96, n_test=8, seed=0)
    prepared = tmp_path / "prepared"
    prepare_json.prepare(json_path=paths["train"], destination_path=prepared, checkpoint_dir=smollm2_checkpoint,
                         max_seq_length=64)
    base_accuracy = quickstart_accuracy(smollm2_checkpoint, paths["test"], limit=8)

    run = tmp_path / "run"
    ether.setup(
        io=IOArgs(train_data_dir=prepared, checkpoint_dir=smollm2_checkpoint, out_dir=run),
        train=TrainArgs(learning_rate=1e-2, max_steps=4, global_batch_size=8, micro_batch_size=8,
                        lr_warmup_steps=1, max_seq_length=64),
        eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0),
        Htype="etherplus", ether_nb=32, ether_projection=True, ether_mlp=True, precision="32-true",
    )
    with open(run / "logs" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    assert losses[-1] < 0.6 * losses[0], losses  # ETHER+ starts at the base model and learns the format fast

    merged = merge_checkpoint(run / "lit_model_ether_finetuned.pth", checkpoint_dir=smollm2_checkpoint,
                              out_dir=tmp_path / "merged", precision="32-true")
    assert set(GPT.from_checkpoint(merged).state_dict()) == set(GPT.from_checkpoint(smollm2_checkpoint).state_dict())
    tuned_accuracy = quickstart_accuracy(merged, paths["test"], limit=8)
    assert 0.0 <= base_accuracy <= 1.0 and 0.0 <= tuned_accuracy <= 1.0
    assert base_accuracy == 0.0  # the base model gets none of these right (measured on the full held-out set too)
