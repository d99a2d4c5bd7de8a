"""What a resumed (or launched) run does with the flags it is given now: new optimiser and schedule flags are used,
not silently replaced by the checkpoint's; TensorBoard shows each redone step once; `--num_nodes 2` without a
multi-node launcher is refused instead of waiting forever.

The tiny model, tokenizer and prepared data are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import csv
import shutil
import time
from pathlib import Path

import pytest
import torch

from lit_gpt.utils import load_file
from test_training import final_tensors, tiny_ckpt  # noqa: F401 (tiny_ckpt is a fixture)
from test_training_inputs import setup_ether

# 4 steps of ETHER, a checkpoint every 2 steps, validation at the end only
FIRST = dict(learning_rate=1e-2, max_steps=4, save_interval=2, lr_warmup_steps=1)


def csv_rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_run(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "first"
    setup_ether(tiny_ckpt / "data", out, ckpt=tiny_ckpt, train=FIRST)
    assert (out / "checkpoints" / "step-000002.pth").is_file()
    return out


def copy_of(run: Path, dest: Path) -> Path:
    """A copy of a run, once the clock has moved past the second its event files were written in: TensorBoard reads
    a directory's event files in name order, and the names start with the time in whole seconds."""
    shutil.copytree(run, dest)
    newest = max(int(p.name.split(".")[3]) for p in (dest / "tensorboard").glob("events.out.tfevents.*"))
    time.sleep(max(0.0, newest + 1 - time.time()))
    return dest


# ---------------------------------------------------------------------------------------------- optimiser flags
def test_resume_uses_the_optimiser_and_schedule_flags_given_now_and_says_what_changed(first_run, tiny_ckpt, tmp_path,
                                                                                      capsys):
    from lit_gpt.training import lr_lambda

    run = copy_of(first_run, tmp_path / "run")
    step2 = run / "checkpoints" / "step-000002.pth"
    assert load_file(step2, mmap=False)["train"]["learning_rate"] == 1e-2  # the flags are in the checkpoint
    capsys.readouterr()
    new = dict(FIRST, learning_rate=5e-3, max_steps=6, weight_decay=0.1, beta2=0.99)
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=new, resume=str(step2))
    out = capsys.readouterr().out
    assert ("Resumed with other settings than the checkpoint's (old -> new): --train.learning_rate 0.01 "
            "-> 0.005, --train.weight_decay 0.0 -> 0.1, --train.beta2 0.999 -> 0.99, --train.max_steps 4 -> 6; "
            "steps 3 on use the new ones.") in out

    rows = {int(r["step"]): float(r["lr"]) for r in csv_rows(run) if r["loss"]}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    old, now = lr_lambda(1, 4, 0.0), lr_lambda(1, 6, 0.0)
    for step in (1, 2):  # kept from the first run
        assert rows[step] == pytest.approx(1e-2 * old(step - 1))
    for step in (3, 4, 5, 6):  # the schedule of the new flags, evaluated at the resumed step
        assert rows[step] == pytest.approx(5e-3 * now(step - 1))

    last = load_file(run / "checkpoints" / "step-000006.pth", mmap=False)
    group = last["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 5e-3 and group["lr"] == pytest.approx(5e-3 * now(6))
    assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.9, 0.99)
    # AdamW's state came from the checkpoint: its step count goes on from 2, not from 0
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {6.0}
    assert last["train"]["learning_rate"] == 5e-3


def test_resume_with_the_same_flags_prints_no_change_and_older_checkpoints_use_the_flags(first_run, tiny_ckpt,
                                                                                         tmp_path, capsys):
    import torch

    run = copy_of(first_run, tmp_path / "run")
    step2 = run / "checkpoints" / "step-000002.pth"
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=FIRST, resume=str(step2))
    assert "other settings" not in capsys.readouterr().out

    # a checkpoint written before the flags were recorded: no line, but the flags given now still rule
    saved = load_file(step2, mmap=False)
    del saved["train"]
    torch.save(saved, step2)
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=dict(FIRST, learning_rate=2e-3), resume=str(step2))
    assert "other settings" not in capsys.readouterr().out
    from lit_gpt.training import lr_lambda

    rows = {int(r["step"]): float(r["lr"]) for r in csv_rows(run) if r["loss"]}
    assert rows[3] == pytest.approx(2e-3 * lr_lambda(1, 4, 0.0)(2))


# ---------------------------------------------------------------------------------------------- TensorBoard
def tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_redone_step_once(first_run, tiny_ckpt, tmp_path):
    run = copy_of(first_run, tmp_path / "run")
    assert tensorboard_steps(run, "loss") == [1, 2, 3, 4] and tensorboard_steps(run, "val_loss") == [4]
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=FIRST, resume=str(run / "checkpoints" /
                                                                                  "step-000002.pth"))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # steps 1-2 from the first file, 3-4 (redone) from the second; not 1, 2, 3, 4, 3, 4
    assert tensorboard_steps(run, "loss") == [1, 2, 3, 4]
    assert tensorboard_steps(run, "val_loss") == [4]
    assert [int(r["step"]) for r in csv_rows(run) if r["loss"]] == [1, 2, 3, 4]  # the same rows as metrics.csv


def test_resuming_the_last_step_without_the_final_file_writes_it_without_validating_again(first_run, tiny_ckpt,
                                                                                          tmp_path, capsys):
    """Killed after the last-step checkpoint and before the final file: the resume writes the final file, and the
    final validation (done before that checkpoint) is neither redone nor logged twice."""
    run = copy_of(first_run, tmp_path / "run")
    final = run / "lit_model_ether_finetuned.pth"
    final.unlink()
    assert load_file(run / "checkpoints" / "step-000004.pth", mmap=False)["validated"] is True
    capsys.readouterr()
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=FIRST, resume="auto")
    out = capsys.readouterr()
    assert "Resumed from" in out.out and "val loss" not in out.out + out.err
    assert final.is_file()
    assert [int(r["step"]) for r in csv_rows(run) if r["val_loss"]] == [4]
    assert tensorboard_steps(run, "val_loss") == [4]

    # an intermediate checkpoint that happens to sit at the end of a shorter run was not validated as its last step
    run2 = copy_of(first_run, tmp_path / "run2")
    (run2 / "lit_model_ether_finetuned.pth").unlink()
    setup_ether(tiny_ckpt / "data", run2, ckpt=tiny_ckpt, train=dict(FIRST, max_steps=2),
                resume=str(run2 / "checkpoints" / "step-000002.pth"))
    assert [int(r["step"]) for r in csv_rows(run2) if r["val_loss"]] == [2]


def test_resume_alone_takes_the_runs_recorded_flags(first_run, tmp_path, capsys):
    """`--resume PATH` (or `--resume auto --io.out_dir RUN`) with no other flag: the run's hyperparameters.yaml
    gives the data, the base model, the method and the batch sizes; the run goes on in the folder where it now is."""
    import ether

    from lit_gpt.cli import run_cli
    from lit_gpt.training import TRAINING_ERRORS

    first_log = (first_run / "logs" / "metrics.csv").read_text()
    for how in ("path", "auto"):
        run = copy_of(first_run, tmp_path / how)  # a moved run folder: its file names the first one's
        (run / "lit_model_ether_finetuned.pth").unlink()
        (run / "checkpoints" / "step-000004.pth").unlink()
        args = (["--resume", str(run / "checkpoints" / "step-000002.pth")] if how == "path"
                else ["--resume", "auto", "--io.out_dir", str(run)])
        capsys.readouterr()
        run_cli(ether.setup, args=args, errors=TRAINING_ERRORS, finetune_script="finetune/ether.py")
        out = capsys.readouterr()
        assert f"note: --resume: the run's flags come from {str(run / 'hyperparameters.yaml')!r}" in out.err
        assert "Resumed from" in out.out and (run / "lit_model_ether_finetuned.pth").is_file()
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002.pth", "step-000004.pth"]
        assert [int(r["step"]) for r in csv_rows(run) if r["val_loss"]] == [4]
    assert (first_run / "logs" / "metrics.csv").read_text() == first_log  # the folder it was copied from: untouched


def test_which_runs_flags_resume_alone_takes(first_run, tmp_path):
    """`--resume PATH` alone takes the run's recorded flags, but not the machine's (--devices and --num_nodes are
    the job's now), not another script's run (the resume check names both scripts), and not with a --config of the
    user's own (then the defaults fill what it leaves out, as without --resume)."""
    import ether
    import lora
    import yaml

    from lit_gpt.cli import run_config_args

    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    hparams = yaml.safe_load((run / "hyperparameters.yaml").read_text())
    (run / "hyperparameters.yaml").write_text(yaml.safe_dump(dict(hparams, devices=2, num_nodes=2)))
    args = ["--resume", str(run / "checkpoints" / "step-000002.pth")]
    out = run_config_args(args, ether.setup, "finetune/ether.py")
    assert out[0] == "--config" and out[2:] == args
    recorded = yaml.safe_load(out[1])
    assert recorded["train"] == hparams["train"] and "devices" not in recorded and "num_nodes" not in recorded
    assert run_config_args(args, lora.setup, "finetune/lora.py") == args
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  learning_rate: 0.001\n")
    assert run_config_args(["--config", str(recipe), *args], ether.setup, "finetune/ether.py") == [
        "--config", str(recipe), *args]


def test_checkpoints_of_earlier_versions_say_whether_their_step_was_validated():
    """Before `validated`, a last-step checkpoint said `last_of_run` (written after the final validation), and any
    other checkpoint was written after the validation due at its step: resuming them redoes no validation."""
    from lit_gpt.training import checkpoint_validated

    assert checkpoint_validated({"step": 4, "last_of_run": True}, steps=4)
    assert not checkpoint_validated({"step": 4, "last_of_run": False}, steps=4)
    assert not checkpoint_validated({"step": 2}, steps=2)  # the end of a shorter run: its final validation is due
    assert checkpoint_validated({"step": 2}, steps=4)
    assert not checkpoint_validated({"step": 2, "validated": False}, steps=4)


def test_an_older_checkpoints_adapter_settings_come_from_its_runs_hyperparameters(tmp_path):
    """Checkpoints written before they carried their AdapterConfig are compared with the flags through the run's
    hyperparameters.yaml; a damaged one is named in one sentence (it was a yaml traceback)."""
    from lit_gpt.adapters import AdapterConfig
    from lit_gpt.training import check_resume_matches

    ckpt = tmp_path / "run" / "checkpoints" / "step-000002.pth"
    ckpt.parent.mkdir(parents=True)
    saved = {"model": {"w": torch.zeros(2)}, "step": 2, "method": "ether"}
    now = AdapterConfig(method="ether", nb=4)
    check_resume_matches(saved, ckpt, "ether", now)  # no hyperparameters.yaml: nothing to compare
    hparams = tmp_path / "run" / "hyperparameters.yaml"
    hparams.write_text("adapter_config:\n  method: ether\n  nb: 8\n")
    with pytest.raises(ValueError, match="another adapter configuration \\(nb was 8, now 4"):
        check_resume_matches(saved, ckpt, "ether", now)
    hparams.write_text("adapter_config:\n  method: ether\n  nb: [8\n")
    with pytest.raises(ValueError) as e:
        check_resume_matches(saved, ckpt, "ether", now)
    assert str(e.value).startswith(f"{str(hparams)!r} is not valid YAML (") and "\n" not in str(e.value)
    assert str(e.value).endswith("fix or delete it (this older checkpoint keeps its adapter settings only there, "
                                 "and --resume compares them with the flags).")
    # a resume keeps the old hyperparameters.yaml aside when its flags changed; a damaged one counts as changed
    from lit_gpt.training import changed_hparams

    hparams.write_text("a: 1\nresume: false\n")
    assert not changed_hparams(hparams, {"a": 1, "resume": "auto"}) and changed_hparams(hparams, {"a": 2})
    for damaged in (b"a: [1\n", b"a: \xff\n"):
        hparams.write_bytes(damaged)
        assert changed_hparams(hparams, {"a": 1})


def test_a_resume_with_another_batch_size_or_precision_says_so(first_run, tiny_ckpt, tmp_path, capsys):
    run = copy_of(first_run, tmp_path / "run")
    capsys.readouterr()
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=dict(FIRST, global_batch_size=2, max_steps=5),
                resume="auto", precision="bf16-true")
    assert ("Resumed with other settings than the checkpoint's (old -> new): --precision 32-true -> bf16-true, "
            "--train.global_batch_size 1 -> 2, --train.max_steps 4 -> 5; steps 5 on use the new ones."
            ) in capsys.readouterr().out
    assert load_file(run / "checkpoints" / "step-000005.pth", mmap=False)["precision"] == "bf16-true"


def test_a_resume_without_adapter_float32_says_so_and_keeps_one_dtype(tiny_ckpt, tmp_path, capsys):
    """float32 adapters under bf16-true, resumed without the flag: the change is listed with the others, and AdamW's
    moments follow their (now bfloat16) parameters (torch's loader casts them; its step counts stay float32)."""
    run = tmp_path / "run"
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=dict(FIRST, max_steps=2), precision="bf16-true",
                adapter_float32=True)
    first = load_file(run / "checkpoints" / "step-000002.pth", mmap=False)
    assert first["adapter_float32"] is True and {v.dtype for v in first["model"].values()} == {torch.float32}
    capsys.readouterr()
    setup_ether(tiny_ckpt / "data", run, ckpt=tiny_ckpt, train=FIRST, resume="auto", precision="bf16-true")
    assert ("Resumed with other settings than the checkpoint's (old -> new): --adapter_float32 true -> false, "
            "--train.max_steps 2 -> 4; steps 3 on use the new ones.") in capsys.readouterr().out
    saved = load_file(run / "checkpoints" / "step-000004.pth", mmap=False)
    moments = {v.dtype for st in saved["optimizer"]["state"].values() for k, v in st.items() if k != "step"}
    assert {v.dtype for v in saved["model"].values()} == moments == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- --num_nodes
@pytest.fixture
def no_cluster(monkeypatch):
    """A single machine: no cluster environment detects, no NODE_RANK."""
    from lightning.fabric.plugins import environments as envs

    for name in ("SLURMEnvironment", "TorchElasticEnvironment", "LSFEnvironment", "KubeflowEnvironment",
                 "MPIEnvironment"):
        monkeypatch.setattr(getattr(envs, name), "detect", staticmethod(lambda: False))
    for var in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_num_nodes_without_a_multi_node_launcher_is_refused_before_anything_loads(no_cluster, tiny_ckpt, tmp_path):
    from lit_gpt import training

    def no_launch(*args, **kwargs):  # (a 2-node launch on one machine would hang the test, not fail it)
        raise AssertionError("nothing may launch or load when the run cannot start")

    no_cluster.setattr(training, "build_fabric", no_launch)
    no_cluster.setattr(training, "load_model_weights", no_launch)
    with pytest.raises(ValueError) as e:
        setup_ether(tiny_ckpt / "data", tmp_path / "out", ckpt=tiny_ckpt, num_nodes=2, train={"global_batch_size": 2})
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("--num_nodes 2: no multi-node launch was detected")
    assert "every node must start this same command" in msg and "srun" in msg and "torchrun" in msg
    assert "MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node" in msg
    assert not (tmp_path / "out").exists()
    training.check_nodes(1)  # one machine needs no launcher


def test_num_nodes_passes_with_node_rank_or_a_cluster_environment(no_cluster):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lit_gpt.training import check_nodes

    with pytest.raises(ValueError, match="--num_nodes 2"):
        check_nodes(2)
    no_cluster.setenv("MASTER_ADDR", "10.0.0.1")
    no_cluster.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="--num_nodes 2"):  # without NODE_RANK every node would think it is node 0
        check_nodes(2)
    no_cluster.setenv("NODE_RANK", "1")  # `fabric run --node-rank 1 ...` or a manual launch
    check_nodes(2)
    no_cluster.delenv("NODE_RANK")
    no_cluster.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))  # under srun
    check_nodes(2)


def test_dry_run_with_num_nodes_still_plans(no_cluster, tiny_ckpt, capsys):
    setup_ether(tiny_ckpt / "data", None, dry_run=True, num_nodes=2, train=dict(global_batch_size=2))
    out = capsys.readouterr().out
    assert "model: tiny-llama" in out and "per device, sharded over 2:" in out


# ---------------------------------------------------------------------------------------------- the data
def test_resume_refuses_training_data_prepared_again_and_names_what_changed(first_run, tiny_ckpt, tmp_path):
    """The same folder prepared again (another prompt style, system prompt or split seed) with as many rows went on
    silently: half the run learnt Alpaca prompts, the rest ChatML, and merge, chat and eval then prompted in the
    second. A copy of the same examples elsewhere resumes."""
    import yaml

    run = copy_of(first_run, tmp_path / "run")
    step2 = str(run / "checkpoints" / "step-000002.pth")
    assert load_file(step2, mmap=False)["data_fingerprint"]["prepared"]["prompt_style"] == "alpaca"
    data = tmp_path / "data"
    shutil.copytree(tiny_ckpt / "data", data)
    # what a prepare of the same rows with --prompt_style chatml --seed 7 changes: the examples, and the record
    samples = torch.load(data / "train.pt", weights_only=True)
    torch.save(samples[1:] + samples[:1], data / "train.pt")
    prepared = yaml.safe_load((data / "prepare_config.yaml").read_text())
    (data / "prepare_config.yaml").write_text(yaml.safe_dump(dict(prepared, prompt_style="chatml", seed=7)))
    with pytest.raises(ValueError) as e:
        setup_ether(data, run, ckpt=tiny_ckpt, train=dict(FIRST, max_steps=6), resume=step2)
    assert str(e.value) == (
        f"--resume {step2!r} trained on other examples than --io.train_data_dir {str(data)!r} holds now: it was "
        "prepared again since (prompt_style 'alpaca' -> 'chatml', seed 42 -> 7); resume with the data the run started "
        "with (prepare it again as it was), or start a new run without --resume.")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002.pth", "step-000004.pth"]
    # the rows edited and prepared again with the same flags: other examples, an unchanged record
    (data / "prepare_config.yaml").write_text(yaml.safe_dump(prepared))
    with pytest.raises(ValueError, match="it was prepared again since; resume with the data the run started with"):
        setup_ether(data, run, ckpt=tiny_ckpt, train=dict(FIRST, max_steps=6), resume=step2)
    # the same tokens with other labels (--mask_inputs false): the run would learn the prompts too from here on
    torch.save([dict(s, labels=s["input_ids"].clone()) for s in samples], data / "train.pt")
    (data / "prepare_config.yaml").write_text(yaml.safe_dump(dict(prepared, mask_inputs=False)))
    with pytest.raises(ValueError, match=r"prepared again since \(mask_inputs True -> False\)"):
        setup_ether(data, run, ckpt=tiny_ckpt, train=dict(FIRST, max_steps=6), resume=step2)
    shutil.rmtree(data)
    shutil.copytree(tiny_ckpt / "data", data)  # the run's examples in another folder
    setup_ether(data, run, ckpt=tiny_ckpt, train=dict(FIRST, max_steps=6), resume=step2)
    assert (run / "checkpoints" / "step-000006.pth").is_file()


def test_a_16_mixed_resume_keeps_the_loss_scale_the_run_had_learnt(tiny_ckpt, tmp_path, monkeypatch):
    """16-mixed's GradScaler halves its scale and skips the step on each overflow; a checkpoint did not keep the
    scale, so every resume started again from the first one and skipped those steps anew (3 of 8 updates lost in
    audit 7's run). Lightning swaps 16-mixed for bf16-mixed on the CPU: the test builds the plugin a GPU run gets,
    with a start scale that overflows."""
    from lightning.fabric.plugins.precision.amp import MixedPrecision

    import lit_gpt.training as training

    scales = []
    init, update = torch.amp.GradScaler.__init__, torch.amp.GradScaler.update

    def overflowing_init(self, *args, **kwargs):
        init(self, *args, **dict(kwargs, init_scale=1e30))

    def logged_update(self, *args, **kwargs):
        update(self, *args, **kwargs)
        scales.append(self.get_scale())

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", overflowing_init)
    monkeypatch.setattr(torch.amp.GradScaler, "update", logged_update)
    monkeypatch.setattr(training, "fabric_precision", lambda *a, **k: {"plugins": [MixedPrecision("16-mixed", "cpu")]})
    train = dict(max_steps=6, save_interval=3, lr_warmup_steps=2)
    straight = tmp_path / "straight"
    setup_ether(tiny_ckpt / "data", straight, ckpt=tiny_ckpt, train=train, precision="16-mixed")
    saved = load_file(straight / "checkpoints" / "step-000003.pth", mmap=False)
    assert saved["precision_state"]["scale"] == scales[2] < 1e30  # the scale after step 3: it had backed off
    steps_straight, scales[:] = list(scales), []
    resumed = copy_of(straight, tmp_path / "resumed")
    (resumed / "lit_model_ether_finetuned.pth").unlink()
    (resumed / "checkpoints" / "step-000006.pth").unlink()
    setup_ether(tiny_ckpt / "data", resumed, ckpt=tiny_ckpt, train=train, precision="16-mixed", resume="auto")
    assert scales == steps_straight[3:]
    a, b = final_tensors(straight), final_tensors(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
