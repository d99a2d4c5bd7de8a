"""Merging adapters into standalone checkpoints, and loading fine-tuned models unmerged.

The merged weights are checked against the docs/METHODS.md formulas evaluated here in float64 from the raw adapter
tensors (block-diagonal Householder / ETHER+ / Cayley blocks, W + alpha/r B A), and one merged checkpoint is exported
and run by transformers' LlamaForCausalLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT, Config
from lit_gpt.adapters import AdapterConfig, apply_adapters, save_adapters
from lit_gpt.merge import load_finetuned, merge_checkpoint, read_finetuned, read_hparams, resolve_prompt_style
from lit_gpt.utils import load_file, save_model_weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


# ---------------------------------------------------------------------------------------------- tiny fixtures
def write_tokenizer(d: Path, chat_template: bool = False) -> None:
    """A byte-level BPE tokenizer trained on a few sentences (no hub access here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nAdd two and three.\n\n### Response: five <|user|> <|assistant|>")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 10, trainer)
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template:
        config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))


TINY = dict(block_size=128, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, vocab_size=300, padding_multiple=64,
            bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=96)
# a second family: biases everywhere, GELU MLP, LayerNorm, parallel residual (the bias must survive merging)
TINY_NEOX = dict(block_size=128, n_layer=2, n_embd=64, n_head=4, vocab_size=300, padding_multiple=64, bias=True,
                 parallel_residual=True, rotary_percentage=0.5, intermediate_size=128)


def make_base(d: Path, name: str = "tiny-llama", seed: int = 0, chat_template: bool = False, **overrides) -> Path:
    d.mkdir(parents=True)
    write_tokenizer(d, chat_template)
    cfg = Config(name=name, **{**TINY, **overrides})
    cfg.save(d)
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # norms at 1 and zero biases would hide a bias or norm mishandled by merging
        for n, p in model.named_parameters():
            if not n.endswith("weight") or p.ndim == 1:
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.1)
    save_model_weights(model, d)
    return d


def make_run(run_dir: Path, base: Path, config: AdapterConfig, seed: int = 1, prompt_style: str = "flan",
             trainable_float32: bool = False) -> Path:
    """What finetune/ leaves behind: an adapter file after 'training' (random, far from init, values),
    hyperparameters.yaml and a prepared data dir whose prepare_config.yaml names the prompt style.
    `trainable_float32`: the adapter tensors in float32 whatever the base's dtype (`--adapter_float32`)."""
    model = GPT.from_checkpoint(base)
    apply_adapters(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                if trainable_float32:
                    p.data = p.data.float()
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if config.method in ("oft", "lora") else 1.0))
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "prepare_config.yaml").write_text(yaml.safe_dump({"prompt_style": prompt_style,
                                                                  "checkpoint_dir": str(base)}))
    hparams = {"method": config.method, "adapter_config": config.to_dict(), "base_checkpoint_dir": str(base),
               "io": {"train_data_dir": str(data_dir), "out_dir": str(run_dir)}, "precision": "32-true"}
    (run_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))
    name = "lit_model_lora_finetuned.pth" if config.method == "lora" else "lit_model_ether_finetuned.pth"
    return save_adapters(model, run_dir / name)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"llama": make_base(root / "tiny-llama"),
            "neox": make_base(root / "tiny-neox", name="tiny-neox", **TINY_NEOX)}


# ---------------------------------------------------------------------------------------------- float64 reference
def _blocks_reference(method: str, tensors: dict, nb_k: tuple) -> torch.Tensor:
    """The `(nb, k, k)` blocks of one side, from docs/METHODS.md, in float64."""
    nb, k = nb_k
    eye = torch.eye(k, dtype=torch.float64)
    if method in ("ether", "etherplus", "etherplusHH"):
        unit = {n: t.double() / t.double().norm(dim=-1, keepdim=True) for n, t in tensors.items()}
        u = unit["u"]
        if method == "ether":
            return eye - 2 * u[:, :, None] * u[:, None, :]
        v = unit["v"]
        return eye - u[:, :, None] * u[:, None, :] + v[:, :, None] * v[:, None, :]
    if "R_upper" in tensors:
        R = torch.zeros(tensors["R_upper"].shape[0], k, k, dtype=torch.float64)
        rows, cols = torch.triu_indices(k, k, 1)
        R[:, rows, cols] = tensors["R_upper"].double()
    else:
        R = tensors["R"].double()
    S = (R - R.transpose(-1, -2)) / 2
    H = (eye + S) @ torch.linalg.inv(eye - S)
    return H.expand(nb, k, k) if H.shape[0] != nb else H


def reference_merged_weights(base_sd: dict, adapter_file: Path, cfg: Config) -> dict:
    """Every adapted weight W' = H_out W H_in (or W + alpha/r B A), per slice, in float64."""
    obj = load_file(adapter_file, mmap=False)
    acfg = AdapterConfig.from_dict(obj["adapter_config"])
    q, kv = cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size
    qkv_rows = {"query": (0, q), "key": (q, q + kv), "value": (q + kv, q + 2 * kv)}
    out = {}
    for wkey in obj["base_shapes"]:
        layer = wkey.removesuffix(".weight")
        W = (base_sd[wkey] if wkey in base_sd else base_sd["transformer.wte.weight"]).double().clone()
        prefix = f"{layer}.adapters."
        slices = sorted({k[len(prefix):].split(".")[0] for k in obj["state_dict"] if k.startswith(prefix)})
        for sname in slices:
            lo, hi = qkv_rows[sname] if sname in qkv_rows else (0, W.shape[0])
            Ws = W[lo:hi]
            own = {k[len(prefix) + len(sname) + 1:]: v for k, v in obj["state_dict"].items()
                   if k.startswith(f"{prefix}{sname}.")}
            if acfg.method == "lora":
                Ws = Ws + acfg.alpha / acfg.r * own["B"].double() @ own["A"].double()
            else:
                for side in ("input", "output"):
                    side_t = {k.split(".", 1)[1]: v for k, v in own.items() if k.startswith(side + ".")}
                    if not side_t:
                        continue
                    size = Ws.shape[1] if side == "input" else Ws.shape[0]
                    nb = size // acfg.block_size if acfg.block_size else acfg.nb
                    H = torch.block_diag(*_blocks_reference(acfg.method, side_t, (nb, size // nb)))
                    Ws = Ws @ H if side == "input" else H @ Ws
            W[lo:hi] = Ws
        out[wkey] = W
    return out


CASES = [
    ("llama", AdapterConfig(method="ether", nb=4, targets=["query", "value"])),
    ("llama", AdapterConfig(method="ether", nb=2, targets=["key", "projection"], flip_side=True)),
    ("llama", AdapterConfig(method="etherplus", nb=4, targets=["all-linear"])),
    ("neox", AdapterConfig(method="etherplus", nb=8, targets=["query", "mlp"], flip_side=True)),
    ("llama", AdapterConfig(method="etherplusHH", nb=4, targets=["query", "key", "value", "mlp"])),
    ("neox", AdapterConfig(method="etherplusHH", nb=2, targets=["value", "projection"])),
    ("llama", AdapterConfig(method="oft", nb=8, targets=["query", "value", "projection"])),
    ("neox", AdapterConfig(method="oft", block_size=8, targets=["mlp"], upper_triangle=True, flip_side=True)),
    ("llama", AdapterConfig(method="lora", r=4, alpha=8, targets=["query", "value", "head"])),
    ("neox", AdapterConfig(method="lora", r=2, alpha=2, targets=["all-linear"])),
]


@pytest.mark.parametrize("family,config", CASES, ids=[f"{f}-{c.method}-{'-'.join(c.targets)}" for f, c in CASES])
def test_merge_round_trip(bases, tmp_path, family, config):
    import merge_ether
    import merge_lora

    base = bases[family]
    adapter = make_run(tmp_path / "run", base, config)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = load_finetuned(base, adapter)(tokens)
        plain = GPT.from_checkpoint(base)(tokens)
    assert (unmerged - plain).abs().max() > 1e-2, "the adapter should change the model"

    # the CLI's code path; checkpoint_dir and the method come from the run, out_dir defaults to <run>/merged
    if config.method == "lora":
        out = merge_lora.main(lora_path=adapter, precision="32-true")
    else:
        out = merge_ether.main(ether_path=adapter, precision="32-true")
    assert out == adapter.parent / "merged"

    base_sd = load_file(base / "lit_model.pth", mmap=False)
    merged_sd = load_file(out / "lit_model.pth", mmap=False)
    assert set(merged_sd) == set(base_sd)
    assert all(v.dtype == torch.float32 for v in merged_sd.values())
    expected = reference_merged_weights(base_sd, adapter, Config.from_checkpoint(base))
    assert expected
    for key, value in merged_sd.items():
        if key in expected:
            torch.testing.assert_close(value.double(), expected[key], atol=2e-6, rtol=1e-5, msg=key)
        else:  # every other tensor (biases, norms, embeddings, un-adapted layers) is the base's, bit for bit
            assert torch.equal(value, base_sd[key]), key

    with torch.no_grad():
        merged = GPT.from_checkpoint(out)(tokens)
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()

    assert yaml.safe_load((out / "prompt_style.yaml").read_text()) == {"prompt_style": "flan"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model_config.yaml"):
        assert (out / name).is_file(), name
    assert type(resolve_prompt_style(out)).__name__ == "FLAN"
    assert type(resolve_prompt_style(base, adapter)).__name__ == "FLAN"
    assert type(resolve_prompt_style(base)).__name__ == "Alpaca"


@pytest.mark.slow
def test_seed_command_as_subprocess_bf16_and_transformers_runs_the_export(bases, tmp_path):
    """The README's merge command as written (subprocess), bf16 weights, then the export in transformers."""
    from transformers import AutoModelForCausalLM

    from lit_gpt.convert_hf import convert_lit_checkpoint

    base = bases["llama"]
    config = AdapterConfig(method="etherplusHH", nb=4, targets=["query", "value", "mlp"])
    adapter = make_run(tmp_path / "run", base, config)
    out = tmp_path / "merged-bf16"
    cmd = [sys.executable, "scripts/merge_ether.py", "--checkpoint_dir", str(base), "--precision", "bf16-true",
           "--ether_path", str(adapter), "--out_dir", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "max |diff|" in r.stderr
    merged_sd = load_file(out / "lit_model.pth", mmap=False)
    assert {v.dtype for v in merged_sd.values()} == {torch.bfloat16}
    expected = reference_merged_weights(load_file(base / "lit_model.pth", mmap=False), adapter,
                                        Config.from_checkpoint(base))
    for key, w in expected.items():  # folded in float32, rounded once to bf16
        torch.testing.assert_close(merged_sd[key].double(), w, atol=0, rtol=2 ** -8, msg=key)

    # float32 merge, exported, run by transformers: its logits are the adapted model's
    out32 = merge_checkpoint(adapter, out_dir=tmp_path / "merged32", precision="32-true", log=lambda s: None)
    hf_dir = convert_lit_checkpoint(out32, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = load_finetuned(base, adapter)(tokens)[..., :300]
        theirs = hf(tokens).logits[..., :300]
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


@pytest.mark.parametrize("method", ["oft", "etherplusHH"])
def test_a_float32_adapter_on_a_bf16_base_is_folded_in_float32_and_rounded_once(tmp_path, method):
    """What `--precision bf16-true --adapter_float32 true` leaves: bf16 base weights and float32 adapter tensors.
    Every merged weight is the float64 fold of exactly those tensors, rounded once to bf16: neither the adapter
    rounded to the base's bf16 before folding, nor the fold computed in bf16."""
    base = make_base(tmp_path / "base-bf16")
    model = GPT.from_checkpoint(base).to(torch.bfloat16)
    save_model_weights(model, base)
    config = AdapterConfig(method=method, nb=4, targets=["query", "value", "mlp"])
    adapter = make_run(tmp_path / "run", base, config, trainable_float32=True)
    saved = load_file(adapter, mmap=False)["state_dict"]
    assert {v.dtype for v in saved.values()} == {torch.float32}
    base_sd = load_file(base / "lit_model.pth", mmap=False)
    assert {v.dtype for v in base_sd.values()} == {torch.bfloat16}

    out = merge_checkpoint(adapter, out_dir=tmp_path / "merged", log=lambda s: None)  # the base's dtype: bf16
    merged_sd = load_file(out / "lit_model.pth", mmap=False)
    expected = reference_merged_weights(base_sd, adapter, Config.from_checkpoint(base))
    assert len(expected) == 2 * 4  # per layer: the fused QKV and the MLP's fc_1, fc_2 and proj
    for key, w in expected.items():
        got, want = merged_sd[key], w.to(torch.bfloat16)
        assert got.dtype == torch.bfloat16, key
        # float32 accumulation may land a value that is nearly half-way between two bf16 numbers on the other
        # one; rounding the adapter to bf16 first, or folding in bf16, moves 20-37% of them here
        off = (got != want).float().mean().item()
        assert off <= 2e-3, f"{key}: {off:.2%} of the elements differ from the float64 fold rounded to bf16"
        torch.testing.assert_close(got.double(), want.double(), atol=0, rtol=2 ** -7, msg=key)


def test_the_trained_prompt_format_survives_the_transformers_export_and_back(tmp_path, capsys):
    """transformers never reads prompt_style.yaml: the export copies it (so converting back restores it) and says
    how to prompt the export, where its chat template (with its own default system prompt) would mislead."""
    from lit_gpt.convert_hf import convert_hf_checkpoint, convert_lit_checkpoint

    merged = make_base(tmp_path / "merged")
    (merged / "prompt_style.yaml").write_text(yaml.safe_dump({"prompt_style": "chatml",
                                                              "system_prompt": "You are terse."}))
    hf_dir = convert_lit_checkpoint(merged, tmp_path / "hf")
    assert f"note: {str(merged)!r} was fine-tuned on the chatml prompt format with the system prompt 'You are terse.' " \
           "(prompt_style.yaml, copied along), which transformers does not read: prompt the export that way, giving " \
           "that system prompt as the first message." in capsys.readouterr().err
    convert_hf_checkpoint(hf_dir)  # back: the lit files beside the transformers ones
    style = resolve_prompt_style(hf_dir)
    assert (style.name, style.system_prompt) == ("chatml", "You are terse.")
    (merged / "prompt_style.yaml").unlink()  # a base model: nothing to carry, and an earlier export's file goes
    convert_lit_checkpoint(merged, tmp_path / "hf")
    assert not (hf_dir / "prompt_style.yaml").exists() and "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("precision,dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                             ("32-true", torch.float32), ("bf16-mixed", torch.float32),
                                             ("16-mixed", torch.float32), (None, torch.float32)])
def test_merge_precision_writes_the_dtype_help_names(bases, tmp_path, precision, dtype):
    """--precision: bf16-true bfloat16, 16-true float16 (GPUs without bfloat16), 32-true and *-mixed float32,
    unset the base's dtype (float32 here)."""
    adapter = make_run(tmp_path / "run", bases["llama"], AdapterConfig(method="lora", r=2, targets=["query"]))
    out = merge_checkpoint(adapter, precision=precision, probe=False, log=lambda s: None)
    assert {v.dtype for v in load_file(out / "lit_model.pth", mmap=False).values()} == {dtype}


def test_the_probe_measures_the_checkpoint_that_is_written(bases, tmp_path):
    """With --precision bf16-true on a float32 base, the probe compared the float32 merge (6e-7) and merge_info.yaml
    recorded it beside `dtype: bfloat16`; the written model differs by bfloat16 rounding (1e-2)."""
    from lit_gpt.merge import probe_batch

    adapter = make_run(tmp_path / "run", bases["llama"], AdapterConfig(method="etherplus", nb=4))
    logs = []
    out = merge_checkpoint(adapter, precision="bf16-true", log=logs.append)
    tokens = probe_batch(Config.from_checkpoint(bases["llama"]))
    with torch.no_grad():
        unmerged = load_finetuned(bases["llama"], adapter)(tokens).float()
        written = GPT.from_checkpoint(out).eval()(tokens).float()
    assert written.dtype == torch.float32 and load_file(out / "lit_model.pth")["lm_head.weight"].dtype == torch.bfloat16
    info = yaml.safe_load((out / "merge_info.yaml").read_text())
    assert info["dtype"] == "bfloat16"
    assert info["probe_max_abs_diff"] == pytest.approx((written - unmerged).abs().max().item(), rel=1e-6)
    assert info["probe_max_abs_diff"] > 1e-4  # bfloat16's rounding, not float32's
    assert any(line.startswith("merged (bfloat16) vs unmerged logits") for line in logs)


def test_the_seed_commands_flags_parse(monkeypatch):
    """`merge_ether.py --checkpoint_dir … --precision bf16-true --ether_path …` as written in the README."""
    import merge_ether
    from jsonargparse import CLI

    seen = {}
    monkeypatch.setattr(merge_ether, "merge_cli", lambda *a, **k: seen.update(args=a, flag=k["flag"]))
    CLI(merge_ether.main, as_positional=False, args=[
        "--checkpoint_dir", "checkpoints/meta-llama/Llama-2-7b-hf", "--precision", "bf16-true",
        "--ether_path", "path/to/lit_model_ether_finetuned.pth"])
    adapter, ckpt, out_dir, precision, probe = seen["args"]
    assert adapter == Path("path/to/lit_model_ether_finetuned.pth")
    assert ckpt == Path("checkpoints/meta-llama/Llama-2-7b-hf") and precision == "bf16-true"
    assert out_dir is None and probe is True


def test_adapter_from_another_base_model_is_refused(bases, tmp_path):
    other = make_base(tmp_path / "wider", name="tiny-wide", n_embd=128, intermediate_size=192)
    adapter = make_run(tmp_path / "run", other, AdapterConfig(method="ether", nb=4))
    for call in (lambda: load_finetuned(bases["llama"], adapter),
                 lambda: merge_checkpoint(adapter, bases["llama"], out_dir=tmp_path / "m", log=lambda s: None)):
        with pytest.raises(ValueError, match=r"was trained on another base model \('tiny-wide'\).*pass the "
                                             r"--checkpoint_dir it was trained on"):
            call()
    assert not (tmp_path / "m").exists()

    # same shapes, another model: the recorded base_model name tells them apart
    twin = make_base(tmp_path / "twin", name="tiny-twin", seed=7)
    adapter = make_run(tmp_path / "run2", twin, AdapterConfig(method="lora", r=2))
    with pytest.raises(ValueError, match="was trained on base model 'tiny-twin' but .* holds 'tiny-llama'"):
        load_finetuned(bases["llama"], adapter)


@pytest.mark.slow
def test_refusal_through_the_cli_is_one_line(bases, tmp_path):
    twin = make_base(tmp_path / "twin", name="tiny-twin", seed=7)
    adapter = make_run(tmp_path / "run2", twin, AdapterConfig(method="lora", r=2))
    r = subprocess.run([sys.executable, "scripts/merge_lora.py", "--lora_path", str(adapter), "--checkpoint_dir",
                        str(bases["llama"])], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "was trained on base model 'tiny-twin'" in r.stderr and r.stderr.count("\n") == 1


def test_full_finetuning_file_and_training_checkpoint_load(bases, tmp_path):
    base = bases["llama"]
    # a full fine-tuning output: a plain lit state dict of changed weights
    model = GPT.from_checkpoint(base)
    with torch.no_grad():
        model.transformer.h[1].attn.proj.weight.mul_(-1)
    save_model_weights(model, tmp_path)
    full = (tmp_path / "lit_model.pth").rename(tmp_path / "lit_model_finetuned.pth")
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(base, full)(tokens), model(tokens), rtol=0, atol=0)
    assert read_finetuned(full).method == "full"

    # a resumable checkpoint (trainable tensors under "model") in <run>/checkpoints: the method is in the hparams
    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="oft", nb=4))
    obj = load_file(adapter, mmap=False)
    step = adapter.parent / "checkpoints" / "step-000004.pth"
    step.parent.mkdir()
    torch.save({"model": obj["state_dict"], "optimizer": {}, "step": 4}, step)
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(base, step)(tokens), load_finetuned(base, adapter)(tokens))


def test_a_cut_runs_hyperparameters_is_one_sentence_naming_it_and_its_line(tmp_path):
    """merge, chat, eval and the PEFT export read a run's hyperparameters.yaml (read_finetuned): a file cut short or
    broken by hand is named, with the YAML problem and its line, not a yaml traceback."""
    hparams = tmp_path / "hyperparameters.yaml"
    hparams.write_text("method: ether\nio:\n  out_dir: 'out/ru")
    with pytest.raises(ValueError) as e:
        read_hparams(tmp_path / "lit_model_ether_finetuned.pth")
    assert str(e.value) == (f"{str(hparams)!r} is not valid YAML (found unexpected end of stream at line 3, column "
                            "19): fix it, or pass the flags yourself.")


def test_a_runs_hyperparameters_that_are_not_utf8_are_one_sentence(tmp_path):
    """An editor that saved hyperparameters.yaml as Latin-1 (a café in a note) gave a UnicodeDecodeError traceback
    in merge, chat, eval, the PEFT export and --resume."""
    hparams = tmp_path / "hyperparameters.yaml"
    hparams.write_bytes(b"method: ether\nnote: caf\xe9\n")
    with pytest.raises(ValueError) as e:
        read_hparams(tmp_path / "lit_model_ether_finetuned.pth")
    assert str(e.value) == f"{str(hparams)!r} is not UTF-8 text: fix it, or pass the flags yourself."


def test_a_corrupt_base_tokenizer_stops_the_merge_before_it_writes(tmp_path):
    """Before, merge copied a cut tokenizer.json into its output and reported success."""
    base = make_base(tmp_path / "base")
    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4))
    text = (base / "tokenizer.json").read_text()
    (base / "tokenizer.json").write_text(text[:len(text) // 2])
    with pytest.raises(ValueError) as e:
        merge_checkpoint(adapter, log=lambda s: None)
    assert str(e.value).startswith(f"{str(base / 'tokenizer.json')!r} could not be loaded by the tokenizers library")
    assert str(e.value).endswith("copy the tokenizer files from the original model again.")
    assert not (adapter.parent / "merged").exists()
    # a chat template that does not parse, or a side file that is not text, likewise
    (base / "tokenizer.json").write_text(text)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template="{% for m in messages %}{{ m")))
    with pytest.raises(ValueError, match=r"tokenizer_config.json': the chat template does not parse as Jinja"):
        merge_checkpoint(adapter, log=lambda s: None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe a\n")
    with pytest.raises(ValueError, match="merges.txt' is not UTF-8 text"):
        merge_checkpoint(adapter, log=lambda s: None)
    assert not (adapter.parent / "merged").exists()


def test_missing_base_and_bad_files_are_clear(bases, tmp_path):
    adapter = make_run(tmp_path / "run", bases["llama"], AdapterConfig(method="ether", nb=4))
    # litgpt's `merge_lora RUN`, typed as --checkpoint_dir RUN: the file to pass is named
    from lit_gpt.merge import merge_cli

    with pytest.raises(ValueError) as e:
        merge_cli(None, adapter.parent, None, None, True, "--ether_path")
    assert str(e.value) == (f"--checkpoint_dir {str(adapter.parent)!r} is a fine-tuning run, not its base model: pass "
                            f"--ether_path {adapter} (the base model comes from the run's hyperparameters.yaml).")
    with pytest.raises(ValueError, match=r"^Pass the fine-tuned file to merge with --ether_path \(or --adapter_path"):
        merge_cli(None, bases["llama"], None, None, True, "--ether_path")
    (adapter.parent / "hyperparameters.yaml").unlink()
    with pytest.raises(ValueError, match="No --checkpoint_dir given and no base_checkpoint_dir"):
        merge_checkpoint(adapter, log=lambda s: None)
    bogus = tmp_path / "bogus.pth"
    torch.save({"weights": [1, 2]}, bogus)
    with pytest.raises(ValueError, match="is neither an adapter file"):
        load_finetuned(bases["llama"], bogus)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_finetuned(bases["llama"], tmp_path / "nope.pth")


def test_run_paths_and_prompt_style_do_not_depend_on_the_working_directory(bases, tmp_path, monkeypatch):
    adapter = make_run(tmp_path / "run", bases["llama"], AdapterConfig(method="ether", nb=4), prompt_style="flan")
    hp_path = adapter.parent / "hyperparameters.yaml"
    hp = yaml.safe_load(hp_path.read_text())
    # a run started elsewhere recorded paths relative to its directory: from here they do not exist
    hp["base_checkpoint_dir"] = "checkpoints/tiny-llama"
    hp["io"]["train_data_dir"] = "data/tiny"
    hp_path.write_text(yaml.safe_dump(hp))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"base model recorded in the run's hyperparameters.yaml "
                                                r"\('checkpoints/tiny-llama'\) does not exist here: pass "
                                                r"--checkpoint_dir"):
        merge_checkpoint(adapter, log=lambda s: None)
    # the data is gone too: the prompt format is unknown, which is said rather than silently replaced
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        style = resolve_prompt_style(bases["llama"], adapter)
    assert style.name == "alpaca" and "prompt format it was trained with is unknown" in err.getvalue()
    # runs record the style itself (and absolute paths), so neither matters any more
    hp["prompt_style"] = {"prompt_style": "flan"}
    hp["base_checkpoint_dir"] = str(bases["llama"].resolve())
    hp_path.write_text(yaml.safe_dump(hp))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert resolve_prompt_style(bases["llama"], adapter).name == "flan"
        out = merge_checkpoint(adapter, log=lambda s: None)
    assert err.getvalue() == ""
    assert yaml.safe_load((out / "prompt_style.yaml").read_text())["prompt_style"] == "flan"


def test_an_adapter_is_not_applied_twice(bases, tmp_path):
    adapter = make_run(tmp_path / "run", bases["llama"], AdapterConfig(method="etherplus", nb=4))
    merged = merge_checkpoint(adapter, out_dir=tmp_path / "merged", log=lambda s: None)
    for call in (lambda: load_finetuned(merged, adapter),
                 lambda: merge_checkpoint(adapter, merged, out_dir=tmp_path / "twice", log=lambda s: None)):
        with pytest.raises(ValueError, match="already has .* merged into it .* transform the weights twice: drop the "
                                             "adapter, or pass the base model"):
            call()
    assert not (tmp_path / "twice").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out_dir .* is an existing file; pass a folder"):
        merge_checkpoint(adapter, out_dir=tmp_path / "a_file", log=lambda s: None)
    # another adapter on top of a merged model is a choice, not a mistake
    other = make_run(tmp_path / "run2", bases["llama"], AdapterConfig(method="etherplus", nb=4), seed=5)
    load_finetuned(merged, other)
    # the base's own weights given as the fine-tuned file
    with pytest.raises(ValueError, match="is the base checkpoint's own weights"):
        load_finetuned(bases["llama"], bases["llama"] / "lit_model.pth")
    # the run folder given where the file is expected names the file
    with pytest.raises(ValueError, match=r"is a folder, not a file: the run's final file is .*"
                                         r"lit_model_ether_finetuned.pth"):
        read_finetuned(adapter.parent)


def test_a_base_other_than_the_recorded_one_of_the_same_shape_is_merged_with_a_warning(tmp_path, capsys):
    """SmolLM2-135M for SmolLM2-135M-Instruct: nothing in the shapes tells them apart, the run's record does."""
    base = make_base(tmp_path / "base")
    other = make_base(tmp_path / "other", seed=5)  # same name and shapes, other weights
    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4))
    merge_checkpoint(adapter, base, out_dir=tmp_path / "m1", log=lambda s: None)
    assert "warning" not in capsys.readouterr().err
    merge_checkpoint(adapter, other, out_dir=tmp_path / "m2", log=lambda s: None)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {str(adapter)!r} was trained on {str(base)!r}"), err
    assert f"not on --checkpoint_dir {str(other)!r}; the shapes match" in err


def test_a_merge_stopped_while_writing_into_an_earlier_merge_leaves_that_merge_whole(bases, tmp_path, monkeypatch):
    """The files of a merge are written as one set: a re-merge into the same --out_dir stopped while the weights were
    written (a full disk, Ctrl-C) left the new model_config, prompt format and merge_info.yaml beside the earlier
    merge's weights, a folder that chat, eval and the exports took without a word."""
    from lit_gpt.utils import WriteError

    first = make_run(tmp_path / "run_a", bases["llama"], AdapterConfig(method="ether", nb=4))
    merged = merge_checkpoint(first, out_dir=tmp_path / "merged", log=lambda s: None)
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    assert {"lit_model.pth", "model_config.yaml", "prompt_style.yaml", "merge_info.yaml"} <= set(before)
    second = make_run(tmp_path / "run_b", bases["llama"], AdapterConfig(method="lora", r=2, alpha=4), seed=3,
                      prompt_style="alpaca")

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 part of it")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3136 vs 3030")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255)))
    with pytest.raises(WriteError, match=r"Could not write .*lit_model.pth.*: No space left on device"):
        merge_checkpoint(second, out_dir=merged, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before  # no temporary file either
    monkeypatch.undo()
    merge_checkpoint(second, out_dir=merged, log=lambda s: None)
    assert yaml.safe_load((merged / "merge_info.yaml").read_text())["method"] == "lora"
    assert yaml.safe_load((merged / "prompt_style.yaml").read_text())["prompt_style"] == "alpaca"
