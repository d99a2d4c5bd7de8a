"""lm-eval backend: our `lit_gpt` model class against lm-eval's own `hf` backend on the same weights (a tiny random
Llama and the real SmolLM2-135M, exported with scripts/convert_lit_checkpoint.py), base + unmerged adapter against the
merged checkpoint, the CLI, and its task-name errors. The tasks are the local ones in tests/eval_tasks/."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.utils import save_model_weights

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "eval_tasks"
TASKS = ["lit_mc", "lit_ppl", "lit_gen"]
SCRIPT = REPO / "eval" / "lm_eval_harness.py"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    # the task YAMLs name their data files relative to the repository root
    monkeypatch.chdir(REPO)


def _tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line for p in sorted(TASKS_DIR.glob("*.jsonl")) for line in p.read_text().splitlines()]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 3, trainer)
    # BOS written by the post-processor too, so that transformers' tokenizer (lm-eval's `hf` backend) adds it as well
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny Llama (GQA, padded vocabulary, BOS on every prompt) whose weights are large enough that greedy
    choices are not near-ties."""
    d = tmp_path_factory.mktemp("eval") / "tiny-llama"
    d.mkdir()
    _tokenizer(d)
    torch.manual_seed(0)
    cfg = Config(name="tiny-llama", block_size=128, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                 vocab_size=400, padding_multiple=64, bias=False, norm_class_name="RMSNorm",
                 mlp_class_name="LLaMAMLP", intermediate_size=128)
    cfg.save(d)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5 if "wte" in name else 2.0 / math.sqrt(p.size(1)))
    save_model_weights(model, d)
    return d


def _export_hf(checkpoint_dir: Path, out: Path) -> Path:
    cmd = [sys.executable, str(REPO / "scripts" / "convert_lit_checkpoint.py"), "--checkpoint_dir", str(checkpoint_dir),
           "--output_dir", str(out), "--dtype", "float32"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return out


def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _evaluate(lm, limit=None, tasks=TASKS) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=_task_manager(), limit=limit,
                                   bootstrap_iters=0, log_samples=True, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def _metrics(results: dict) -> dict[tuple[str, str], float]:
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                out[(task, key)] = value
    return out


def _responses(results: dict) -> dict[tuple[str, int], list]:
    return {(task, s["doc_id"]): s["resps"] for task, samples in results["samples"].items() for s in samples}


def assert_same_results(ours: dict, ref: dict, rel: float) -> None:
    a, b = _metrics(ours), _metrics(ref)
    assert a.keys() == b.keys() and len(a) >= 6
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=rel), key
    ra, rb = _responses(ours), _responses(ref)
    assert ra.keys() == rb.keys()
    for key in ra:
        for x, y in zip(ra[key], rb[key], strict=True):
            x, y = x[0], y[0]
            if isinstance(x, str):  # generate_until: the same text
                assert x == y, key
            elif isinstance(x, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                assert x[0] == pytest.approx(y[0], rel=rel, abs=1e-5) and bool(x[1]) == bool(y[1]), key
            else:  # loglikelihood_rolling: a total log-probability
                assert x == pytest.approx(y, rel=rel), key


def _hf_lm(hf_dir: Path, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", **kwargs)


def _our_lm(checkpoint_dir: Path, **kwargs):
    from lit_gpt.lm_eval import LitGPTLM

    return LitGPTLM(checkpoint_dir=checkpoint_dir, dtype="float32", device="cpu", **kwargs)


# ---------------------------------------------------------------------------------------------- against lm-eval's hf
@pytest.mark.slow
def test_tiny_model_matches_lm_eval_hf_backend(tiny_ckpt, tmp_path):
    """Every request type, with a short max_length so documents are scored in several rolling windows and long
    generation prompts are cut from the left."""
    hf_dir = _export_hf(tiny_ckpt, tmp_path / "hf")
    ref = _evaluate(_hf_lm(hf_dir, batch_size=4, max_length=32))
    ours = _evaluate(_our_lm(tiny_ckpt, batch_size=3, max_length=32))
    assert_same_results(ours, ref, rel=1e-4)
    # the windows really did split the documents: 8 requests but more forwards
    assert ours["results"]["lit_ppl"]["word_perplexity,none"] > 1


@pytest.fixture(scope="module")
def tiny_gemma2_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """`tiny_ckpt`'s tokenizer under a random tiny Gemma 2: sliding windows shorter than the scored windows,
    soft-capped scores and logits (which every log-likelihood must go through), scaled embeddings."""
    d = tmp_path_factory.mktemp("eval") / "tiny-gemma2"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tiny_ckpt / "tokenizer.json").read_bytes())
    # (named: transformers would otherwise pick its Gemma tokenizer class for a gemma2 config, which wants <unk>)
    config = dict(json.loads((tiny_ckpt / "tokenizer_config.json").read_text()),
                  tokenizer_class="PreTrainedTokenizerFast")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    cfg = Config(name="tiny-gemma2", block_size=128, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                 vocab_size=400, padding_multiple=64, bias=False, norm_class_name="RMSNorm", norm_unit_offset=True,
                 mlp_class_name="GemmaMLP", gelu_approximate="tanh", intermediate_size=128, scale_embeddings=True,
                 post_attention_norm=True, post_mlp_norm=True, attention_scores_scalar=24, tie_embeddings=True,
                 attention_logit_softcapping=5.0, final_logit_softcapping=4.0, sliding_window_size=8,
                 sliding_window_indices=[1, 0])
    cfg.save(d)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if "wte" in name else 2.0 / math.sqrt(p.size(-1)))
    save_model_weights(model, d)
    return d


@pytest.mark.slow
def test_tiny_gemma2_matches_lm_eval_hf_backend(tiny_gemma2_ckpt, tmp_path):
    hf_dir = _export_hf(tiny_gemma2_ckpt, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "gemma2"
    ref = _evaluate(_hf_lm(hf_dir, batch_size=4, max_length=32))
    ours = _evaluate(_our_lm(tiny_gemma2_ckpt, batch_size=3, max_length=32))
    assert_same_results(ours, ref, rel=1e-4)


@pytest.mark.slow
def test_smollm2_matches_lm_eval_hf_backend(smollm2_checkpoint, tmp_path):
    hf_dir = _export_hf(smollm2_checkpoint, tmp_path / "hf")
    ref = _evaluate(_hf_lm(hf_dir, batch_size=8, max_length=48), limit=6)
    ours = _evaluate(_our_lm(smollm2_checkpoint, batch_size=8, max_length=48), limit=6)
    assert_same_results(ours, ref, rel=1e-4)
    # a real model knows some of these; a tokenisation mismatch would not show as equal-but-random numbers
    assert ours["results"]["lit_mc"]["acc,none"] >= 0.5


def test_import_registers_the_model_for_lm_evals_api(tiny_ckpt):
    import lm_eval

    import lit_gpt.lm_eval  # noqa: F401

    results = lm_eval.simple_evaluate(model="lit_gpt", model_args=f"checkpoint_dir={tiny_ckpt},dtype=float32",
                                      tasks=["lit_mc"], task_manager=_task_manager(), limit=3, bootstrap_iters=0,
                                      batch_size=2, device="cpu")
    assert set(results["results"]["lit_mc"]) >= {"acc,none", "acc_norm,none"}


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.slow
@pytest.mark.parametrize("method", ["etherplus", "lora"])
def test_base_plus_unmerged_adapter_equals_merged_checkpoint(tiny_ckpt, tmp_path, method):
    from lit_gpt.adapters import AdapterConfig, apply_adapters, merge_adapters, save_adapters
    from lit_gpt.lm_eval import LitGPTLM

    model = GPT.from_checkpoint(tiny_ckpt)
    apply_adapters(model, AdapterConfig(method=method, nb=4, r=4, targets=["query", "value", "mlp"]))
    torch.manual_seed(1)
    with torch.no_grad():  # both methods start as the identity: move away from it
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * 0.5)
    adapter = save_adapters(model, tmp_path / f"lit_model_{method}_finetuned.pth")

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.name != "lit_model.pth":
            shutil.copy(f, merged_dir / f.name)
    save_model_weights(merge_adapters(model), merged_dir)

    unmerged = _evaluate(LitGPTLM(checkpoint_dir=tiny_ckpt, adapter_path=adapter, dtype="float32", batch_size=4))
    merged = _evaluate(LitGPTLM(checkpoint_dir=merged_dir, dtype="float32", batch_size=4))
    base = _evaluate(LitGPTLM(checkpoint_dir=tiny_ckpt, dtype="float32", batch_size=4), tasks=["lit_ppl"])
    assert_same_results(unmerged, merged, rel=1e-4)
    assert _metrics(unmerged)[("lit_ppl", "word_perplexity,none")] != pytest.approx(
        _metrics(base)[("lit_ppl", "word_perplexity,none")], rel=1e-3)


# ---------------------------------------------------------------------------------------------- CLI
def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def test_cli_runs_local_tasks_and_saves_lm_evals_json(tiny_ckpt, tmp_path):
    out = tmp_path / "results" / "eval.json"
    result = _run("--checkpoint_dir", str(tiny_ckpt), "--include_path", str(TASKS_DIR), "--eval_tasks",
                  "['lit_mc', 'lit_p*']", "--limit", "4", "--batch_size", "2", "--precision", "32-true",
                  "--device", "cpu", "--bootstrap_iters", "0", "--save_filepath", str(out))
    assert result.returncode == 0, result.stderr
    assert "|lit_mc |" in result.stdout and "acc_norm" in result.stdout and "word_perplexity" in result.stdout
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"lit_mc", "lit_ppl"}
    assert 0.0 <= saved["results"]["lit_mc"]["acc,none"] <= 1.0
    assert saved["results"]["lit_ppl"]["bits_per_byte,none"] > 0


def _harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_eval_harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_this_repositorys_tasks_lose_lm_evals_metadata_hint(tmp_path):
    import logging

    from lit_gpt.lm_eval import build_task_manager

    harness = _harness()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for f in ("quickstart.yaml", "utils.py"):
        text = (REPO / "eval" / "tasks" / "quickstart" / f).read_text()
        (theirs / f).write_text(text.replace("task: quickstart", "task: their_task"))
    manager = build_task_manager([REPO / "eval" / "tasks" / "quickstart", theirs], names=["quickstart", "their_task"])
    assert harness.own_tasks(manager) == ["quickstart"]
    logger = logging.getLogger("lm_eval.api.task")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with harness.quiet_data_file_hint(harness.own_tasks(manager)):
            for name in ("quickstart", "their_task"):
                logger.warning(f"{name}: Custom kwargs can be passed to `--metadata` in console")
            logger.warning("quickstart: something else")
    finally:
        logger.removeHandler(handler)
    assert [m.split(":")[0] for m in seen] == ["their_task", "quickstart"]
    assert not logger.filters


def _parsed_eval_tasks(*args: str) -> object:
    return _parsed_flags(*args)["eval_tasks"]


def _parsed_flags(*args: str) -> dict:
    """What the script's parser makes of `args` (in this process: a subprocess per case cost seconds of imports)."""
    import contextlib
    import io

    import yaml

    from lit_gpt.cli import run_cli

    harness, out = _harness(), io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        run_cli(harness.main, run_config_fix=harness.RUN_CONFIG_FIX, arg_check=harness.lm_eval_flag_hint,
                args=["--checkpoint_dir", "unused", *args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_eval_tasks_takes_a_name_a_comma_separated_string_or_a_list(tmp_path):
    assert _parsed_eval_tasks("--eval_tasks", "quickstart") == "quickstart"
    assert _parsed_eval_tasks("--eval_tasks", "a,b") == "a,b"
    assert _parsed_eval_tasks("--eval_tasks", "['a', 'b']") == ["a", "b"]
    assert _parsed_eval_tasks("--eval_tasks", "[a, b]") == ["a", "b"]
    # `+` adds to the names given before it, not to the default set
    assert _parsed_eval_tasks("--eval_tasks+", "q") == ["q"]
    assert _parsed_eval_tasks("--eval_tasks", "a", "--eval_tasks+", "b") == ["a", "b"]
    config = tmp_path / "eval.yaml"
    config.write_text("eval_tasks:\n  - x\n  - y\n")
    assert _parsed_eval_tasks("--config", str(config)) == ["x", "y"]
    assert _parsed_eval_tasks() is None

    task_names = _harness().task_names
    assert task_names(None) == ["arc_challenge", "piqa", "hellaswag", "hendrycksTest-*"]
    assert task_names("quickstart") == ["quickstart"]
    assert task_names("a, b,") == ["a", "b"]
    assert task_names(["a", "b,c"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="--eval_tasks is empty"):
        task_names(" , ")


def test_help_shows_the_whole_description_and_the_eval_tasks_forms():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps it
    description = text.split("options:")[0]
    assert "--include_path eval/tasks/quickstart --eval_tasks quickstart" in description
    assert "--eval_tasks arc_easy,piqa" in text and "--eval_tasks+ NAME" in text and "--metadata '{" in text


def test_cli_metadata_reaches_the_task_and_results_record_batch_size_and_device(tiny_ckpt, tmp_path):
    """--eval_tasks as a plain name, --metadata naming the quickstart task's data file, and the results JSON's
    `config` recording the batch size and device the model ran with."""
    rows = [{"prompt": f"Question {i}?", "output": "yes"} for i in range(3)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval.json"
    quickstart = str(REPO / "eval" / "tasks" / "quickstart")
    result = _run("--checkpoint_dir", str(tiny_ckpt), "--include_path", quickstart, "--eval_tasks", "quickstart",
                  "--metadata", json.dumps({"data_file": str(data)}), "--batch_size", "2", "--device", "cpu",
                  "--precision", "32-true", "--bootstrap_iters", "0", "--save_filepath", str(out))
    assert result.returncode == 0, result.stderr
    # lm-eval's hint that such a task takes --metadata is for tasks that do not say so themselves
    assert "Custom kwargs can be passed" not in result.stderr
    saved = json.loads(out.read_text())
    assert saved["n-samples"]["quickstart"]["original"] == 3  # our file, not data/quickstart/test.jsonl
    assert saved["config"]["batch_size"] == 2 and saved["config"]["device"] == "cpu"

    missing = tmp_path / "missing.jsonl"
    result = _run("--checkpoint_dir", str(tiny_ckpt), "--include_path", quickstart, "--eval_tasks", "quickstart",
                  "--metadata", json.dumps({"data_file": str(missing)}))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "--metadata" in errors[0], result.stderr


def test_bad_device_is_one_line():
    for device, expected in (("foo", "--device 'foo' is not a device"), ("cuda:99", "--device cuda:99")):
        result = _run("--checkpoint_dir", "unused", "--device", device)
        assert result.returncode == 1 and result.stderr.startswith(f"error: {expected}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_cli_reports_task_data_that_cannot_be_downloaded_in_one_line(tiny_ckpt, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: lit-gpt-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
    )
    result = _run("--checkpoint_dir", str(tiny_ckpt), "--include_path", str(tmp_path), "--eval_tasks",
                  "['hub_task']", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hub_task" in errors[0] and "--include_path" in errors[0], result.stderr


def test_unknown_local_task_lists_close_matches():
    from lit_gpt.lm_eval import resolve_tasks

    with pytest.raises(ValueError, match=r"Unknown lm-eval task 'lit_mcc'\. Close matches: lit_mc"):
        resolve_tasks(["lit_mc", "lit_mcc"], _task_manager())
    assert resolve_tasks(["lit_*"], _task_manager()) == ["lit_gen", "lit_mc", "lit_ppl"]


def test_bad_model_arguments_are_one_sentence(tiny_ckpt):
    from lit_gpt.lm_eval import LitGPTLM

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LitGPTLM(checkpoint_dir=tiny_ckpt, batch_size="auto")
    with pytest.raises(ValueError, match="Unknown precision 'bf17-true'"):
        LitGPTLM(checkpoint_dir=tiny_ckpt, precision="bf17-true")
    with pytest.raises(ValueError, match="max_length must be between 2 and the model's block_size 128"):
        LitGPTLM(checkpoint_dir=tiny_ckpt, max_length=4096)
    # a continuation longer than the context: one sentence, where it failed in torch.gather on tensor shapes
    lm = LitGPTLM(checkpoint_dir=tiny_ckpt, max_length=8, device="cpu", precision="32-true")
    with pytest.raises(ValueError, match=r"continuation has 9 tokens, more than the context of 8 tokens .* raise "
                                         r"--max_length"):
        lm._loglikelihood_tokens([(None, [1, 2], list(range(3, 12)))], disable_tqdm=True)
    assert len(lm._loglikelihood_tokens([(None, [1, 2], list(range(3, 11)))], disable_tqdm=True)) == 1


def test_bf16_scores_are_a_float32_log_softmax_of_the_bf16_logits(tiny_ckpt):
    """Under bf16-true the model computes in bfloat16, but the log-softmax (a sum of exponentials over the whole
    vocabulary) runs in float32, as lm-eval's hf backend does: a bfloat16 one is off by 1e-2 nats and more."""
    from lit_gpt.lm_eval import LitGPTLM

    lm = LitGPTLM(checkpoint_dir=tiny_ckpt, device="cpu", precision="bf16-true")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    context, continuation = [5, 17, 33, 2, 9, 41], [7, 12, 3]
    (score, _), = lm._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = lm.model(tokens[:, :-1])[0, len(context) - 1:]
    assert logits.dtype == torch.bfloat16
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    assert score == pytest.approx(expected, abs=1e-5)


def test_lit_gpt_no_progress_turns_off_the_backends_bars(tiny_ckpt, capsys, monkeypatch):
    from lit_gpt.lm_eval import LitGPTLM

    lm = LitGPTLM(checkpoint_dir=tiny_ckpt, device="cpu", precision="32-true")
    for off in ("0", "1"):
        monkeypatch.setenv("LIT_GPT_NO_PROGRESS", off)
        lm._loglikelihood_tokens([(None, [1, 2], [3, 4])])
        assert ("lit_gpt loglikelihood" in capsys.readouterr().err) is (off == "0")


@pytest.fixture(scope="module")
def builtin_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.mark.slow
def test_reference_task_names_map_to_lm_eval_04(builtin_task_manager):
    from lit_gpt.lm_eval import resolve_tasks

    notes = []
    names = resolve_tasks(["arc_challenge", "truthfulqa_mc", "hendrycksTest-*"], builtin_task_manager, notes)
    assert names[:3] == ["arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"]
    mmlu = names[3:]
    assert len(mmlu) == 57 and "mmlu_abstract_algebra" in mmlu and not any("generative" in n for n in mmlu)
    assert len(notes) == 2 and "truthfulqa_mc1" in notes[0] and "mmlu_*" in notes[1]
    with pytest.raises(ValueError, match=r"Unknown lm-eval task 'arc_chalenge'\. Close matches: arc_challenge"):
        resolve_tasks(["arc_chalenge"], builtin_task_manager)


@pytest.mark.slow
def test_seed_command_offline_fails_with_one_sentence(tiny_ckpt):
    result = _run("--eval_tasks", "['arc_challenge', 'truthfulqa_mc', 'hendrycksTest-*']", "--precision",
                  "bf16-true", "--checkpoint_dir", str(tiny_ckpt),
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Hugging Face Hub" in errors[0], result.stderr
    assert "truthfulqa_mc1" in result.stderr and "mmlu_" in result.stderr  # the printed name notes


def test_chat_template_continues_an_answer_prefix_as_lm_evals_hf_backend_does(tmp_path):
    """lm-eval asks for no generation prompt when the last message is a task's `gen_prefix`: its `hf` backend leaves
    that assistant turn open (transformers' continue_final_message), and retries without the system message when
    the template refuses one."""
    from types import SimpleNamespace

    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from lit_gpt.lm_eval import LitGPTLM
    from lit_gpt.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<|im_end|>": 1}
    HFTokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": template}))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    lm = SimpleNamespace(tokenizer=Tokenizer(tmp_path))
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    with_prefix = question + [{"role": "assistant", "content": "Answer:"}]
    got = LitGPTLM.apply_chat_template(lm, with_prefix, add_generation_prompt=False)
    assert got == ref.apply_chat_template(with_prefix[1:], tokenize=False, continue_final_message=True)
    assert got.endswith("<|im_start|>assistant\nAnswer:")
    got = LitGPTLM.apply_chat_template(lm, question, add_generation_prompt=True)
    assert got == ref.apply_chat_template(question[1:], tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------- audit 4
def _shuffling_task(folder: Path) -> Path:
    """lit_mc with its choices shuffled by Python's global `random` while its documents are processed, as lm-eval's
    GPQA zero-shot and metabench permuted tasks do."""
    folder.mkdir()
    (folder / "utils.py").write_text(
        "import random\n\nimport datasets\n\n\ndef shuffle(dataset):\n    rows = []\n    for doc in dataset:\n"
        "        choices = list(doc['choices'])\n        right = choices[doc['answer']]\n"
        "        random.shuffle(choices)\n        rows.append({**doc, 'choices': choices, 'answer': "
        "choices.index(right)})\n    return datasets.Dataset.from_list(rows)\n")
    text = (TASKS_DIR / "lit_mc.yaml").read_text().replace("task: lit_mc", "task: lit_shuffled").replace(
        "tests/eval_tasks/lit_mc.jsonl", str(TASKS_DIR / "lit_mc.jsonl"))
    (folder / "lit_shuffled.yaml").write_text(text + "process_docs: !function utils.shuffle\n")
    return folder


def _choice_orders(samples_file: Path) -> list[list[str]]:
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return [[arg[1] for arg in row["arguments"]] for row in sorted(rows, key=lambda r: r["doc_id"])]


def test_seed_is_applied_before_the_tasks_shuffle_their_choices(tiny_ckpt, tmp_path):
    """lm-eval seeds before it loads the tasks; we loaded them first, so a task that shuffles its choices while its
    documents are processed got an order that depended on whatever had run before (on a fresh machine: another
    score each run)."""
    import random

    harness, tasks = _harness(), _shuffling_task(tmp_path / "tasks")
    orders = []
    for before in (0, 999):  # whatever the global generators hold before the run
        random.seed(before)
        out = tmp_path / f"run{before}" / "eval.json"
        harness.main(checkpoint_dir=tiny_ckpt, include_path=tasks, eval_tasks="lit_shuffled", precision="32-true",
                     device="cpu", bootstrap_iters=0, seed=1234, log_samples=True, save_filepath=out)
        orders.append(_choice_orders(out.with_name("eval_samples_lit_shuffled.jsonl")))
        assert json.loads(out.read_text())["config"]["random_seed"] == 1234
    assert orders[0] == orders[1]
    assert any(order != [" " + c for c in row["choices"]] for order, row in zip(orders[0], (
        json.loads(line) for line in (TASKS_DIR / "lit_mc.jsonl").read_text().splitlines())))  # it did shuffle


def test_cli_chat_template_system_instruction_samples_and_record(tiny_ckpt, tmp_path):
    """--apply_chat_template, --system_instruction, --fewshot_as_multiturn (on by default with a template),
    --gen_kwargs and --log_samples, which only the Python API reached; the results record max_length, precision
    and the chat settings."""
    ckpt = tmp_path / "chat"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "results" / "eval.json"
    harness = _harness()
    harness.main(checkpoint_dir=ckpt, include_path=TASKS_DIR, eval_tasks="lit_gen", precision="32-true",
                 device="cpu", bootstrap_iters=0, limit=2, num_fewshot=1, max_length=100, apply_chat_template=True,
                 system_instruction="Be brief.", gen_kwargs="max_gen_toks=3", log_samples=True, save_filepath=out)
    rows = [json.loads(line) for line in (out.parent / "eval_samples_lit_gen.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    prompt, settings = rows[0]["arguments"][0]
    assert prompt.startswith("<|system|>Be brief.</s><|user|>Question: ") and prompt.endswith("<|assistant|>")
    assert prompt.count("<|user|>") == 2 and prompt.count("<|assistant|>") == 2  # the few-shot example as turns
    assert settings["max_gen_toks"] == 3
    record = json.loads(out.read_text())
    assert "samples" not in record
    c = record["config"]
    assert (c["max_length"], c["precision"], c["apply_chat_template"], c["system_instruction"],
            c["fewshot_as_multiturn"]) == (100, "32-true", True, "Be brief.", True)
    assert c["chat_template"] == config["chat_template"] and c["add_bos_token"] is True
    with pytest.raises(ValueError, match="--fewshot_as_multiturn true needs --apply_chat_template true"):
        harness.main(checkpoint_dir=ckpt, eval_tasks="lit_gen", fewshot_as_multiturn=True)
    with pytest.raises(ValueError, match="--log_samples writes its files next to the results JSON, which "
                                         "--save_filepath false turns off: drop one of the two"):
        harness.main(checkpoint_dir=ckpt, eval_tasks="lit_gen", log_samples=True, save_filepath=False)


def test_generation_settings_the_backend_does_not_apply_are_refused_before_the_model_loads(tmp_path):
    """lm-eval's hf backend passes a task's repetition_penalty, num_beams, ... to transformers; ours dropped them
    without a word, and its text differed. A value that asks for what generation does anyway is fine."""
    from lit_gpt.lm_eval import check_gen_kwargs

    check_gen_kwargs({"until": ["\n"], "max_gen_toks": 4, "do_sample": False, "num_beams": 1})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = (TASKS_DIR / "lit_gen.yaml").read_text().replace("task: lit_gen", "task: lit_penalty").replace(
        "tests/eval_tasks/lit_gen.jsonl", str(TASKS_DIR / "lit_gen.jsonl"))
    (tasks / "lit_penalty.yaml").write_text(text.replace("  do_sample: false\n",
                                                         "  do_sample: false\n  repetition_penalty: 1.3\n"))
    harness = _harness()
    never = tmp_path / "never_loaded"  # the model's folder is not even looked at
    with pytest.raises(ValueError, match=r"Task 'lit_penalty'.s generation_kwargs set repetition_penalty=1.3, which "
                                         r"the lit_gpt backend does not apply \(it applies until, max_gen_toks, "
                                         r"do_sample, temperature, top_k, top_p\)"):
        harness.main(checkpoint_dir=never, include_path=tasks, eval_tasks="lit_penalty")
    with pytest.raises(ValueError, match="--gen_kwargs set num_beams=4, which the lit_gpt backend does not apply"):
        harness.main(checkpoint_dir=never, include_path=TASKS_DIR, eval_tasks="lit_gen", gen_kwargs="num_beams=4")


def test_a_greedy_task_ignores_its_sampling_settings_as_the_hf_backend_does(tiny_ckpt, tmp_path):
    """A greedy task (do_sample: false) may still carry sampling settings, such as vLLM's `top_k: -1` for "off":
    lm-eval's hf backend hands them to transformers, which ignores them when not sampling, so ours must give the same
    greedy text; passing them on to the sampler would stop the run with "top_k must be a positive integer", after the
    other tasks had run."""
    from lm_eval.api.instance import Instance

    from lit_gpt.convert_hf import convert_lit_checkpoint

    hf_dir = convert_lit_checkpoint(tiny_ckpt, tmp_path / "hf", dtype="float32")
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False, "temperature": 1.0, "top_k": -1}

    def requests():
        context = "Question: what is 2 + 2?\nAnswer:"
        return [Instance(request_type="generate_until", doc={}, arguments=(context, dict(gen)), idx=0)]

    ref = _hf_lm(hf_dir).generate_until(requests())
    torch.manual_seed(1)  # (greedy: any seed gives the same text)
    ours = _our_lm(tiny_ckpt).generate_until(requests())
    assert ours == ref and ref[0].strip()


def test_a_choice_that_merges_into_its_context_is_refused_even_beside_other_choices(tiny_ckpt):
    """With `target_delimiter: ""` an answer can merge into the context's last token: its continuation is empty and
    was scored as certain (log p = 0) whenever another choice shared the context; only a lone one was refused."""
    lm = _our_lm(tiny_ckpt)
    requests = [(("The capital of France is Par", "ma"), [5, 6, 7], [8]),
                (("The capital of France is Par", "is"), [5, 6, 7], [])]  # (grouped with the first)
    with pytest.raises(ValueError, match=r"request \(context ending 'The capital of France is Par', continuation "
                                         r"'is'\) has a continuation that encodes to no tokens of its own.*"
                                         "target_delimiter"):
        lm._loglikelihood_tokens(requests)


def test_results_are_saved_before_the_tables_are_printed(tiny_ckpt, tmp_path, monkeypatch):
    """An evaluation can take hours: its tables printed to a reader gone (`| head`), or an error of lm-eval's table
    printer, must not lose the results JSON (the tables used to be printed first)."""
    import lm_eval.utils

    def closed_stdout(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(lm_eval.utils, "make_table", closed_stdout)
    out = tmp_path / "eval.json"
    with pytest.raises(BrokenPipeError):
        _harness().main(checkpoint_dir=tiny_ckpt, include_path=TASKS_DIR, eval_tasks="lit_mc", precision="32-true",
                        device="cpu", bootstrap_iters=0, limit=2, save_filepath=out)
    assert "lit_mc" in json.loads(out.read_text())["results"]


def test_results_that_cannot_be_saved_are_still_printed(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A disk that fills while the results are saved: the tables still print, then the one-sentence write error
    (before, a traceback and nothing at all after an evaluation of hours)."""
    import errno

    from lit_gpt import utils
    from lit_gpt.utils import WriteError

    harness = _harness()

    def full_disk(path, text):
        raise WriteError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(utils, "atomic_write_text", full_disk)
    with pytest.raises(WriteError, match="No space left on device; free space there"):
        harness.main(checkpoint_dir=tiny_ckpt, include_path=TASKS_DIR, eval_tasks="lit_mc", precision="32-true",
                     device="cpu", bootstrap_iters=0, limit=2, save_filepath=tmp_path / "eval.json")
    assert "lit_mc" in capsys.readouterr().out  # the table


# ---------------------------------------------------------------------------------------------- default results file
RESULTS_NAME = r"results_\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(_\d+)?\.json"


def test_results_are_written_by_default_into_the_models_eval_folder_never_over_an_earlier_file(tiny_ckpt, tmp_path,
                                                                                             capsys, monkeypatch):
    """litgpt's `evaluate` always writes its results; ours wrote them only with --save_filepath, so a finished run
    of hours without it left nothing behind. Now: a new eval/results_<UTC time>.json in the model's folder (the
    fine-tuning run's with --adapter_path), --log_samples beside it, and --save_filepath false for none."""
    import re

    from test_merge import make_run

    from lit_gpt.adapters import AdapterConfig

    # lm-eval records torch's environment report in every result, which runs `pip list` (1.5 s of each run here)
    monkeypatch.setattr("torch.utils.collect_env.get_pretty_env_info", lambda: "(not collected in this test)")
    harness = _harness()
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_ckpt, ckpt)
    quick = dict(include_path=TASKS_DIR, eval_tasks="lit_mc", precision="32-true", device="cpu", bootstrap_iters=0,
                 limit=2)
    returned = harness.main(checkpoint_dir=ckpt, log_samples=True, **quick)
    first, = (ckpt / "eval").glob("results_*.json")
    assert re.fullmatch(RESULTS_NAME, first.name)
    saved = json.loads(first.read_text())
    assert set(saved) >= {"results", "configs", "versions", "n-samples", "config"} and "samples" not in saved
    assert saved["results"] == json.loads(json.dumps(returned["results"]))
    assert 0.0 <= saved["results"]["lit_mc"]["acc,none"] <= 1.0 and saved["n-samples"]["lit_mc"]["effective"] == 2
    samples = first.with_name(f"{first.stem}_samples_lit_mc.jsonl")
    assert len(samples.read_text().splitlines()) == 2
    assert sorted(p.name for p in (ckpt / "eval").iterdir()) == [first.name, samples.name]
    err = capsys.readouterr().err
    assert f"Saved results to {first}\n" in err and f"Saved 2 samples of lit_mc to {samples}\n" in err

    text = first.read_text()
    harness.main(checkpoint_dir=ckpt, **quick)  # (often in the same second as the first)
    files = sorted((ckpt / "eval").glob("results_*.json"))
    assert len(files) == 2 and all(re.fullmatch(RESULTS_NAME, f.name) for f in files)
    assert first.read_text() == text
    second, = set(files) - {first}
    assert f"Saved results to {second}\n" in capsys.readouterr().err
    # two runs that end in the same second (deterministically here): the second name gets a number
    from datetime import datetime, timezone

    when = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    names = [harness.new_results_file(tmp_path / "same", when).name for _ in range(3)]
    assert names == ["results_2025-03-04T05-06-07.json", "results_2025-03-04T05-06-07_2.json",
                     "results_2025-03-04T05-06-07_3.json"]

    harness.main(checkpoint_dir=ckpt, save_filepath=False, **quick)
    assert len(list((ckpt / "eval").iterdir())) == 3 and "Saved" not in capsys.readouterr().err

    # an unmerged adapter: its run's folder, not the base model's
    adapter = make_run(tmp_path / "run", ckpt, AdapterConfig(method="lora", r=2, alpha=4))
    harness.main(adapter_path=adapter, **quick)
    in_run, = (tmp_path / "run" / "eval").glob("results_*.json")
    assert json.loads(in_run.read_text())["results"]["lit_mc"]
    assert len(list((ckpt / "eval").iterdir())) == 3


def test_an_unwritable_default_results_folder_fails_before_anything_is_evaluated(tmp_path, capsys, monkeypatch):
    from lit_gpt.cli import run_cli

    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    harness = _harness()
    ckpt = tmp_path / "model"  # no model in it, and no task folder: had either been loaded first, that was the error
    ckpt.mkdir()
    (ckpt / "eval").write_text("a file where the results folder would go")  # (root may write anywhere else)
    args = ["--checkpoint_dir", str(ckpt), "--eval_tasks", "quickstart", "--include_path", str(tmp_path / "none")]
    with pytest.raises(SystemExit) as e:
        run_cli(harness.main, args=args)
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        f"error: The results JSON cannot be written to its default folder {str(ckpt / 'eval')!r} because "
        f"{str(ckpt / 'eval')!r} is a file, not a folder; pass --save_filepath with a file you can write (or "
        "--save_filepath false to write none).\n")
    # the flag's forms: a file, true (the default folder), false (no file)
    for value, parsed in (("out/r.json", "out/r.json"), ("true", True), ("false", False)):
        assert _parsed_flags("--save_filepath", value)["save_filepath"] == parsed
    # with false, the folder is not looked at: the next check is the one that fails
    with pytest.raises(SystemExit):
        run_cli(harness.main, args=[*args, "--save_filepath", "false"])
    assert "--save_filepath" not in capsys.readouterr().err
