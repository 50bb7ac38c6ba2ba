#!/usr/bin/env bash
# The long trainings of the Fashion-MNIST convergence study (docs/results.md, "At convergence"), in the
# background, one thread each, resumable: rerun the same command after a stop and every run continues from its
# newest checkpoint (bit-exact resume). Finished runs are skipped.
#
#   scripts/fashion_mnist_convergence.sh [RUNS] [MODELS...]
#     RUNS    default /work/runs/conv (outside the work tree: never commit training state)
#     MODELS  default: base8 sr8to32 sr8to32_noaug single32; pass a subset to choose what shares the cores
#   STEPS=N (environment) stops every run at N steps instead of its config's train.steps; raising N later
#     continues from there (the learning rate is constant after warm-up, so a run stopped and continued equals
#     one run to the larger N). The study's runs: STEPS=10000, then STEPS=20000.
#
# Each run writes RUNS/MODEL.out; `tail -n 2 RUNS/*/log.jsonl` shows progress. The SR models and the single
# model keep checkpoints at doubling budgets (train.keep_steps in their configs) for
# scripts/convergence_study.py.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-/work/runs/conv}
shift || true
MODELS=("$@")
[ ${#MODELS[@]} -eq 0 ] && MODELS=(base8 sr8to32 sr8to32_noaug single32)
mkdir -p "$RUNS"
for model in "${MODELS[@]}"; do
  config="configs/fashion-mnist/$model.toml"
  steps=${STEPS:-$(python - "$config" <<'EOF'
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["train"]["steps"])
EOF
)}
  if [ -d "$RUNS/$model/checkpoints/step_$(printf %08d "$steps")" ]; then
    echo "$model: finished ($steps steps)"
    continue
  fi
  OMP_NUM_THREADS=1 nohup cdm train "$config" --out "$RUNS/$model" --steps "$steps" --set train.progress=false \
    >> "$RUNS/$model.out" 2>&1 &
  echo "$model: training in the background (pid $!), log $RUNS/$model.out"
done
