"""The training loop end to end: every method on a tiny model, crash-safe resume, FSDP2 on two CPU processes,
clear errors, and the loss falling on the real SmolLM2-135M."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT, Config
from lit_gpt.args import EvalArgs, IOArgs, TrainArgs
from lit_gpt.utils import load_file, save_model_weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "finetune"))

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(9) for b in range(9)]


def _tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    template = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n### Response:")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([template] * 20 + [json.dumps(r) for r in ROWS], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny Llama (GQA, 2 layers, width 64) with a BPE tokenizer and prepared Alpaca-style data in `data/`."""
    import prepare_json

    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    d.mkdir()
    _tokenizer(d)
    torch.manual_seed(0)
    cfg = Config(name="tiny-llama", block_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                 vocab_size=400, padding_multiple=64, bias=False, norm_class_name="RMSNorm",
                 mlp_class_name="LLaMAMLP", intermediate_size=128)
    cfg.save(d)
    save_model_weights(GPT(cfg), d)
    (d / "rows.json").write_text(json.dumps(ROWS))
    prepare_json.prepare(json_path=d / "rows.json", destination_path=d / "data", checkpoint_dir=d,
                         max_seq_length=256)
    return d


def run_cli(script: str, *args: str, timeout: int = 600, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIT_GPT_NO_PROGRESS="1", **env_vars)
    return subprocess.run([sys.executable, str(REPO / "finetune" / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def common_flags(ckpt: Path, out_dir: Path, steps: int, **extra: str) -> list[str]:
    flags = {"--io.train_data_dir": str(ckpt / "data"), "--io.out_dir": str(out_dir),
             "--train.max_steps": str(steps), "--train.global_batch_size": "4", "--train.micro_batch_size": "1",
             "--train.save_interval": "1000", "--train.lr_warmup_steps": "2", "--eval.interval": "0",
             "--eval.max_iters": "2", "--eval.max_new_tokens": "0", "--precision": "32-true"}
    flags.update(extra)
    return [x for kv in flags.items() for x in kv]


def final_tensors(out_dir: Path, name: str = "lit_model_ether_finetuned.pth") -> dict:
    obj = load_file(out_dir / name, mmap=False)
    return obj["state_dict"] if "state_dict" in obj else obj


@pytest.mark.parametrize(
    "script,method,kwargs",
    [
        ("ether", "ether", dict(Htype="ether", ether_nb=4)),
        ("ether", "etherplus", dict(Htype="etherplus", ether_nb=4, flip_side=True, ether_mlp=True)),
        ("ether", "etherplusHH", dict(Htype="etherplusHH", ether_nb=4, block_dropout=0.1)),
        ("ether", "oft", dict(Htype="oft", ether_nb=8, ether_key=True, ether_projection=True)),
        ("lora", "lora", dict(lora_r=4, lora_head=True)),
        ("full", "full", dict()),
    ],
)
def test_a_few_steps_of_every_method(tiny_ckpt, tmp_path, script, method, kwargs):
    import importlib

    module = importlib.import_module(script)
    out = tmp_path / method
    module.setup(
        io=IOArgs(train_data_dir=tiny_ckpt / "data", out_dir=out),
        train=TrainArgs(learning_rate=1e-2, max_steps=3, global_batch_size=2, micro_batch_size=1,
                        lr_warmup_steps=1),
        eval=EvalArgs(interval=2, max_iters=2, max_new_tokens=3),
        precision="32-true",
        **kwargs,
    )
    base = load_file(tiny_ckpt / "lit_model.pth")
    hp = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert hp["method"] == method and hp["base_checkpoint_dir"] == str(tiny_ckpt.resolve())
    if method == "full":
        final = final_tensors(out, "lit_model_finetuned.pth")
        assert set(final) == set(base)
        assert any(not torch.equal(final[k], base[k]) for k in final)
    else:
        obj = load_file(out / f"lit_model_{'lora' if method == 'lora' else 'ether'}_finetuned.pth", mmap=False)
        assert obj["adapter_config"]["method"] == method
        assert obj["state_dict"] and all(torch.isfinite(v).all() for v in obj["state_dict"].values())
    metrics = (out / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"loss", "val_loss", "tokens_per_sec"} <= set(header) and len(metrics) > 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("htype", ["ether", "etherplus", "etherplusHH", "oft"])
def test_bf16_true_on_a_gpu(tiny_ckpt, tmp_path, htype):
    """A GPU's default precision, bf16-true, through the CLI for every Htype (the ETHER family on the Triton
    kernels): the run finishes with finite losses and a finite adapter."""
    out = tmp_path / htype
    flags = common_flags(tiny_ckpt, out, 4, **{"--precision": "bf16-true", "--Htype": htype, "--ether_nb": "4",
                                                "--ether_mlp": "true", "--ether_projection": "true"})
    r = run_cli("ether.py", *flags)
    assert r.returncode == 0, r.stderr[-4000:]
    sd = final_tensors(out)
    assert sd and all(torch.isfinite(v.float()).all() for v in sd.values())
    rows = (out / "logs" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("loss")
    losses = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_auto_equals_an_uninterrupted_run(tiny_ckpt, tmp_path):
    steps = "12"
    ref = tmp_path / "ref"
    r = run_cli("ether.py", *common_flags(tiny_ckpt, ref, 12), "--Htype", "etherplus", "--ether_nb", "4",
                "--ether_dropout", "0.1")
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "finetune" / "ether.py"),
           *common_flags(tiny_ckpt, out, 12, **{"--train.save_interval": "4"}),
           "--Htype", "etherplus", "--ether_nb", "4", "--ether_dropout", "0.1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LIT_GPT_NO_PROGRESS="1"))
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000004.pth").exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "lit_model_ether_finetuned.pth").exists()
    # every logged row is on disk when the process dies (Lightning's CSVLogger kept them in memory)
    killed_steps = _csv_loss_steps(out)
    assert killed_steps[:4] == [1, 2, 3, 4]

    r = run_cli("ether.py", *common_flags(tiny_ckpt, out, 12, **{"--train.save_interval": "4"}),
                "--Htype", "etherplus", "--ether_nb", "4", "--ether_dropout", "0.1", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout + r.stderr
    # the rows before the resumed step are kept, the redone ones are not doubled: the same steps as an uninterrupted run
    assert _csv_loss_steps(out) == _csv_loss_steps(ref) == list(range(1, 13))
    a, b = final_tensors(ref), final_tensors(out)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


def _csv_loss_steps(out_dir: Path) -> list[int]:
    import csv

    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("loss")]


def val_losses(out_dir: Path) -> list[float]:
    import csv

    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return [float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")]


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process(tiny_ckpt, tmp_path):
    """Also with 7 validation examples, of which --eval.max_iters takes 5 (in all, so the loss is the same for any
    number of processes), for 2 processes: a sharded forward needs every rank, so the rank without an example of its
    own in the last round runs one it does not count (before, the run waited there forever)."""
    val7 = tmp_path / "val7"
    shutil.copytree(tiny_ckpt / "data", val7)
    torch.save(torch.load(val7 / "test.pt", weights_only=True)[:7], val7 / "test.pt")
    # a model config with a field it does not use: every process reads it, the warning is printed once
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("data"))
    with open(ckpt / "model_config.yaml", "a") as f:
        f.write("unused_field: 1\n")
    flags = ["--Htype", "etherplusHH", "--ether_nb", "4", "--train.learning_rate", "1e-2",
             "--io.checkpoint_dir", str(ckpt)]
    one, two = tmp_path / "one", tmp_path / "two"
    cpu = dict(CUDA_VISIBLE_DEVICES="")  # two processes on the CPU (gloo), also on a machine with one GPU
    val = {"--io.val_data_dir": str(val7), "--eval.max_iters": "5"}
    r = run_cli("ether.py", *common_flags(tiny_ckpt, one, 4, **val), *flags, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("ether.py", *common_flags(tiny_ckpt, two, 4, **val, **{"--devices": "2"}), *flags, timeout=300, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("has field(s) this model does not use, ignored: 'unused_field'") == 1
    a, b = final_tensors(one), final_tensors(two)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in b.values())
    assert len(val_losses(two)) == 1 and val_losses(two) == pytest.approx(val_losses(one), abs=1e-4)


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_on_one(tiny_ckpt, tmp_path):
    """A job that comes back with fewer GPUs goes on: the same global batch takes the same examples in each step on
    any number of processes, so the position converts, and the run ends where the uninterrupted one did."""
    run = tmp_path / "run"
    flags = [*common_flags(tiny_ckpt, run, 4, **{"--train.save_interval": "2"}), "--ether_nb", "4",
             "--train.learning_rate", "1e-2"]
    cpu = dict(CUDA_VISIBLE_DEVICES="")
    r = run_cli("ether.py", *flags, "--devices", "2", timeout=300, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = final_tensors(run)
    # as if the job had been stopped after step 2's checkpoint
    (run / "lit_model_ether_finetuned.pth").unlink()
    (run / "checkpoints" / "step-000004.pth").unlink()
    r = run_cli("ether.py", *flags, "--resume", "auto", **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--devices × --num_nodes 2 -> 1; steps 3 on use the new ones." in r.stdout + r.stderr
    resumed = final_tensors(run)
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.slow
def test_a_run_of_two_processes_with_dropout_resumes_onto_the_same_masks(tiny_ckpt, tmp_path):
    """Dropout draws as many numbers as a micro-batch has elements, so the ranks' generators part after a step: a
    checkpoint kept rank 0's alone and gave it to both, and the resumed run trained on other masks (its adapter 15%
    off the uninterrupted one's). Each rank's generators are kept now, and rank 1 draws masks of its own."""
    run = tmp_path / "run"
    flags = [*common_flags(tiny_ckpt, run, 4, **{"--train.save_interval": "2"}), "--ether_nb", "4",
             "--ether_dropout", "0.2", "--train.learning_rate", "1e-2", "--devices", "2"]
    cpu = dict(CUDA_VISIBLE_DEVICES="")
    r = run_cli("ether.py", *flags, timeout=300, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = final_tensors(run)
    saved = load_file(run / "checkpoints" / "step-000002.pth", mmap=False)["rng"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])
    (run / "lit_model_ether_finetuned.pth").unlink()
    (run / "checkpoints" / "step-000004.pth").unlink()
    r = run_cli("ether.py", *flags, "--resume", "auto", timeout=300, **cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = final_tensors(run)
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=0, rtol=0, msg=k)


def test_the_sample_answer_of_a_sharded_run_takes_as_many_forwards_on_every_rank():
    """A rank that stopped at an end token the others did not pick would leave them waiting in the next sharded
    forward: sharded, every rank runs `max_new_tokens` and the answer is cut at the first stop token."""
    from types import SimpleNamespace

    from lit_gpt.training import sample_generation

    torch.manual_seed(0)
    gpt = GPT(Config(name="t", block_size=64, n_layer=1, n_embd=32, n_head=2, vocab_size=50, padding_multiple=1))
    forwards = []
    gpt.register_forward_hook(lambda *a: forwards.append(1))
    row = torch.tensor([1, 2])
    decode = SimpleNamespace(decode=lambda ids: list(ids), stop_ids=[])
    free = sample_generation(SimpleNamespace(world_size=1, device=torch.device("cpu")), gpt_runner(gpt), row, decode, 8)
    assert len(free) == 8 and len(forwards) == 8
    stopper = SimpleNamespace(decode=lambda ids: list(ids), stop_ids=[free[2]])  # the third answer token ends it
    for world_size in (1, 2):
        forwards.clear()
        answer = sample_generation(SimpleNamespace(world_size=world_size, device=torch.device("cpu")),
                                   gpt_runner(gpt), row, stopper, 8)
        assert answer == free[:free.index(free[2])]
        assert len(forwards) == (8 if world_size == 2 else free.index(free[2]) + 1)
    assert gpt.training


def gpt_runner(gpt: GPT) -> torch.nn.Module:
    """As `fabric.setup_module` wraps a model: callable, `.module`, other attributes the model's."""
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = gpt

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return Wrapped()


def test_two_fsdp_processes_train_a_float16_model_with_float32_adapters(tiny_ckpt, tmp_path):
    """16-true under FSDP2: the float32 adapter and the float16 frozen weights share each block's shard."""
    flags = ["--Htype", "etherplus", "--ether_nb", "4", "--train.learning_rate", "1e-2", "--precision", "16-true"]
    one, two = tmp_path / "one", tmp_path / "two"
    cpu = dict(CUDA_VISIBLE_DEVICES="")
    for out, devices in ((one, "1"), (two, "2")):
        r = run_cli("ether.py", *common_flags(tiny_ckpt, out, 3, **{"--devices": devices}), *flags, **cpu)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_tensors(one), final_tensors(two)
    assert set(a) == set(b) and {v.dtype for v in b.values()} == {torch.float32}
    for k in a:  # float16 activations: each process rounds its own micro-batches' partial sums
        torch.testing.assert_close(b[k], a[k], atol=2e-3, rtol=0, msg=k)
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in b.values())


def test_clear_errors_before_any_work(tiny_ckpt, tmp_path):
    r = run_cli("ether.py", "--io.train_data_dir", str(tmp_path / "nowhere" / "data"))
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ether.py", *common_flags(tiny_ckpt, tmp_path / "x", 2), "--Htype", "ether", "--ether_nb", "7",
                PYTHONPROFILEIMPORTTIME="1")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    imports = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    last = [line for line in r.stderr.splitlines() if not line.startswith("import time:")][-1]
    assert last.startswith("error:") and "--ether_nb 7 does not divide" in last and "qkv" in last
    # the checks run before Lightning is imported (4 s of torchmetrics, transformers, scipy), so a typo costs less
    assert imports and not [line for line in imports if "lightning" in line]
    r = run_cli("ether.py", *common_flags(tiny_ckpt, tmp_path / "x", 2, **{"--train.global_batch_size": "3",
                                                                          "--train.micro_batch_size": "2"}))
    assert r.returncode != 0 and "global_batch_size" in r.stderr.splitlines()[-1]
    r = run_cli("ether.py", *common_flags(tiny_ckpt, tmp_path / "x", 2, **{"--devices": "0"}))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--devices 0" in r.stderr.splitlines()[-1]


def test_more_devices_than_gpus_is_a_clear_error(monkeypatch):
    from lit_gpt import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    training.check_devices(1)
    with pytest.raises(ValueError, match=r"--devices 2 asks for more GPUs than this machine has \(1\); pass "
                                         r"--devices 1 or fewer.*CUDA_VISIBLE_DEVICES="):
        training.check_devices(2)
    with pytest.raises(ValueError, match="--devices 0"):
        training.check_devices(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: processes on the CPU
    training.check_devices(4)


@pytest.mark.parametrize("path", sorted((REPO / "config_hub" / "finetune").glob("*/*.yaml")), ids=lambda p: p.stem)
def test_every_config_hub_yaml_parses_against_its_script(path):
    from jsonargparse import ArgumentParser

    import ether
    import full
    import lora

    cfg = yaml.safe_load(path.read_text())
    setup = lora.setup if "lora_r" in cfg else (ether.setup if "Htype" in cfg else full.setup)
    parser = ArgumentParser()
    parser.add_function_arguments(setup)
    parser.add_argument("--config", action="config")
    ns = parser.parse_args(["--config", str(path)])
    assert ns.train.learning_rate == float(cfg["train"]["learning_rate"])


@pytest.mark.slow
def test_loss_falls_on_real_smollm2(smollm2_checkpoint, tmp_path):
    import ether
    import prepare_json

    rows = [{"instruction": "What is the secret word?", "input": "", "output": "The secret word is pineapple."},
            {"instruction": "Name the project.", "input": "", "output": "The project is lit-ether."}] * 8
    data = tmp_path / "data"
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    prepare_json.prepare(json_path=tmp_path / "rows.json", destination_path=data,
                         checkpoint_dir=smollm2_checkpoint, max_seq_length=128, test_split_fraction=0.125)
    out = tmp_path / "run"
    ether.setup(
        io=IOArgs(train_data_dir=data, checkpoint_dir=smollm2_checkpoint, out_dir=out),
        train=TrainArgs(learning_rate=5e-3, max_steps=8, global_batch_size=2, micro_batch_size=2,
                        lr_warmup_steps=1),
        eval=EvalArgs(interval=0, max_iters=2, max_new_tokens=0),
        Htype="etherplus", ether_nb=32, precision="32-true",
    )
    import csv

    with open(out / "logs" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses


def test_checkpointed_tensors_of_a_tied_model_are_only_the_adapter():
    """torch's ignore_frozen_params still reports a frozen embedding shared with the head (SmolLM2 is tied)."""
    from lit_gpt.adapters import AdapterConfig, adapter_state_dict, apply_adapters
    from lit_gpt.training import trainable_state_dict

    cfg = Config(name="tied", n_layer=2, n_embd=64, n_head=4, vocab_size=100, padded_vocab_size=128,
                 tie_embeddings=True, block_size=64)
    model = apply_adapters(GPT(cfg), AdapterConfig(method="etherplus", nb=4, targets=["query", "value"]))
    sd, _ = trainable_state_dict(model)
    assert set(sd) == set(adapter_state_dict(model))
    full, _ = trainable_state_dict(GPT(cfg))  # full fine-tuning of a tied model keeps the shared table
    assert "transformer.wte.weight" in full


def test_dry_run_plans_for_the_checkpoint_of_the_data_dir(tiny_ckpt):
    r = run_cli("ether.py", "--io.train_data_dir", str(tiny_ckpt / "data"), "--dry_run", "true",
                "--Htype", "etherplus", "--ether_nb", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    # input side: query and value each transform the 64-wide input; 2 layers x 2 slices x 64 x 2 vectors (u, v)
    assert "model: tiny-llama" in r.stdout and "trainable parameters: 512" in r.stdout


def test_data_prepared_unmasked_trains_and_shows_its_sample_answer(tiny_ckpt, tmp_path, capsys):
    """`--mask_inputs false` (lit-gpt's default for Dolly, FLAN, LongForm) left no -100 label to find the prompt by,
    and the first validation's sample answer ended the run before its checkpoint. Examples now record their prompt's
    length. The run's warm-up (the default 100 steps) is longer than its 2 steps: that is said, not left silent."""
    import lora
    import prepare_json

    data = tmp_path / "unmasked"
    prepare_json.prepare(json_path=tiny_ckpt / "rows.json", destination_path=data, checkpoint_dir=tiny_ckpt,
                         max_seq_length=256, mask_inputs=False)
    masked = torch.load(tiny_ckpt / "data" / "test.pt", weights_only=True)[0]
    sample = torch.load(data / "test.pt", weights_only=True)[0]
    assert not (sample["labels"] == -100).any()
    assert sample["prompt_length"] == masked["prompt_length"] == int((masked["labels"] == -100).sum())
    out = tmp_path / "run"
    capsys.readouterr()
    lora.setup(io=IOArgs(train_data_dir=data, checkpoint_dir=tiny_ckpt, out_dir=out),
               train=TrainArgs(max_steps=2, global_batch_size=2, micro_batch_size=1, save_interval=2),
               eval=EvalArgs(interval=1, max_iters=2, max_new_tokens=2), precision="32-true", lora_r=2)
    err = capsys.readouterr().err
    assert err.count("sample: ") == 2 and "sample: none" not in err
    assert "Warning: --train.lr_warmup_steps 100 is not below the run's 2 optimizer steps, so the learning rate only " \
           "reaches 2% of --train.learning_rate" in err
    assert (out / "lit_model_lora_finetuned.pth").is_file() and (out / "checkpoints" / "step-000002.pth").is_file()


def test_gradient_accumulation_averages_the_micro_batches(tiny_ckpt, tmp_path):
    """Two examples with as many answer tokens each, in one step: two micro-batches of one must bring AdamW the
    gradient one micro-batch of two brings, the mean loss's (a sum would be twice that: invisible to AdamW alone,
    but `--train.max_norm` would then clip at half the norm asked for, and 16-mixed's scaler would see it)."""
    import lora
    import prepare_json
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    rows = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
            {"instruction": "Add 3 and 5.", "input": "", "output": "8"},
            {"instruction": "Add 2 and 2.", "input": "", "output": "4"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    data = prepare_json.prepare(json_path=tmp_path / "rows.json", destination_path=tmp_path / "data",
                                checkpoint_dir=tiny_ckpt, test_split_fraction=0.34, max_seq_length=256)
    train = torch.load(data / "train.pt", weights_only=True)
    assert len(train) == 2 and len({int((ex["labels"] != -100).sum()) for ex in train}) == 1

    grads = []

    def record(optimizer, args, kwargs):
        grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    for micro in (1, 2):
        handle = register_optimizer_step_pre_hook(record)
        try:
            lora.setup(io=IOArgs(train_data_dir=data, checkpoint_dir=tiny_ckpt, out_dir=tmp_path / f"micro{micro}"),
                       train=TrainArgs(max_steps=1, global_batch_size=2, micro_batch_size=micro, lr_warmup_steps=0),
                       eval=EvalArgs(interval=0, max_iters=0), precision="32-true", lora_r=2, lora_mlp=True, lora_dropout=0.0)
        finally:
            handle.remove()
    assert len(grads) == 2 and grads[0] and any(g.abs().max() > 0 for g in grads[0])
    for accumulated, whole in zip(*grads):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


def test_16_mixed_skips_an_overflowing_step_with_max_norm_set(tiny_ckpt, tmp_path, monkeypatch):
    """Under 16-mixed an overflow in the gradients is the loss scaler's to skip (it lowers its scale), also when
    --train.max_norm clips: the clipping used to call it a non-finite gradient norm and end the run. A GPU's plugin
    on the CPU (Lightning swaps 16-mixed for bf16-mixed there), with a loss scale so high that steps overflow."""
    import lora
    from lightning.fabric.plugins.precision.amp import MixedPrecision

    import lit_gpt.training as training

    own = training.fabric_precision
    monkeypatch.setattr(training, "fabric_precision", lambda precision, *a, **k: {
        "plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 60))]}
        if precision == "16-mixed" else own(precision, *a, **k))
    out = tmp_path / "amp"
    lora.setup(io=IOArgs(train_data_dir=tiny_ckpt / "data", out_dir=out),
               train=TrainArgs(max_steps=2, global_batch_size=2, micro_batch_size=1, lr_warmup_steps=0, max_norm=1.0),
               eval=EvalArgs(interval=0, max_iters=0), precision="16-mixed", lora_r=2)
    final = final_tensors(out, "lit_model_lora_finetuned.pth")
    assert final and all(torch.isfinite(v).all() for v in final.values())


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "diverged"
    r = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "full.py"), *common_flags(tiny_ckpt, out, 6, **{
            "--train.learning_rate": "1e30", "--train.lr_warmup_steps": "0", "--train.save_interval": "1",
            "--train.global_batch_size": "2"})],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, LIT_GPT_NO_PROGRESS="1"), timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    # the weights blow up before the loss shows it: the checkpoint of that step is refused, not written as "good"
    assert last.startswith(("error: The training loss became", "error: The trainable weights became non-finite"))
    assert "at step" in last and "last good checkpoint is" in last and str(out / "checkpoints") in last
    good = sorted((out / "checkpoints").glob("step-*.pth"))
    assert good and str(good[-1]) in last
    for path in good:  # every checkpoint written is finite, so the one named can really be resumed from
        assert all(torch.isfinite(v).all() for v in load_file(path, mmap=False)["model"].values())
    assert not (out / "lit_model_finetuned.pth").exists()


@pytest.mark.parametrize("env,prints", [
    ({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
])
def test_what_the_checks_before_launch_find_is_printed_by_the_first_process_only(monkeypatch, capsys, env, prints):
    from lit_gpt.utils import print_once

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    print_once("warning: once")
    assert (capsys.readouterr().out == "warning: once\n") is prints
