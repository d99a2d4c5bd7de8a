"""lm-evaluation-harness (≥ 0.4) model backend for lit checkpoints, registered as ``"lit_gpt"``.

    import lm_eval, lit_gpt.lm_eval
    lm_eval.simple_evaluate(model="lit_gpt", model_args="checkpoint_dir=checkpoints/SmolLM2", tasks=["arc_easy"])

Requests are tokenised exactly the way lm-eval's own Hugging Face backend (`HFLM`) tokenises them — the same
context/continuation split (trailing context spaces move to the continuation, the pair is encoded whole and split at
the context's length), BOS when the tokenizer adds one by default, the same prefix token for empty contexts and rolling
windows — so scores are comparable with published `hf` numbers. Log-likelihood requests run in length-sorted,
right-padded batches; only the continuation positions go through the output projection, which is where a
multiple-choice evaluation with a large vocabulary spends its time otherwise.

The task-name helpers at the bottom (`resolve_tasks`, `build_task_manager`) serve `eval/lm_eval_harness.py`.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from lit_gpt.generate import generate_batch
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import progress_bars_off, read_merge_info, resolve_device

PRECISIONS = ("32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed", "64-true")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def precision_to_dtypes(precision: str) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """(weight dtype, autocast dtype or None) for a Lightning precision string such as ``bf16-true``."""
    table = {
        "32-true": (torch.float32, None),
        "64-true": (torch.float64, None),
        "bf16-true": (torch.bfloat16, None),
        "16-true": (torch.float16, None),
        "bf16-mixed": (torch.float32, torch.bfloat16),
        "16-mixed": (torch.float32, torch.float16),
    }
    if precision not in table:
        raise ValueError(f"Unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    return table[precision]


def default_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def load_eval_model(
    checkpoint_dir: Union[Path, str],
    adapter_path: Optional[Union[Path, str]] = None,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
) -> GPT:
    """The base model of `checkpoint_dir`, with the unmerged adapter of `adapter_path` on top when given (its linear
    weights kept in `quantize`'s format, if given: `lit_gpt.quantize`)."""
    from lit_gpt.merge import load_finetuned

    return load_finetuned(checkpoint_dir, adapter_path=adapter_path, device=device, dtype=dtype, quantize=quantize)


@register_model("lit_gpt")
class LitGPTLM(TemplateLM):
    """A lit checkpoint (optionally plus an unmerged adapter file) as an lm-eval language model.

    Args:
        checkpoint_dir: A lit checkpoint directory (lit_model.pth, model_config.yaml, tokenizer files); a merged
            fine-tuned model, or the base model of `adapter_path`.
        adapter_path: An adapter file written by fine-tuning (lit_model_ether_finetuned.pth, ..., or a .safetensors
            one `save_adapters` wrote), evaluated unmerged on top of `checkpoint_dir`.
        model: An already built `GPT` to evaluate instead of loading one (needs `tokenizer` or `checkpoint_dir`
            for the tokenizer).
        tokenizer: An already built `Tokenizer`.
        batch_size: Sequences per forward pass for log-likelihood requests.
        device: "cpu", "cuda", "cuda:1"...; default the first GPU if there is one.
        precision: "32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"; default bf16-true on a GPU that
            supports it, else 32-true. Log-probabilities are always computed in float32.
        dtype: A weight dtype name ("float32", "bfloat16", ...) instead of `precision`.
        max_length: Context length in tokens (default: the model's block_size); longer inputs are cut from the left
            and perplexity documents are scored in rolling windows of this length.
        max_gen_toks: Tokens to generate when a task does not say.
        add_bos_token: Force BOS on (True) or off (False); default the tokenizer's own setting, as `HFLM` does.
        max_batch_size: Accepted for lm-eval's API; the batch size is fixed.
        quantize: `nf4`, `nf4-dq` or `int8`: keep the blocks' linear weights in that format (`lit_gpt.quantize`),
            for a model that would not fit otherwise; each is decoded at every forward pass.
    """

    _DEFAULT_MAX_GEN_TOKS = 256

    def __init__(
        self,
        checkpoint_dir: Optional[Union[Path, str]] = None,
        adapter_path: Optional[Union[Path, str]] = None,
        model: Optional[GPT] = None,
        tokenizer: Optional[Tokenizer] = None,
        batch_size: Union[int, str] = 16,
        device: Optional[Union[str, torch.device]] = None,
        precision: Optional[str] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        max_length: Optional[int] = None,
        max_gen_toks: int = _DEFAULT_MAX_GEN_TOKS,
        add_bos_token: Optional[bool] = None,
        max_batch_size: Optional[int] = None,
        quantize: Optional[str] = None,
    ) -> None:
        super().__init__()
        if model is None and checkpoint_dir is None:
            raise ValueError("LitGPTLM needs checkpoint_dir=<a lit checkpoint directory> (or a built `model`).")
        self.batch_size_per_gpu = self._parse_batch_size(batch_size)
        self._device = resolve_device(device) if device else (
            model.lm_head.weight.device if model is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        if dtype is not None and precision is not None:
            raise ValueError("Pass either precision or dtype to LitGPTLM, not both.")
        if dtype is not None:
            if isinstance(dtype, str):
                if dtype not in DTYPES:
                    raise ValueError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
                dtype = DTYPES[dtype]
            weight_dtype, self._autocast_dtype = dtype, None
        elif model is not None and precision is None:
            weight_dtype, self._autocast_dtype = None, None
        else:
            precision = precision or default_precision(self._device)
            weight_dtype, self._autocast_dtype = precision_to_dtypes(precision)
        self.precision = precision  # (None: given as a dtype, or a built model's own)

        # a merged checkpoint's merge_info.yaml (its source file and that file's hash), read with the weights: the
        # results then say which merge they are of (a re-merge of a resumed run keeps the folder's name)
        self.merge_info = read_merge_info(checkpoint_dir) if model is None else None
        if model is None:
            model = load_eval_model(checkpoint_dir, adapter_path, device=self._device, dtype=weight_dtype,
                                    quantize=quantize)
        elif adapter_path is not None:
            raise ValueError("Pass adapter_path with checkpoint_dir, not with an already built model.")
        else:
            model = model.to(device=self._device, dtype=weight_dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(checkpoint_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.adapter_path = Path(adapter_path) if adapter_path is not None else None

        block_size = self.model.config.block_size
        if max_length is not None and not 1 < int(max_length) <= block_size:
            raise ValueError(f"max_length must be between 2 and the model's block_size {block_size}, got {max_length}.")
        self._max_length = int(max_length) if max_length is not None else block_size
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        if self.tokenizer.eos_id is None and self.tokenizer.bos_id is None:
            raise ValueError(
                f"The tokenizer in {str(self.tokenizer.checkpoint_dir)!r} has neither a BOS nor an EOS token; lm-eval "
                "needs one of them to score documents from their first token (set bos_token or eos_token in "
                "tokenizer_config.json)."
            )

    @staticmethod
    def _parse_batch_size(batch_size: Union[int, str]) -> int:
        try:
            value = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"batch_size must be a positive integer, got {batch_size!r} (automatic batch sizes are not supported)."
            ) from None
        if value < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        return value

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # what conditions the first token of a document: BOS, else EOS (as HFLM)
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.checkpoint_dir).replace("/", "__")

    def get_model_info(self) -> dict:
        """What lm-eval records in the results' `config`: with what the numbers depend on (context length,
        precision, BOS), so two evaluations of one checkpoint can be told apart."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.lm_head.weight.dtype),
            "autocast_dtype": str(self._autocast_dtype) if self._autocast_dtype is not None else None,
            "precision": self.precision,
            "max_length": self.max_length,
            "max_gen_toks": self.max_gen_toks,
            "add_bos_token": self._uses_bos(),
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "adapter_path": str(self.adapter_path) if self.adapter_path else None,
            "merge_info": self.merge_info,  # (None for a checkpoint that is not a merge)
        }

    # ------------------------------------------------------------------ tokenisation
    def _uses_bos(self) -> bool:
        return self.tokenizer.use_bos if self.add_bos_token is None else bool(self.add_bos_token)

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None, **kwargs
    ) -> list[int]:
        # HFLM: special tokens follow the tokenizer's default unless told otherwise, and are skipped when the text
        # already starts with the prefix token's text
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token if self.add_bos_token is not None else True
            prefix_text = self.tokenizer.decode([self.prefix_token_id])
            if prefix_text and string.startswith(prefix_text):
                add_special_tokens = False
        bos = bool(add_special_tokens) and self._uses_bos()
        tokens = self.tokenizer.encode(string, bos=bos).tolist()
        if left_truncate_len:
            tokens = tokens[-left_truncate_len:]
        return tokens

    def _encode_generation_context(self, context: str) -> list[int]:
        # HFLM encodes generation prompts as a batch and checks the BOS *token text* (not the prefix token) there
        bos_text = self.tokenizer.special_tokens.get("bos_token")
        if bos_text and context.startswith(bos_text):
            return self.tok_encode(context, add_special_tokens=False)
        add_bos = self.add_bos_token if self.add_bos_token is not None else True
        return self.tok_encode(context, add_special_tokens=add_bos)

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ forward
    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype)

    @torch.inference_mode()
    def _continuation_logprobs(self, inputs: list[list[int]], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Float32 log-softmax rows for `inputs[i]` at positions `spans[i] = (start, end)`, one right-padded forward.

        Right padding cannot change earlier positions of a causal model, and only the scored positions are projected
        onto the vocabulary.
        """
        longest = max(len(x) for x in inputs)
        batch = torch.zeros(len(inputs), longest, dtype=torch.long)
        for row, x in enumerate(inputs):
            batch[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        with self._autocast():
            hidden = self.model(batch.to(self._device), lm_head=False)
            picked = torch.cat([hidden[row, start:end] for row, (start, end) in enumerate(spans)])
            # over the padded vocabulary, as the exported transformers model (and so HFLM) normalises
            logits = self.model.logits(picked)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return list(logprobs.split([end - start for start, end in spans]))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: Optional[int] = None,
    ) -> list[tuple[float, bool]]:
        def sort_key(req):
            # longest first, so a batch's first request fixes its padded length and memory peaks up front
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        def same_input(req):
            # requests that differ only in their last continuation token share one forward
            return req[1] + req[2][:-1]

        # every request, not only the ones batching keeps: a continuation that encodes to nothing shares its group
        # with its sibling choices and would be scored as certain (log p = 0) without a word
        for request_str, context_enc, continuation_enc in requests:
            self._check_request(request_str, context_enc, continuation_enc)
        reorder = Collator(requests, sort_fn=sort_key, group_by="contexts", group_fn=same_input)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0 or progress_bars_off(),
                    desc="lit_gpt loglikelihood")
        results: list[tuple[float, bool]] = []
        for chunk in reorder.get_batched(n=override_bs or self.batch_size):
            inputs, spans = [], []
            for _, context_enc, continuation_enc in chunk:
                # the last token is only ever a target; cut from the left what does not fit
                inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                inputs.append(inp)
                spans.append((len(inp) - len(continuation_enc), len(inp)))
            for (request_str, context_enc, continuation_enc), logprobs in zip(
                chunk, self._continuation_logprobs(inputs, spans)
            ):
                logprobs = logprobs.unsqueeze(0)
                greedy = logprobs.argmax(dim=-1)
                for request_str, cont_toks, logprobs in reorder.get_cache(
                    req_str=request_str, cxt_toks=context_enc, cont_toks=continuation_enc, logits=logprobs
                ):
                    target = torch.tensor(cont_toks, dtype=torch.long, device=logprobs.device).unsqueeze(0)
                    n = target.size(1)
                    is_greedy = bool((greedy[:, -n:] == target).all())
                    logprob = float(torch.gather(logprobs[:, -n:], 2, target.unsqueeze(-1)).sum())
                    answer = (logprob, is_greedy)
                    results.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    def _check_request(self, request_str: Any, context_enc: list[int], continuation_enc: list[int]) -> None:
        """One sentence, naming the request, for a log-likelihood request that cannot be scored."""
        shown = ""
        if isinstance(request_str, tuple) and len(request_str) == 2:
            context, continuation = request_str
            shown = f" (context ending {context[-40:]!r}, continuation {continuation!r})"
        if not continuation_enc:
            raise ValueError(
                f"A log-likelihood request{shown} has a continuation that encodes to no tokens of its own: it merges "
                "into the context's last token, so it cannot be scored; give the task a target_delimiter such as "
                "' ' or change its choices."
            )
        if not context_enc:
            raise ValueError(
                f"A log-likelihood request{shown} has a context that encodes to no tokens and the tokenizer adds no "
                "BOS to condition on; give the task a non-empty context."
            )
        if len(continuation_enc) > self.max_length:  # (lm-eval's hf backend fails on it too, with an assert)
            raise ValueError(
                f"A log-likelihood request's continuation{shown} has {len(continuation_enc)} tokens, more than the "
                f"context of {self.max_length} tokens the model is evaluated with, so it cannot be scored: "
                "raise --max_length (up to the model's block_size), or use a task with shorter answers."
            )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document, scored in disjoint windows of `max_length` tokens (as HFLM)."""
        windows: list[tuple[Any, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(index)
        # all windows of all documents in one sorted pass: better batches than document by document
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless a task asks to sample) continuations, cut at the task's `until` strings or EOS."""
        def sort_key(req):
            return -len(self.tok_encode(req[0])), req[0]

        reorder = Collator([req.args for req in requests], sort_fn=sort_key, group_by="gen_kwargs",
                           group_fn=lambda req: req[1])
        eos_text = (self.tok_decode([self.eot_token_id], skip_special_tokens=False)
                    if self.eot_token_id is not None else None)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0 or progress_bars_off(),
                    desc="lit_gpt generate_until")
        results: list[str] = []
        # requests are grouped by generation kwargs and sorted longest first, so each batch shares its settings and
        # pads little
        for chunk in reorder.get_batched(n=self.batch_size):
            texts = self._generate_batch([context for context, _ in chunk], chunk[0][1], eos_text)
            for (context, gen_kwargs), text in zip(chunk, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict, eos_text: Optional[str]) -> list[str]:
        """The continuations of `contexts`, which share `gen_kwargs`, generated as one left-padded batch."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if max_gen_toks >= self.max_length:
            raise ValueError(
                f"A task asks for {max_gen_toks} new tokens, which leaves no room for the prompt in max_length "
                f"{self.max_length}."
            )
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = kwargs.pop("top_k", None)
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        if not do_sample:
            temperature, top_k, top_p = 0.0, None, 1.0
        check_gen_kwargs(kwargs)
        prompts = [
            torch.tensor(self._encode_generation_context(c)[-(self.max_length - max_gen_toks):], dtype=torch.long,
                         device=self._device)
            for c in contexts
        ]
        stops = [s for s in until if s]

        def reached_stop_string(_: int, tokens: list[int]) -> bool:
            # the stop strings are text: a stop may be part of a token or span several, so the decoded text is checked
            text = self.tokenizer.decode(tokens)
            return any(stop in text for stop in stops)

        with self._autocast():
            generated = generate_batch(
                self.model, prompts, max_gen_toks, temperature=temperature, top_k=int(top_k) if top_k else None,
                top_p=top_p, eos_id=self.tokenizer.stop_ids or None, include_prompt=False,
                stop_check=reached_stop_string if stops else None,
                pad_id=self.prefix_token_id,
            )
        return [
            postprocess_generated_text(self.tok_decode(tokens.tolist()), stop=until, think_end_token=None)
            for tokens in generated
        ]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the checkpoint's template writes it. lm-eval asks for no generation prompt when the
        last message is an answer prefix (a task's `gen_prefix`) to continue: its turn is left open, as lm-eval's
        `hf` backend leaves it. A template that refuses a system message gets the conversation without it, as there."""
        from lit_gpt.tokenizer import ChatTemplateError

        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except ChatTemplateError:
            without_system = [m for m in chat_history if m.get("role") != "system"]
            if len(without_system) == len(chat_history):
                raise
            return render(without_system)

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        if chat_template is False or chat_template is None:
            return None
        if self.tokenizer.chat_template is None:
            raise ValueError(
                f"--apply_chat_template was asked for, but the tokenizer in {str(self.tokenizer.checkpoint_dir)!r} has "
                "no chat template."
            )
        return self.tokenizer.chat_template


# ---------------------------------------------------------------------------------------------- generation settings
# what `generate_until` applies (and the names lm-eval's `normalize_gen_kwargs` reads as max_gen_toks); anything
# else a task (or --gen_kwargs) asks for would be silently ignored
APPLIED_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
SUPPORTED_GEN_KWARGS = APPLIED_GEN_KWARGS + ("max_new_tokens", "max_tokens", "max_completion_tokens")
# settings whose value here asks for what generation does anyway
NO_OP_GEN_KWARGS = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "min_new_tokens": 0}


def check_gen_kwargs(gen_kwargs: dict, where: str = "A task's generation_kwargs") -> None:
    """Refuse, in one sentence, generation settings this backend does not apply (lm-eval's `hf` backend passes
    them to transformers' `generate`: their text would differ from ours)."""
    unsupported = sorted(k for k, v in gen_kwargs.items()
                         if k not in SUPPORTED_GEN_KWARGS and not (k in NO_OP_GEN_KWARGS and v == NO_OP_GEN_KWARGS[k]))
    if unsupported:
        raise ValueError(
            f"{where} set {', '.join(f'{k}={gen_kwargs[k]!r}' for k in unsupported)}, which the lit_gpt backend "
            f"does not apply (it applies {', '.join(APPLIED_GEN_KWARGS)}); remove "
            "them from the task, or evaluate with lm-eval's hf backend on the transformers export "
            "(scripts/convert_lit_checkpoint.py)."
        )


# ---------------------------------------------------------------------------------------------- task names
# The reference code used lm-eval 0.3 task names; lm-eval 0.4 renamed them.
LEGACY_TASKS = {"truthfulqa_mc": ["truthfulqa_mc1", "truthfulqa_mc2"]}
LEGACY_MMLU_PREFIX = "hendrycksTest-"


def build_task_manager(include_path: Optional[Union[Path, str, Sequence[Union[Path, str]]]] = None,
                       names: Optional[Sequence[str]] = None, metadata: Optional[dict[str, Any]] = None):
    """A `TaskManager` that knows the local tasks in `include_path` and, when needed, lm-eval's built-in tasks.

    Indexing lm-eval's ~15,000 built-in task files takes tens of seconds, so when every name in `names` is found in
    `include_path` alone, only that folder is indexed. `metadata` is merged into every loaded task's metadata (what
    lm-eval's own `--metadata` does), which a task's `custom_dataset` function receives as keyword arguments.
    """
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path is not None:
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(
                    f"--include_path {str(p)!r} does not exist; point it at a folder of task YAMLs."
                )
        if names is not None:
            local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False, metadata=metadata)
            if all(_matches(name, local.all_tasks) for name in names):
                return local
    return TaskManager(include_path=[str(p) for p in paths] if paths else None, metadata=metadata)


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _matches(name: str, known: Sequence[str]) -> list[str]:
    if _is_pattern(name):
        return fnmatch.filter(known, name)
    return [name] if name in known else []


def _mmlu_subjects(task_manager, pattern: str) -> list[str]:
    # lm-eval 0.3's `hendrycksTest-<subject>` are the 57 zero/few-shot subject tasks of lm-eval 0.4's default MMLU
    # (not its continuation/generative/translated variants, which also start with `mmlu_`)
    found = []
    for name in fnmatch.filter(task_manager.all_subtasks, "mmlu_" + pattern):
        entry = task_manager.task_index.get(name)
        path = getattr(entry, "yaml_path", None)
        if path is not None and Path(path).parent.name == "default" and Path(path).parent.parent.name == "mmlu":
            found.append(name)
    return sorted(found)


def resolve_tasks(names: Sequence[str], task_manager, notes: Optional[list[str]] = None) -> list[str]:
    """lm-eval task/group names for `names`: glob patterns expanded, lm-eval 0.3 names mapped to their 0.4 names.

    A mapped name appends a note to `notes`. An unknown name raises a `ValueError` listing close matches.
    """
    notes = notes if notes is not None else []
    known = task_manager.all_tasks
    resolved: list[str] = []
    for name in names:
        name = name.strip()
        if name in LEGACY_TASKS and name not in known:
            new = LEGACY_TASKS[name]
            notes.append(f"note: task {name!r} is called {', '.join(map(repr, new))} in lm-eval 0.4; evaluating those.")
            found = [n for n in new if n in known]
        elif name.startswith(LEGACY_MMLU_PREFIX) and name not in known:
            subject = name[len(LEGACY_MMLU_PREFIX):]
            found = _mmlu_subjects(task_manager, subject)
            notes.append(
                f"note: lm-eval 0.4 calls {name!r} {'mmlu_' + subject!r}"
                + (f" ({len(found)} subject tasks)" if _is_pattern(subject) else "") + "; evaluating those."
            )
        else:
            found = _matches(name, known)
        if not found:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ValueError(
                f"Unknown lm-eval task {name!r}.{hint} Local task YAMLs need --include_path; `lm-eval ls tasks` lists "
                "the built-in ones."
            )
        resolved.extend(n for n in found if n not in resolved)
    return resolved


def top_level_items(loaded: dict) -> list:
    """The tasks and groups of `TaskManager.load(...)`'s flat result that are not inside another group."""
    groups = loaded.get("groups", {})
    children = {child for names in loaded.get("group_map", {}).values() for child in names}
    in_group = {task.task_name for group in groups.values() for task in group.get_all_tasks()}
    items = [group for name, group in groups.items() if name not in children]
    items += [task for name, task in loaded["tasks"].items() if name not in in_group]
    return items
