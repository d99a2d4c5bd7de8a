"""`--logger_name`: Weights & Biases (offline here: nothing leaves the machine or tmp_path), TensorBoard or
logs/metrics.csv alone. The W&B run is read back from the files wandb itself wrote (its `.wandb` record log).

The tiny model, tokenizer and prepared data are `tests/test_training.py`'s `tiny_ckpt` fixture."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from test_training import tiny_ckpt  # noqa: F401 (a fixture)
from test_training_inputs import csv_rows, setup_ether


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """W&B in offline mode, with every folder it writes (runs, cache, settings) under tmp_path; returns WANDB_DIR."""
    pytest.importorskip("wandb")
    folders = {"WANDB_DIR": "wandb-dir", "WANDB_CACHE_DIR": "wandb-cache", "WANDB_CONFIG_DIR": "wandb-config",
               "WANDB_DATA_DIR": "wandb-data", "WANDB_ARTIFACT_DIR": "wandb-artifacts"}
    for key, name in folders.items():
        (tmp_path / name).mkdir()
        monkeypatch.setenv(key, str(tmp_path / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "wandb-dir"


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: a 7-byte header (`:W&B`, magic, version), then a LevelDB log (32 KiB blocks of
    chunks with a 7-byte header: CRC, length, type full/first/middle/last) of `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # padding
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_run(wandb_dir: Path, run_id: str, which: int = -1) -> dict:
    """One offline run with this id (the first, or the last: a resume writes another folder with the same id): its
    run record, its config updates, its history rows and its exit code."""
    folders = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert folders, f"no offline W&B run {run_id} in {wandb_dir}"
    out = {"run": None, "config": {}, "history": [], "exit_code": None, "folders": len(folders)}
    for record in wandb_records(folders[which] / f"run-{run_id}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "config":
            out["config"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                  for i in record.config.update})
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def losses(rows: list[dict]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows if r.get("loss") not in (None, "")}


@pytest.mark.slow
def test_a_wandb_run_logs_each_step_and_a_resume_continues_the_same_run(tiny_ckpt, tmp_path, wandb_offline):
    out = tmp_path / "ether-run"
    setup_ether(tiny_ckpt / "data", out, train=dict(max_steps=2, save_interval=1), logger_name="wandb")
    assert not (out / "tensorboard").exists()
    first = losses(csv_rows(out))
    assert sorted(first) == [1, 2]  # logs/metrics.csv as ever
    recorded = yaml.safe_load((out / "logs" / "wandb_run.yaml").read_text())
    assert recorded["project"] == "lit-ether"  # (no WANDB_PROJECT)
    run = wandb_run(wandb_offline, recorded["id"])
    assert run["run"].project == "lit-ether" and run["run"].display_name == "ether-run"
    assert run["exit_code"] == 0
    history = {row["trainer/global_step"]: row for row in run["history"] if "loss" in row}
    assert {s: row["loss"] for s, row in history.items()} == pytest.approx(first)  # the loss of every step
    assert run["config"]["logger_name"] == "wandb" and run["config"]["method"] == "ether"  # hyperparameters.yaml
    assert run["config"]["train"]["max_steps"] == 2

    # a resume from step 1 (as after a crash there): the same W&B run goes on, with the hyperparameters of the
    # resumed run, and logs steps 2 and 3 (step 2 again, at its step number)
    (out / "checkpoints" / "step-000002.pth").unlink()
    (out / "lit_model_ether_finetuned.pth").unlink()
    setup_ether(tiny_ckpt / "data", out, train=dict(max_steps=3, save_interval=1), logger_name="wandb",
                resume="auto")
    assert yaml.safe_load((out / "logs" / "wandb_run.yaml").read_text()) == recorded
    resumed = wandb_run(wandb_offline, recorded["id"])
    assert resumed["folders"] == 2 and resumed["run"].run_id == recorded["id"]
    assert resumed["run"].project == "lit-ether" and resumed["exit_code"] == 0
    assert [row["trainer/global_step"] for row in resumed["history"] if "loss" in row] == [2, 3]
    assert resumed["config"]["train"]["max_steps"] == 3
    assert sorted(losses(csv_rows(out))) == [1, 2, 3]
    assert not (out / "tensorboard").exists()


def test_csv_writes_neither_tensorboard_nor_wandb_and_tensorboard_is_the_default(tiny_ckpt, tmp_path,
                                                                                 wandb_offline):
    setup_ether(tiny_ckpt / "data", tmp_path / "csv", logger_name="csv")
    assert sorted(losses(csv_rows(tmp_path / "csv"))) == [1]
    assert not (tmp_path / "csv" / "tensorboard").exists() and not (tmp_path / "csv" / "wandb").exists()
    assert not (tmp_path / "csv" / "logs" / "wandb_run.yaml").exists()
    assert not any(wandb_offline.iterdir())

    setup_ether(tiny_ckpt / "data", tmp_path / "default")
    assert any((tmp_path / "default" / "tensorboard").iterdir()) and not any(wandb_offline.iterdir())


def test_without_the_wandb_package_the_run_stops_in_one_sentence_before_the_model_loads(tiny_ckpt, tmp_path,
                                                                                       monkeypatch, capsys):
    import ether

    from lit_gpt import training
    from lit_gpt.cli import run_cli

    def no_model(*args, **kwargs):
        raise AssertionError("no model may load without the logger")

    monkeypatch.setattr(training, "load_model_weights", no_model)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_cli(ether.setup, args=["--io.train_data_dir", str(tiny_ckpt / "data"), "--io.out_dir", str(out),
                                   "--ether_nb", "4", "--precision", "32-true", "--train.lr_warmup_steps", "1",
                                   "--logger_name", "wandb"],
                finetune_script="finetune/ether.py")
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: --logger_name wandb needs the wandb package: pip install wandb.\n"
    assert not (out / "hyperparameters.yaml").exists()


def test_a_resume_with_a_broken_wandb_record_names_it(tmp_path, wandb_offline):
    from lit_gpt.training import make_loggers

    (tmp_path / "logs").mkdir()
    record = tmp_path / "logs" / "wandb_run.yaml"
    record.write_text("just text\n")
    with pytest.raises(ValueError, match=r"wandb_run.yaml' does not hold a W&B run's id and project: delete it"):
        make_loggers("wandb", tmp_path, purge_step=5)
    [logger] = make_loggers("wandb", tmp_path, purge_step=1)  # a new run starts a new W&B run
    assert logger.version != "just text"
    with pytest.raises(ValueError, match="--logger_name 'neptune': choose tensorboard, wandb or csv."):
        make_loggers("neptune", tmp_path)


@pytest.mark.parametrize("script", ["ether", "lora", "full"])
def test_each_script_takes_the_flag_after_seed_and_says_what_it_does(script, capsys):
    import importlib
    import inspect

    from lit_gpt.cli import run_cli

    setup = importlib.import_module(script).setup
    names = list(inspect.signature(setup).parameters)
    assert names[names.index("seed") + 1] == "logger_name"
    with pytest.raises(SystemExit) as e:
        run_cli(setup, args=["--help"], finetune_script=f"finetune/{script}.py")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--logger_name {tensorboard,wandb,csv}" in text and "$WANDB_PROJECT" in text and "wandb_run.yaml" in text
