#!/usr/bin/env bash
# Safety Arithmetic end to end on CPU with a real model (no GPU, hub or network). SmolLM2 is not
# aligned (it complies with almost every AdvBench prompt), so HDR and ICV have no refusal
# behaviour to restore; this script first makes the settings the paper assumes:
#   data     SmolLM2's own answers to AdvBench rows 300-429 (harmful) and AlpacaEval rows 405-704
#            (benign), and the built-in refusals for AdvBench rows 150-299
#   aligned  SmolLM2 fully fine-tuned on the refusals + 150 benign answers, 1 epoch (BASE setting)
#   sft      aligned fine-tuned on 150 other benign answers                  (SFT setting)
#   harm     aligned fine-tuned on 100 harmful answers                       (θ_H; τ_H = harm − aligned)
# then evaluates HDR, ICV and both on each with examples/safety_arithmetic_cpu.toml.
# Run scripts/setup.sh first. Finished parts are reused; extra arguments go to `evalkit matrix`.
set -euo pipefail
cd "$(dirname "$0")/.."
export EVALKIT_DATA=${EVALKIT_DATA:-$(cd .. && pwd)/shared/datasets}
export EVALKIT_SERVE_DIR=${EVALKIT_SERVE_DIR:-runs/serve}
export OMP_WAIT_POLICY=PASSIVE  # the answer servers and the fine-tunes share the cores
W=models/safety-arithmetic-cpu
SA=(.venv/bin/python -m servers.safety_arithmetic)
mkdir -p "$W/data"
answers() { [ -f "$2" ] || "${SA[@]}" answers "$@"; }
answers "$EVALKIT_DATA/advbench/harmful_behaviors.csv" "$W/data/harmful_answers.jsonl" --rows 300:430 --serve smollm2-135m
answers "$EVALKIT_DATA/alpaca_eval/alpaca_eval.jsonl" "$W/data/benign_answers.jsonl" --rows 405:705 --serve smollm2-135m --max-tokens 48
answers "$EVALKIT_DATA/advbench/harmful_behaviors.csv" "$W/data/refusals.jsonl" --rows 150:300 --refuse
head -n 100 "$W/data/harmful_answers.jsonl" > "$W/data/harm.jsonl"
tail -n 30 "$W/data/harmful_answers.jsonl" > "$W/data/icv_pairs.jsonl"  # safe side: the paper's refusal
head -n 150 "$W/data/benign_answers.jsonl" | cat "$W/data/refusals.jsonl" - > "$W/data/aligned.jsonl"
tail -n 150 "$W/data/benign_answers.jsonl" > "$W/data/sft.jsonl"
finetune() { [ -f "$2/evalkit_recipe.json" ] || { rm -rf "$2"; "${SA[@]}" finetune "$@"; }; }
finetune smollm2-135m "$W/aligned" --data "$W/data/aligned.jsonl" --name aligned --lr 5e-5 --epochs 1
finetune "$W/aligned" "$W/sft" --data "$W/data/sft.jsonl" --name sft --lr 5e-5
finetune "$W/aligned" "$W/harm" --data "$W/data/harm.jsonl" --name harm --lr 5e-5
.venv/bin/evalkit matrix examples/safety_arithmetic_cpu.toml "$@"
echo "report: runs/safety-arithmetic-cpu/report/comparison.html"
