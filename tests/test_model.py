import os

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import GPT, Config
from lit_gpt.model import chunked_cross_entropy
from lit_gpt.utils import atomic_save, check_checkpoint_dir, load_file, load_model_weights, save_model_weights


def tiny(**kw) -> Config:
    base = dict(name="tiny", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=61, padded_vocab_size=64,
                block_size=48, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                intermediate_size=48)
    base.update(kw)
    return Config(**base)


def test_loss_with_labels_equals_cross_entropy_on_shifted_logits():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 61, (3, 40))
    labels = x.clone()
    labels[:, :7] = -100
    labels[1, 20:] = -100
    ref = F.cross_entropy(model(x)[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(x, labels=labels), ref)


@pytest.mark.parametrize("chunk", [5, 1024])
def test_chunked_cross_entropy_gradients_match(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 30)
    h = torch.randn(2, 25, 16, requires_grad=True)
    t = torch.randint(0, 30, (2, 25))
    t[0, :3] = -100
    loss = chunked_cross_entropy(h, t, head, chunk_size=chunk)
    loss.backward()
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad = None
    head.weight.grad = None
    F.cross_entropy(head(h).reshape(-1, 30), t.reshape(-1)).backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, head.weight.grad)


def test_all_targets_masked_gives_zero_loss_with_a_graph():
    model = GPT(tiny())
    x = torch.randint(0, 61, (1, 10))
    loss = model(x, labels=torch.full_like(x, -100))
    assert loss.item() == 0.0
    loss.backward()  # must not fail


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 61, (2, 30))
    model(x, labels=x).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, labels=x).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size is 48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_decoding_without_a_kv_cache_is_a_clear_error():
    model = GPT(tiny())
    with pytest.raises(RuntimeError, match=r"no KV cache is set: call model.set_kv_cache\(\) first"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))


def test_configs_the_blocks_cannot_compute_are_refused():
    with pytest.raises(ValueError, match="rotary_percentage=0.3 of head_size=32 gives 9 rotary features"):
        tiny(n_embd=128, rotary_percentage=0.3)
    with pytest.raises(ValueError, match="shared_attention_norm=true needs parallel_residual=true"):
        tiny(shared_attention_norm=True)


def test_tied_embeddings_share_storage_and_survive_save_load(tmp_path):
    cfg = tiny(tie_embeddings=True)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    cfg.save(tmp_path)
    save_model_weights(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "lit_model.pth")
    loaded = GPT.from_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 61, (1, 12))
    torch.testing.assert_close(loaded(x), model(x))


def test_from_checkpoint_casts_dtype(tmp_path):
    model = GPT(tiny())
    model.config.save(tmp_path)
    save_model_weights(model, tmp_path)
    loaded = GPT.from_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.isfinite(loaded(torch.randint(0, 61, (1, 8))).float()).all()


def test_missing_weights_or_config_is_one_clear_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert_hf_checkpoint.py --checkpoint_dir"):
        GPT.from_checkpoint(tmp_path)


def test_weights_from_another_model_are_refused(tmp_path):
    model = GPT(tiny())
    other = GPT(tiny(n_layer=3))
    with pytest.raises(ValueError, match="do not match the model config"):
        load_model_weights(model, other.state_dict())


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(load_file(path)["a"], torch.ones(2))  # the previous complete file is intact
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|not allowed"):
        load_file(path)


def test_rms_norm_in_bfloat16_equals_transformers_llama_rms_norm():
    """Computed in float32 and cast before the weight, as transformers' LlamaRMSNorm: bit for bit in bfloat16 (a norm
    in bfloat16 differs in ~30% of its outputs, and the logits then drift from transformers')."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lit_gpt.model import RMSNorm

    torch.manual_seed(0)
    x = (torch.randn(4, 7, 576) * 3).to(torch.bfloat16)
    ours, theirs = RMSNorm(576, eps=1e-5), LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(576))
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
