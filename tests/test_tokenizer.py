import io
import json
import re

import pytest
import torch

from lit_gpt.tokenizer import Tokenizer

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokenizer",
    "sentencepiece trains on a few lines of text",
    "numbers 123 and 4567 appear too",
    "the dog sleeps; the fox runs",
] * 4
TEXTS = ["hello the fox", "  two leading spaces", "numbers 1234, punctuation; done", "héllo 日本 🙂", "a\nb\n"]


def train_sentencepiece(model_type: str = "bpe") -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_writer=buf, vocab_size=340, model_type=model_type, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(train_sentencepiece())
    return d


def test_sentencepiece_encode_decode_bos_eos(sp_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer(sp_dir)
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, [2])
    assert tok.vocab_size == 340
    assert tok.use_bos  # a SentencePiece model without tokenizer_config.json: Llama-style, BOS first
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == torch.long and ids.ndim == 1
        assert ids.tolist() == [1] + sp.encode(text)
        assert tok.encode(text, bos=False, eos=True).tolist() == sp.encode(text) + [2]
        assert tok.decode(ids) == sp.decode(sp.encode(text))
    assert tok.encode("hello the fox", max_length=2).tolist() == [1, sp.encode("hello the fox")[0]]
    # SentencePiece itself would spell "<s>" as bytes; special tokens must be single ids
    assert tok.encode("<s>hello</s>", bos=False).tolist() == [1, *sp.encode("hello"), 2]
    assert tok.decode([1, *sp.encode("hello"), 2], skip_special_tokens=True) == "hello"


def test_sentencepiece_respects_tokenizer_config(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "</s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tok = Tokenizer(tmp_path)
    assert not tok.use_bos
    assert tok.encode("hello")[0].item() != 1
    assert tok.encode("hello", bos=True)[0].item() == 1
    assert tok.stop_ids == [2, 3]


def build_hf_tokenizer(directory, post_processor_bos: bool = False):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(LINES, trainer=trainer)
    if post_processor_bos:
        hf.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                          special_tokens=[("<|im_start|>", 1)])
    hf.save(str(directory / "tokenizer.json"))
    return hf


def test_hf_tokenizer_special_tokens_and_ids(tmp_path):
    hf = build_hf_tokenizer(tmp_path)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "chat_template": template,
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = Tokenizer(tmp_path)
    assert tok.backend == "huggingface"
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.use_bos) == (1, 2, [2, 0], False)
    assert tok.vocab_size == hf.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.tolist() == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>", eos=True).tolist()
    assert ids[0] == 1 and ids[-2:] == [2, 2] and 1 not in ids[1:-2]
    assert tok.encode("hello", bos=True).tolist()[0] == 1
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_hf_tokenizer_bos_default_follows_post_processor(tmp_path):
    build_hf_tokenizer(tmp_path, post_processor_bos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    tok = Tokenizer(tmp_path)
    assert tok.use_bos
    ids = tok.encode("hello").tolist()
    assert ids[0] == 1 and ids.count(1) == 1
    # a text that already starts with BOS (a rendered chat template) does not get a second one
    assert tok.encode("<|im_start|>hello").tolist() == ids


def test_decode_stream_reassembles_multibyte_characters(tmp_path):
    build_hf_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    text = "héllo 日本 🙂 the fox"
    ids = tok.encode(text).tolist()
    pieces = list(tok.decode_stream(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_decode_stream_keeps_sentencepiece_spaces(sp_dir):
    tok = Tokenizer(sp_dir)
    ids = tok.encode("hello the fox jumps", bos=False).tolist()
    assert "".join(tok.decode_stream(ids)) == "hello the fox jumps"


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json and tokenizer\.model") as err:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing")


def test_chat_template_rendering(tmp_path):
    build_hf_tokenizer(tmp_path)
    # exercises what real templates use: a system-prompt default, loop.first, raise_exception, tojson with
    # non-ASCII text, the special-token variables and trim_blocks/lstrip_blocks whitespace control (which strips
    # the newline after a block tag, not after an expression)
    template = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
[system] Be brief.
    {% endif %}
[{{ message['role'] }}] {{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if tools is defined %}tools={{ tools | tojson }}
{% endif %}
{% if add_generation_prompt %}[assistant] {% endif %}"""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template,
    }))
    tok = Tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Grüß dich"}, {"role": "assistant", "content": "Hallo"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>\n[system] Be brief.\n[user] Grüß dich<|im_end|>\n[assistant] Hallo<|im_end|>\n[assistant] "
    )
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False, tools=[{"name": "café"}]) == (
        '<|im_start|>\n[system] Be brief.\n[user] Grüß dich<|im_end|>\ntools=[{"name": "café"}]\n'
    )
    with pytest.raises(ValueError, match="rejected the messages: unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_sandbox_and_missing_template(tmp_path):
    build_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ messages.__class__.__mro__ }}",
    }))
    with pytest.raises(ValueError, match="unsafe"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_a_broken_chat_template_is_one_sentence_naming_its_file(tmp_path):
    build_hf_tokenizer(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{% if messages %}x"}))
    with pytest.raises(ValueError) as e:
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    assert str(e.value).startswith(f"{str(config)!r}: the chat template does not parse as Jinja (")
    assert "\n" not in str(e.value)
    # chat and the prepare scripts stop at their start (building the prompt style), not at the first message
    from lit_gpt.data.prompts import prompt_style_from_name

    with pytest.raises(ValueError, match="the chat template does not parse"):
        prompt_style_from_name("chat_template", tokenizer=Tokenizer(tmp_path))
    # a chat_template.jinja takes priority, and is named when it is the broken one (or not text)
    jinja = tmp_path / "chat_template.jinja"
    jinja.write_text("{{ messages ")
    with pytest.raises(ValueError, match=f"^{re.escape(repr(str(jinja)))}: the chat template does not parse"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    jinja.write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ValueError, match=f"^{re.escape(repr(str(jinja)))} is not UTF-8 text"):
        Tokenizer(tmp_path)


def test_chat_template_file_and_named_templates(tmp_path):
    build_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "D{{ messages|length }}"}],
    }))
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    (tmp_path / "chat_template.jinja").write_text("J{% generation %}{{ messages[0]['content'] }}{% endgeneration %}")
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


def test_chat_template_matches_transformers(tmp_path):
    """transformers renders the same template to the same text (the reference implementation of chat templates)."""
    transformers = pytest.importorskip("transformers")
    build_hf_tokenizer(tmp_path)
    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": template,
    }))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path)
    messages = [{"role": "user", "content": " hi there "}, {"role": "assistant", "content": "héllo"},
                {"role": "user", "content": "again"}]
    for add in (True, False):
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add
        )
    text = tok.apply_chat_template(messages)
    assert tok.encode(text).tolist() == ref(text, add_special_tokens=False)["input_ids"]

    # an answer prefix to continue (lm-eval's gen_prefix): the turn left open, with a template that trims contents
    # and one that keeps them as they are
    for trims in (True, False):
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["chat_template"] = template if trims else template.replace(" | trim", "")
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        ref, tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer(tmp_path)
        for prefix in ("Answer:", "Answer: ", " The answer is\n"):
            history = messages + [{"role": "assistant", "content": prefix}]
            ours = tok.apply_chat_template(history, add_generation_prompt=False, continue_final_message=True)
            theirs = ref.apply_chat_template(history, tokenize=False, continue_final_message=True)
            assert ours == theirs, (trims, prefix)
            assert ours.endswith(prefix.strip()) or ours.endswith(prefix)
    with pytest.raises(ValueError, match="pass add_generation_prompt=False with it"):
        tok.apply_chat_template(messages, continue_final_message=True)

    # a chat_template.jinja beside a template in tokenizer_config.json: transformers takes the file (Hub repos that
    # moved their template there often keep an older one in the config), and so do we
    (tmp_path / "chat_template.jinja").write_text("NEW {% for m in messages %}<{{ m['role'] }}>{% endfor %}")
    ref, tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer(tmp_path)
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == "NEW <user><assistant><user>"
