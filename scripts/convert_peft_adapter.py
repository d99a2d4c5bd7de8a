"""Move adapters between lit_gpt and Hugging Face PEFT (`PeftModel.save_pretrained` folders), both ways.

LoRA is PEFT's LoRA (both ways), OFT is PEFT's OFT (both ways), ETHER is PEFT's HRA (export; an import takes back
only HRA in ETHER's block form, as an export writes it). ETHER+ (etherplus, etherplusHH) has no PEFT form: merge it.

    python scripts/convert_peft_adapter.py export --adapter_path out/run/lit_model_lora_finetuned.pth \\
        --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --output_dir out/peft_adapter
    python scripts/convert_peft_adapter.py import --peft_dir path/to/peft_adapter \\
        --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --adapter_path out/imported/adapter.safetensors

An export's adapter_config.json names the base model (--base_model_name_or_path; default the Hub id the checkpoint
was converted from, else the folder the final message says to write the base's transformers export to), so that
AutoPeftModelForCausalLM.from_pretrained loads it. chat/base.py, scripts/generate.py, eval/lm_eval_harness.py and
the merge scripts also take a PEFT folder itself as --adapter_path (with --checkpoint_dir), importing it in memory
each time; `import` writes that conversion once, as a lit adapter file.

`python scripts/convert_peft_adapter.py export --help` (or `import --help`) lists each command's flags.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.adapters import read_adapter_config  # noqa: E402
from lit_gpt.adapters.peft_format import (  # noqa: E402
    PEFT_CONFIG_FILENAME,
    base_export_dir,
    export_peft_adapter,
    import_peft_adapter,
)
from lit_gpt.cli import USAGE_ERROR_CODE, run_cli, silence_stdout  # noqa: E402
from lit_gpt.convert_hf import ConversionError  # noqa: E402
from lit_gpt.data.prompts import PromptStyleName  # noqa: E402
from lit_gpt.merge import checkpoint_dir_for  # noqa: E402
from lit_gpt.utils import read_json_object  # noqa: E402


def export_adapter(adapter_path: Path, output_dir: Path, checkpoint_dir: Optional[Path] = None,
                   base_model_name_or_path: Optional[str] = None) -> Path:
    """Write a lit LoRA, OFT or ETHER adapter file as a PEFT LoRA, OFT or HRA adapter folder.

    The folder holds adapter_config.json and adapter_model.safetensors, and the prompt format the run trained with
    (prompt_style.yaml: PEFT ignores it, an import reads it back). adapter_config.json names the base model that
    `AutoPeftModelForCausalLM.from_pretrained(output_dir)` loads the adapter onto (base_model_name_or_path): the
    Hub id of the model the checkpoint was converted from where its config names one, else (GGUF imports, local
    models) the folder <output_dir>-base-hf, as an absolute path, to which the final message says to write the
    base's transformers export with scripts/convert_lit_checkpoint.py. On that export the adapter computes the
    same logits as the lit model with the adapter.

    LoRA: query/key/value LoRAs go to transformers' q_proj, k_proj, v_proj; on GPT-2's c_attn and GPT-NeoX's
    query_key_value, which are one layer there, slices with their own A are written exactly as one LoRA of rank
    k*r (rank_pattern). DoRA (--lora_dora) is written with use_dora and its magnitudes.

    OFT (finetune/ether.py --Htype oft) becomes PEFT's OFT: oft_block_size (or r where the block sizes differ and
    the block counts do not), exact Cayley or use_cayley_neumann with num_cayley_neumann_terms = K + 2 for
    --oft_neumann_terms K >= 2, coft with eps = our eps * sqrt(nb) (PEFT bounds each block by eps / sqrt(r)),
    block_share, and --block_dropout as module_dropout (training only: PEFT 0.21 does not apply it).
    --ether_dropout (dropout on the layer input, training only) has no OFT or HRA field and is left out.

    ETHER (--Htype ether) becomes PEFT's HRA with r = nb: ETHER's block reflection is the product of nb full-width
    reflections whose vectors are the blocks' vectors, zero outside their block.

    Modules trained in full beside the adapter (--lora_train_modules, --ether_train_modules: head, embeddings,
    norms, module names) become modules_to_save, named as transformers names them (lm_head, embed_tokens,
    input_layernorm, or a longer name such as layers.0.input_layernorm where the short one would select more), with
    their trained tensors. A head tied to the embeddings (one tensor here) is saved as both lm_head and the
    embeddings, with the same values (ensure_weight_tying for LoRA, so PEFT keeps training them as one).

    Refused, with the reason: ETHER+ (etherplus, etherplusHH: not products of reflections) and --flip_side
    (PEFT's OFT and HRA transform only a layer's input): merge those with scripts/merge_ether.py and export the
    merged checkpoint; OFT or ETHER on GPT-2's Conv1D layers (PEFT's OFT and HRA wrap torch.nn.Linear
    only, and GPT-2's one Linear, the head, is tied to the embeddings);
    on GPT-NeoX's fused query_key_value, query/key/value with different transforms; --oft_neumann_terms 1; one
    HRA r (or COFT radius) where the layers have different block counts.

    Args:
        adapter_path: The adapter file finetune/lora.py or finetune/ether.py wrote (lit_model_*_finetuned.pth, or a
            .safetensors file written by save_adapters).
        output_dir: Folder to write adapter_config.json and adapter_model.safetensors into (created if new).
        checkpoint_dir: The lit base checkpoint the adapter was trained on (default: the one its run recorded).
        base_model_name_or_path: The base model adapter_config.json names, as AutoPeftModelForCausalLM loads it: a
            Hub id (org/name) or a folder holding the base's transformers export (default: the Hub id the
            checkpoint was converted from, else the absolute path of <output_dir>-base-hf).
    """
    checkpoint_dir = checkpoint_dir_for(checkpoint_dir, adapter_path)
    out = export_peft_adapter(adapter_path, checkpoint_dir, output_dir,
                              base_model_name_or_path=base_model_name_or_path)
    base = read_json_object(out / PEFT_CONFIG_FILENAME, "export the adapter again")["base_model_name_or_path"]
    hf = str(base_export_dir(out))
    convert = (f"`python scripts/convert_lit_checkpoint.py --checkpoint_dir {str(checkpoint_dir)!r} "
               f"--output_dir {hf!r}`")
    if base == hf:
        print(f"Wrote the PEFT adapter {str(out)!r}, whose adapter_config.json names the base model {hf!r}: write "
              f"it there with {convert}, then AutoPeftModelForCausalLM.from_pretrained({str(out)!r}) loads the "
              "adapted model.", file=sys.stderr)
    else:
        print(f"Wrote the PEFT adapter {str(out)!r}, whose adapter_config.json names the base model {base!r}, onto "
              f"which AutoPeftModelForCausalLM.from_pretrained({str(out)!r}) loads it; to load it onto this "
              f"checkpoint's own weights instead, write them with {convert} and call "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({hf!r}), {str(out)!r}).",
              file=sys.stderr)
    return out


def import_adapter(peft_dir: Path, checkpoint_dir: Path, adapter_path: Path,
                   prompt_style: Optional[PromptStyleName] = None, system_prompt: Optional[str] = None) -> Path:
    """Write a PEFT LoRA, OFT or HRA folder (from `PeftModel.save_pretrained`) as a lit adapter file.

    The file works wherever a file from finetune/lora.py or finetune/ether.py does: scripts/merge_lora.py
    --lora_path or scripts/merge_ether.py, chat/base.py, scripts/generate.py and eval/lm_eval_harness.py with their
    --adapter_path. Those also take the PEFT folder itself (with --checkpoint_dir), converting it in memory, with
    the same result, each time they run.
    target_modules (a list or a regex), layers_to_transform and exclude_modules are read as PEFT reads them; the
    same layers in some blocks only become the adapter's layers (finetune/*.py's --lora_layers, --ether_layers).

    LoRA: r and alpha are set so the update's scale equals PEFT's (use_rslora's lora_alpha/sqrt(r) included);
    ranks or scales that differ between layers (rank_pattern, alpha_pattern) become the largest rank, the lower
    ranks padded with zeros (which stay zero in training), and the most common scale, the others folded into B.
    DoRA (use_dora) becomes finetune/lora.py's --lora_dora, its magnitudes as they are.
    OFT: an OFT adapter storing each block's strict upper triangle (upper_triangle), with PEFT's exact Cayley or
    its Cayley-Neumann series, coft (our eps is PEFT's eps / sqrt(r)), block_share and module_dropout.
    HRA: only in ETHER's block form, as an ETHER export writes it (r vectors in r disjoint equal blocks of the
    input), which becomes ETHER with nb = r; an HRA PEFT trained (full-width vectors) is refused: merge it with
    PEFT (merge_and_unload) and convert the merged model with scripts/convert_hf_checkpoint.py.
    modules_to_save (LoRA, OFT, HRA) becomes the adapter's train_modules (modules trained in full), their trained
    tensors under the lit names; a head tied to the embeddings must be saved equal to them (ensure_weight_tying),
    and lit_gpt's fused q/k/v must be saved whole.

    Refused, with the reason: bias other than "none", other q/k/v projections adapted in different blocks
    (lit_gpt's q/k/v are one layer),
    OFT with num_cayley_neumann_terms <= 2 or a Cayley-Neumann adapter saved before PEFT 0.18, tensors whose
    shapes do not fit the checkpoint, and adapter_model.bin (a pickle: re-save with safe_serialization=True).

    Args:
        peft_dir: The folder PEFT's save_pretrained wrote (adapter_config.json + adapter_model.safetensors).
        checkpoint_dir: The lit checkpoint converted (scripts/convert_hf_checkpoint.py) from the transformers
            model the adapter was trained on.
        adapter_path: The adapter file to write: .pth (torch) or .safetensors.
        prompt_style: The prompt format the adapter was trained with, stored in the file for chat and merge
            (default: the prompt_style.yaml an export wrote into --peft_dir, else none is stored and they use the
            base checkpoint's).
        system_prompt: The system prompt it was trained with (with --prompt_style), stored likewise.
    """
    out = import_peft_adapter(peft_dir, checkpoint_dir, adapter_path, prompt_style=prompt_style,
                              system_prompt=system_prompt)
    if read_adapter_config(out).method == "lora":
        merge = f"python scripts/merge_lora.py --lora_path {out}"
    else:
        merge = f"python scripts/merge_ether.py --ether_path {out}"
    print(f"Wrote the lit adapter {str(out)!r}; merge it with `{merge} --checkpoint_dir {checkpoint_dir}`.",
          file=sys.stderr)
    return out


COMMANDS = {"export": export_adapter, "import": import_adapter}


def usage() -> str:
    lines = [(__doc__ or "").strip(), "", "commands:"]
    for name, fn in COMMANDS.items():
        lines.append(f"  {name:<8}{(fn.__doc__ or '').strip().splitlines()[0]}")
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> Path:
    """Run the command named by the first argument (`export` or `import`) with the flags after it."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in ("-h", "--help"):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `--help | head -1`: exits 0, as argparse's --help does
            silence_stdout()
        raise SystemExit(0)
    if not args or args[0] not in COMMANDS:
        given = f"got {args[0]!r}" if args else "got nothing"
        print(f"error: the first argument must be the command, export or import ({given}); see --help.",
              file=sys.stderr)
        raise SystemExit(USAGE_ERROR_CODE)
    command = args[0]
    prog = sys.argv[0]
    sys.argv[0] = f"{prog} {command}"  # the usage line of `export --help` names the command
    try:
        return run_cli(COMMANDS[command], errors=(ConversionError,), args=args[1:])
    finally:
        sys.argv[0] = prog


if __name__ == "__main__":
    main()
