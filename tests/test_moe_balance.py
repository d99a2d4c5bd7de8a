"""The routers' load-balancing loss (`GPT.forward(..., router_aux_loss=True)`, `--train.router_aux_loss_coef`):
against transformers' own Mixtral, Qwen3-MoE and Qwen2-MoE with `output_router_logits` (the loss, the auxiliary
loss and their gradients, padding masked out), against its definition written out in float64, with activation
checkpointing, and in a training run, whose logged value and router update are recomputed here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.args import TrainArgs
from lit_gpt.convert_hf import convert_hf_checkpoint
from lit_gpt.model import load_balancing_loss
from lit_gpt.utils import load_file
import test_adapters
from test_convert_hf import make_hf_model
from test_moe import HF, moe_ckpt, tiny_moe  # noqa: F401 (moe_ckpt: a fixture)
from test_training import tiny_ckpt  # noqa: F401 (a fixture)

one_thread = test_adapters.one_thread  # autouse: one intra-op thread for tiny tensors
REPO = Path(__file__).resolve().parents[1]

IDX = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2))
LENGTHS = torch.tensor([20, 13, 7])  # right padding after these


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "qwen3_moe_unnormalised"])
def test_loss_aux_loss_and_gradients_are_transformers(family, tmp_path):
    model_type, kwargs = HF[family]
    hf = make_hf_model(model_type, **kwargs, output_router_logits=True, router_aux_loss_coef=0.3)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf")
    ours = GPT.from_checkpoint(tmp_path / "hf")
    attention_mask = (torch.arange(IDX.size(1))[None] < LENGTHS[:, None]).long()
    labels = IDX.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # (a prompt)

    theirs = hf(IDX, attention_mask=attention_mask, labels=labels)
    theirs.loss.backward()
    loss, aux = ours(IDX, labels=labels, lengths=LENGTHS, router_aux_loss=True)
    (loss + 0.3 * aux).backward()
    torch.testing.assert_close(aux, theirs.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss + 0.3 * aux, theirs.loss, rtol=1e-5, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    for i in range(kwargs["num_hidden_layers"]):
        torch.testing.assert_close(ours.transformer.h[i].mlp.gate.weight.grad,
                                   hf_params[f"model.layers.{i}.mlp.gate.weight"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.transformer.wte.weight.grad, hf_params["model.embed_tokens.weight"].grad,
                               rtol=1e-4, atol=1e-6)
    # no lengths: every token counts, as transformers without an attention mask
    aux_all = ours(IDX, router_aux_loss=True)[1]
    torch.testing.assert_close(aux_all, hf(IDX).aux_loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(aux_all, aux)


def test_the_loss_is_its_definition_in_float64():
    """n_expert × Σ_e f_e P_e, with f_e the share of (token, slot) choices that went to expert e per real token and
    P_e the mean probability of e, over the real tokens of all blocks, written out with loops."""
    g = torch.Generator().manual_seed(0)
    E, k, tokens = 5, 2, 9
    routing = []
    for _ in range(3):
        probs = torch.softmax(torch.randn(tokens, E, generator=g, dtype=torch.float64), dim=-1)
        routing.append((probs, probs.topk(k, dim=-1).indices))
    real = [t % 4 != 3 for t in range(tokens)]
    n_real = 3 * sum(real)
    f = [sum(int(e in chosen[t].tolist()) for _, chosen in routing for t in range(tokens) if real[t]) / n_real
         for e in range(E)]
    P = [sum(probs[t, e].item() for probs, _ in routing for t in range(tokens) if real[t]) / n_real for e in range(E)]
    expected = E * sum(fe * pe for fe, pe in zip(f, P))
    got = load_balancing_loss(routing, E, torch.tensor(real))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # balanced routing: k, its minimum
    uniform = torch.full((E, E), 1.0 / E, dtype=torch.float64)
    assert load_balancing_loss([(uniform, torch.stack([torch.arange(E), (torch.arange(E) + 1) % E], 1))], E
                               ).item() == pytest.approx(k)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = GPT(tiny_moe(n_layer=3))
    checkpointed = GPT(tiny_moe(n_layer=3))
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing = True
    results = []
    for model in (plain, checkpointed):
        model.train()
        loss, aux = model(IDX, labels=IDX, lengths=LENGTHS, router_aux_loss=True)
        (loss + 0.5 * aux).backward()
        assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))
        results.append((loss.detach(), aux.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, a1, g1), (l2, a2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(a1, a2)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_batch_of_padding_only_and_bad_arguments():
    model = GPT(tiny_moe())
    aux = model(IDX, router_aux_loss=True, lengths=torch.zeros(3, dtype=torch.long))[1]
    assert aux.item() == 0.0
    with pytest.raises(ValueError, match=r"^lengths must have shape \(3,\) for a batch of 3 rows, got \(2,\)\.$"):
        model(IDX, router_aux_loss=True, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"^lengths \(the rows' real tokens\) is for router_aux_loss=True only\.$"):
        model(IDX, lengths=LENGTHS)
    dense = GPT(Config(name="dense", n_layer=1, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64,
                       block_size=64, mlp_class_name="LLaMAMLP", intermediate_size=48))
    with pytest.raises(ValueError, match=r"^router_aux_loss=True needs a mixture-of-experts model \(mlp_class_name "
                                         r"'LLaMAMoE'\): 'dense' has no router to balance\.$"):
        dense(IDX, router_aux_loss=True)


@pytest.mark.parametrize("coef", [-0.1, float("nan"), float("inf"), True])
def test_a_coefficient_that_is_not_a_non_negative_number_is_one_sentence(coef):
    with pytest.raises(ValueError, match=r"^--train.router_aux_loss_coef .*: pass 0 \(no load-balancing loss\) or a "
                                         r"positive number \(Mixtral's 0.02, Qwen-MoE's 0.001\)\.$"):
        TrainArgs(router_aux_loss_coef=coef).validate()


def test_a_model_without_experts_is_refused_before_training(tiny_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"^--train.router_aux_loss_coef 0.02: .* is not a mixture-of-experts model "
                                         r"and has no router to balance; leave it at 0\.$"):
        _train_full(tiny_ckpt, tmp_path / "run", 0.02)
    assert not (tmp_path / "run").exists()
    r = subprocess.run([sys.executable, "finetune/lora.py", "--model_name", "Llama-2-7b-hf", "--dry_run", "true",
                        "--train.router_aux_loss_coef", "0.02"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        "error: --train.router_aux_loss_coef 0.02: Llama-2-7b-hf is not a mixture-of-experts model and has no router "
        "to balance; leave it at 0."), r.stderr


def _train_full(ckpt, out, coef: float, lr: float = 1e-2, data=None):
    import full
    from lit_gpt.args import EvalArgs, IOArgs

    return full.setup(io=IOArgs(train_data_dir=data or ckpt / "data", checkpoint_dir=ckpt, out_dir=out),
                      train=TrainArgs(learning_rate=lr, max_steps=1, global_batch_size=4, micro_batch_size=2,
                                      lr_warmup_steps=0, router_aux_loss_coef=coef),
                      eval=EvalArgs(interval=0, max_iters=1, max_new_tokens=0), precision="32-true")


def test_a_run_logs_the_aux_loss_and_its_router_steps_down_its_gradient(moe_ckpt, tmp_path):  # noqa: F811
    """Step 1 of a full fine-tuning run with the coefficient: the logged `router_aux_loss` is the mean over the step's
    micro-batches of the base model's (padding left out), the logged `loss` is the cross-entropy a run without it
    logs, and AdamW's first step moves every router weight against the sign of the gradient of loss + coef × aux
    over those micro-batches, recomputed here."""
    import prepare_json
    from lit_gpt.training import load_data_dir, make_loader

    # answers of 1 to 30 words: micro-batches of two rows of different lengths, padded
    rows = [{"instruction": "Count.", "input": "", "output": " ".join(["7"] * n)} for n in range(1, 31)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    prepare_json.prepare(json_path=tmp_path / "rows.json", destination_path=tmp_path / "data", checkpoint_dir=moe_ckpt,
                         max_seq_length=256)
    coef = 5.0
    _train_full(moe_ckpt, tmp_path / "aux", coef, data=tmp_path / "data")
    _train_full(moe_ckpt, tmp_path / "plain", 0.0, data=tmp_path / "data")
    rows = {name: list(csv.DictReader((tmp_path / name / "logs" / "metrics.csv").read_text().splitlines()))
            for name in ("aux", "plain")}
    step1 = {name: next(r for r in rows[name] if r.get("loss")) for name in rows}
    assert "router_aux_loss" not in step1["plain"] or not step1["plain"]["router_aux_loss"]
    assert float(step1["aux"]["loss"]) == pytest.approx(float(step1["plain"]["loss"]), rel=1e-6)

    base = GPT.from_checkpoint(moe_ckpt).train()
    data = load_data_dir(tmp_path / "data", "train", "--io.train_data_dir")
    train_args = TrainArgs(global_batch_size=4, micro_batch_size=2)
    batches = iter(make_loader(data, train_args, 1337, 0, 1, 0, base.config.block_size))
    micro = [next(batches) for _ in range(2)]
    assert any(int(b["lengths"].min()) < b["input_ids"].size(1) for b in micro)  # (padding to leave out)
    total_aux = 0.0
    for b in micro:
        loss, aux = base(b["input_ids"], labels=b["labels"], lengths=b["lengths"], router_aux_loss=True)
        ((loss + coef * aux) / 2).backward()
        total_aux += aux.item() / 2
    assert float(step1["aux"]["router_aux_loss"]) == pytest.approx(total_aux, rel=1e-5)

    trained = load_file(tmp_path / "aux" / "lit_model_finetuned.pth")
    trained = trained.get("state_dict", trained)
    for i, block in enumerate(base.transformer.h):
        name = f"transformer.h.{i}.mlp.gate.weight"
        grad, moved = block.mlp.gate.weight.grad, trained[name] - block.mlp.gate.weight.detach()
        clear = grad.abs() > 1e-6
        assert clear.sum() > grad.numel() // 2
        assert torch.equal(torch.sign(moved[clear]), -torch.sign(grad[clear])), name
