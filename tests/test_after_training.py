"""What happens after training (merge, chat, generate, the lm-eval wrapper, plot_logs): the merge probe runs the
adapters in eval mode, an adapter file alone keeps its prompt format, a re-merge leaves no stale prompt style, and
bad flags fail in one sentence naming the flag before the model or the tasks are loaded."""

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_gpt import GPT
from lit_gpt.adapters import AdapterConfig, apply_adapters, load_adapters, save_adapters
from lit_gpt.cli import run_cli
from lit_gpt.merge import load_finetuned, merge_checkpoint, read_finetuned, resolve_prompt_style
from lit_gpt.utils import load_file

from test_merge import make_base, make_run

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("after") / "tiny-llama")


def trained_adapter(base: Path, config: AdapterConfig, path: Path, prompt_style=None) -> Path:
    """An adapter file far from its initialisation, saved on its own (no run folder around it)."""
    model = GPT.from_checkpoint(base)
    apply_adapters(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapters(model, path, **({} if prompt_style is None else {"prompt_style": prompt_style}))


def quiet_merge(adapter: Path, **kwargs) -> tuple[Path, list[str]]:
    logs: list[str] = []
    out = merge_checkpoint(adapter, precision="32-true", log=logs.append, **kwargs)
    return out, logs


# ---------------------------------------------------------------------------------------------- 1. eval-mode probe
@pytest.mark.parametrize("config", [AdapterConfig(method="lora", r=4, alpha=8, dropout=0.05),
                                    AdapterConfig(method="ether", nb=4, dropout=0.1, flip_side=True)],
                         ids=["lora-dropout", "ether-dropout"])
def test_merge_probe_compares_eval_mode_logits(base, tmp_path, config):
    adapter = make_run(tmp_path / "run", base, config)
    out, logs = quiet_merge(adapter)
    info = yaml.safe_load((out / "merge_info.yaml").read_text())
    # dropout left on in the unmerged forward gave differences of the order of the logits themselves
    assert info["probe_max_abs_diff"] < 1e-4, logs
    assert not any("warning" in line for line in logs), logs
    # what chat and eval load unmerged is in eval mode too, adapter modules included
    model = load_finetuned(base, adapter)
    assert not any(m.training for m in model.modules())
    tokens = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))


# ---------------------------------------------------------------------------------------------- 2. lone adapter files
def test_an_adapter_file_alone_keeps_its_prompt_style(base, tmp_path):
    config = AdapterConfig(method="etherplus", nb=4)
    lone = trained_adapter(base, config, tmp_path / "lone" / "lit_model_ether_finetuned.pth",
                           prompt_style={"prompt_style": "flan", "system_prompt": None})
    assert load_file(lone)["prompt_style"] == {"prompt_style": "flan", "system_prompt": None}
    assert sorted(p.name for p in lone.parent.iterdir()) == [lone.name]  # no hyperparameters.yaml beside it

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert resolve_prompt_style(base, lone).name == "flan"
        out, logs = quiet_merge(lone, checkpoint_dir=base)
    assert err.getvalue() == "" and not any("warning" in line for line in logs), (err.getvalue(), logs)
    assert yaml.safe_load((out / "prompt_style.yaml").read_text()) == {"prompt_style": "flan"}

    # a ChatML style with a system prompt comes back whole
    chatml = trained_adapter(base, config, tmp_path / "lone2" / "a.pth",
                             prompt_style={"prompt_style": "chatml", "system_prompt": "Be brief."})
    style = resolve_prompt_style(base, chatml)
    assert style.name == "chatml" and style.system_prompt == "Be brief."
    with pytest.raises(ValueError, match="prompt_style must be a mapping"):
        trained_adapter(base, config, tmp_path / "bad.pth", prompt_style={"style": "flan"})


def test_an_adapter_on_a_merged_checkpoint_is_prompted_as_its_own_run_trained(tmp_path):
    """Merge a fine-tune (its prompt_style.yaml says alpaca), train a new adapter on the merged model with chatml
    data: chat with that adapter, and its merge, use chatml; the checkpoint's file is for the model alone."""
    merged = make_base(tmp_path / "merged")
    (merged / "prompt_style.yaml").write_text(yaml.safe_dump({"prompt_style": "alpaca"}))
    adapter = make_run(tmp_path / "run", merged, AdapterConfig(method="ether", nb=4), prompt_style="chatml")
    assert resolve_prompt_style(merged, adapter).name == "chatml"
    assert resolve_prompt_style(merged).name == "alpaca"
    out, _ = quiet_merge(adapter)
    assert yaml.safe_load((out / "prompt_style.yaml").read_text()) == {"prompt_style": "chatml"}
    # a run that records nothing: the checkpoint's file, without a warning about the adapter
    (adapter.parent / "hyperparameters.yaml").unlink()
    (adapter.parent / "data" / "prepare_config.yaml").unlink()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert resolve_prompt_style(merged, adapter).name == "alpaca"
    assert err.getvalue() == ""


def test_the_base_model_defaults_to_the_one_the_run_recorded(base, tmp_path):
    """chat, eval and convert_peft_adapter.py export take --adapter_path alone, as merging does."""
    from lit_gpt.merge import checkpoint_dir_for

    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4))
    assert checkpoint_dir_for(None, adapter) == base
    assert checkpoint_dir_for(tmp_path / "other", adapter) == tmp_path / "other"
    with pytest.raises(ValueError, match=r"^--checkpoint_dir is required: pass a lit checkpoint directory"):
        checkpoint_dir_for(None, None)
    lone = trained_adapter(base, AdapterConfig(method="ether", nb=4), tmp_path / "lone" / "a.pth")
    with pytest.raises(ValueError, match=r"No --checkpoint_dir given and no base_checkpoint_dir recorded"):
        checkpoint_dir_for(None, lone)


def test_the_runs_hyperparameters_come_before_the_files_record(base, tmp_path):
    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4), prompt_style="flan")
    model = GPT.from_checkpoint(base)
    load_adapters(model, adapter)
    save_adapters(model, adapter, prompt_style={"prompt_style": "lima", "system_prompt": None})
    hp_path = adapter.parent / "hyperparameters.yaml"
    hp = yaml.safe_load(hp_path.read_text())
    hp["prompt_style"] = {"prompt_style": "dolly", "system_prompt": None}
    hp_path.write_text(yaml.safe_dump(hp))
    assert resolve_prompt_style(base, adapter).name == "dolly"
    del hp["prompt_style"]  # a run that did not record it: the file's record beats the data folder's
    hp_path.write_text(yaml.safe_dump(hp))
    assert resolve_prompt_style(base, adapter).name == "lima"


def test_an_old_adapter_file_alone_warns_once_naming_the_fallback(base, tmp_path, capsys):
    lone = trained_adapter(base, AdapterConfig(method="ether", nb=4), tmp_path / "lone" / "old.pth")
    assert "prompt_style" not in load_file(lone)  # written as before the key existed: it still loads
    assert read_finetuned(lone).kind == "adapter"

    assert resolve_prompt_style(base, lone).name == "alpaca"  # the tiny base has no chat template
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "prompting with the Alpaca format" in err[0], err
    assert "--prompt_style" in err[0]

    out, logs = quiet_merge(lone, checkpoint_dir=base)
    warnings = [line for line in logs if line.startswith("warning")]
    assert len(warnings) == 1 and "Alpaca" in warnings[0] and "prompt_style.yaml" in warnings[0], logs
    assert not (out / "prompt_style.yaml").exists()


@pytest.mark.slow
def test_chat_with_a_lone_adapter_file_prompts_in_its_style(base, tmp_path):
    from lit_gpt import Tokenizer
    from lit_gpt.data import prompt_style_from_name
    from lit_gpt.generate import generate

    lone = trained_adapter(base, AdapterConfig(method="etherplus", nb=4), tmp_path / "lone" / "a.pth",
                           prompt_style={"prompt_style": "flan", "system_prompt": None})
    r = subprocess.run([sys.executable, "chat/base.py", "--checkpoint_dir", str(base), "--adapter_path", str(lone),
                        "--temperature", "0", "--max_new_tokens", "8", "--precision", "32-true", "--device", "cpu"],
                       input="Add two and three.\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    model, tokenizer = load_finetuned(base, lone), Tokenizer(base)
    ids = tokenizer.encode(prompt_style_from_name("flan").apply("Add two and three."))
    new = generate(model, ids, 8, temperature=0, eos_id=tokenizer.stop_ids, include_prompt=False)
    assert r.stdout == tokenizer.decode(new) + "\n"


# ---------------------------------------------------------------------------------------------- 3. re-merging
def test_remerging_into_a_folder_leaves_no_stale_prompt_style(base, tmp_path):
    out = tmp_path / "merged"
    first = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4), prompt_style="flan")
    quiet_merge(first, out_dir=out)
    assert yaml.safe_load((out / "prompt_style.yaml").read_text()) == {"prompt_style": "flan"}
    (out / "chat_template.jinja").write_text("{{ messages }}")  # as if the first base had one

    lone = trained_adapter(base, AdapterConfig(method="ether", nb=4), tmp_path / "lone" / "old.pth")
    quiet_merge(lone, checkpoint_dir=base, out_dir=out)
    assert not (out / "prompt_style.yaml").exists()
    assert not (out / "chat_template.jinja").exists()
    assert yaml.safe_load((out / "merge_info.yaml").read_text())["source"] == str(lone.resolve())
    assert resolve_prompt_style(out).name == "alpaca"


# ---------------------------------------------------------------------------------------------- 4. --save_filepath
def test_unwritable_save_filepath_fails_before_tasks_and_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    harness = load_script("eval/lm_eval_harness.py")
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    # neither the checkpoint nor the task folder exists: the first check made must be --save_filepath's
    with pytest.raises(SystemExit) as e:
        run_cli(harness.main, args=["--checkpoint_dir", str(tmp_path / "missing"), "--eval_tasks", "quickstart",
                                    "--include_path", str(tmp_path / "no_tasks"),
                                    "--save_filepath", str(junk / "x.json")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == (f"error: --save_filepath {str(junk / 'x.json')!r} cannot be written because {str(junk)!r} is a "
                   "file, not a folder; pass a path inside a folder (missing folders are created).\n")
    with pytest.raises(ValueError, match=r"--save_filepath .* is a folder; give a file name such as"):
        harness.main(checkpoint_dir=tmp_path / "missing", eval_tasks="quickstart", save_filepath=tmp_path)
    # a folder still to be made, said by its trailing `/`, is one too (not a file named `folder`)
    with pytest.raises(SystemExit):
        run_cli(harness.main, args=["--checkpoint_dir", str(tmp_path / "missing"), "--eval_tasks", "quickstart",
                                    "--save_filepath", f"{tmp_path / 'new' / 'folder'}/"])
    assert capsys.readouterr().err == (f"error: --save_filepath {str(tmp_path / 'new' / 'folder')!r} is a folder; "
                                       "give a file name such as "
                                       f"{str(tmp_path / 'new' / 'folder' / 'results.json')!r}.\n")
    with pytest.raises(ValueError, match=r"--num_fewshot must be 0 or more, got -1\."):
        harness.main(checkpoint_dir=tmp_path / "missing", eval_tasks="quickstart", num_fewshot=-1)
    hint = harness.lm_eval_flag_hint(["--checkpoint_dir", "x", "--tasks", "arc_easy"])
    assert hint is not None and "--eval_tasks" in hint
    assert harness.lm_eval_flag_hint(["--eval_tasks", "arc_easy"]) is None


# ---------------------------------------------------------------------------------------------- 5. sampling flags
@pytest.mark.parametrize("script", ["chat/base.py", "scripts/generate.py"])
@pytest.mark.parametrize("flag,value,message", [
    ("--top_p", "0", "--top_p must be in (0, 1] (1 keeps every token), got 0.0; for greedy decoding (litgpt's "
                     "top_p=0) pass --temperature 0."),
    ("--top_k", "0", "--top_k must be a positive integer or None"),
    ("--temperature", "-1", "--temperature must be >= 0"),
])
def test_bad_sampling_flags_fail_at_startup(tmp_path, capsys, monkeypatch, script, flag, value, message):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    module = load_script(script)
    # the checkpoint does not exist: had the model been loaded first, that would be the error
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, args=["--checkpoint_dir", str(tmp_path / "missing"), flag, value])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- 6. --config <run>
@pytest.mark.parametrize("script,flags,fix", [
    ("chat/base.py", ["--checkpoint_dir", "x"], "chat with the run's adapter unmerged, --checkpoint_dir"),
    ("eval/lm_eval_harness.py", ["--checkpoint_dir", "x"], "evaluate its adapter unmerged, --checkpoint_dir"),
    ("scripts/merge_ether.py", [], "pass the run's adapter file instead, --ether_path"),
    ("scripts/merge_lora.py", [], "pass the run's adapter file instead, --lora_path"),
    ("scripts/generate.py", ["--checkpoint_dir", "x"], "generate with the run's adapter unmerged, --checkpoint_dir"),
])
def test_a_runs_hyperparameters_as_config_is_refused_in_one_sentence(base, tmp_path, capsys, monkeypatch, script,
                                                                      flags, fix):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4))
    hparams = adapter.parent / "hyperparameters.yaml"
    module = load_script(script)
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, args=[*flags, "--config", str(hparams)], run_config_fix=module.RUN_CONFIG_FIX)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {str(hparams)!r} is a training run's hyperparameters.yaml, which only "
                          f"finetune/ether.py takes (to repeat or vary the run): {fix}"), err
    assert repr(str(adapter)) in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_scripts_pass_their_fix_to_run_cli(base, tmp_path):
    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="lora", r=2))
    hparams = adapter.parent / "hyperparameters.yaml"
    for script, fix in (("scripts/merge_lora.py", "--lora_path"), ("eval/lm_eval_harness.py", "--adapter_path")):
        r = subprocess.run([sys.executable, script, "--config", str(hparams)], capture_output=True, text=True,
                           cwd=REPO, timeout=300)
        assert r.returncode == 2 and "finetune/lora.py takes" in r.stderr and fix in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "eval/lm_eval_harness.py", "--checkpoint_dir", "x", "--tasks", "piqa"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --tasks is lm-eval's own flag"), r.stderr
    assert "--eval_tasks" in r.stderr


# ---------------------------------------------------------------------------------------------- 7. smaller issues
def test_missing_checkpoint_dir_and_run_folder_errors_name_the_right_thing(base, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIT_GPT_DEBUG", raising=False)
    chat = load_script("chat/base.py")
    with pytest.raises(SystemExit):
        run_cli(chat.main, args=["--checkpoint_dir", str(tmp_path / "missing"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint_dir {str(tmp_path / 'missing')!r} does not exist: download and convert "
                          "a model into it with `python scripts/download.py --repo_id ORG/NAME --checkpoint_dir ")
    assert len(err.splitlines()) == 1

    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="ether", nb=4))
    generate_script = load_script("scripts/generate.py")
    with pytest.raises(ValueError) as e:
        generate_script.main(checkpoint_dir=adapter.parent, device="cpu")
    message = str(e.value)
    assert message == (f"{str(adapter.parent)!r} is a fine-tuning run, not a model: pass --adapter_path {adapter} (its "
                       f"base model comes from the run), or merge it first with `python scripts/merge_ether.py "
                       f"--adapter_path {adapter}` and pass its output, {str(adapter.parent / 'merged')!r}, as "
                       "--checkpoint_dir.")


def test_generate_with_an_unmerged_adapter_answers_as_its_merged_checkpoint(base, tmp_path, capsys):
    """generate.py was the one inference script without --adapter_path: the run had to be merged first. The base
    model and the prompt format come from the run, as in chat."""
    from lit_gpt.merge import merge_checkpoint

    adapter = make_run(tmp_path / "run", base, AdapterConfig(method="etherplus", nb=4, targets=["query", "mlp"]),
                       prompt_style="flan")
    merged = merge_checkpoint(adapter, precision="32-true", log=lambda s: None)
    generate_script = load_script("scripts/generate.py")
    greedy = dict(prompt="Add two and three.", temperature=0.0, max_new_tokens=8, device="cpu")
    answers = []
    for flags in (dict(adapter_path=adapter), dict(checkpoint_dir=merged)):
        generate_script.main(**flags, **greedy)
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_plot_logs_writes_the_format_of_the_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    from test_plot_logs import fake_run, load_script as load_plot_logs

    plot_logs = load_plot_logs()
    run = fake_run(tmp_path, "a", "ether", [3.0, 2.5, 2.0])
    svg = plot_logs.plot_runs([run], tmp_path / "loss.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    assert plot_logs.plot_runs([run], tmp_path / "loss.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match=r"--out .* is a folder; give a file name such as .*loss\.png"):
        plot_logs.plot_runs([run], tmp_path)
    with pytest.raises(ValueError, match=r"--out .*: matplotlib cannot write \.xyz files; use a name ending in"):
        plot_logs.plot_runs([run], tmp_path / "loss.xyz")
    assert not list(tmp_path.glob(".*.tmp"))
