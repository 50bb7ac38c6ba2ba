#!/usr/bin/env bash
# Progressive distillation of the bundled Fashion-MNIST cascade (docs/sampling.md "Distill your own cascade",
# docs/results.md "Few steps"). Restartable: rerun the same command after any interruption (kill -9 included) and
# every job resumes bit-exactly from its newest checkpoint; finished rounds and scored points are skipped.
#
#   scripts/distill_fashion_mnist.sh train   # both stages' distillations, side by side, one thread and one core each
#   scripts/distill_fashion_mnist.sh train base8          # one stage only (or sr8to32_noaug), e.g. when one core is free
#   scripts/distill_fashion_mnist.sh long4   # the base's round 4 again with 3x the steps, then RUNS/long = base8 rounds
#                                            # 1-3 + that round as round 4, and the SR distillation (RUNS=RUNS/long study|ship)
#   scripts/distill_fashion_mnist.sh study   # quality against steps (distilled vs DPM-Solver++), cost, CAS, speed
#   scripts/distill_fashion_mnist.sh ship    # the fashion-mnist-distilled bundle (BASE_STEPS + SR_STEPS <= 8)
#
# RUNS (default /work/runs/distill), NUM (samples per curve point, default 2000; the candidate cascades of at most 8
# evaluations and the shipped one are also scored at 10000), BASE_STEPS / SR_STEPS (default 2 / 5: the base's 2-step
# student + DPM-Solver++ 5 for the SR stage, the candidate that met every target: 7 evaluations) and SR_SAMPLER
# (default dpmpp: the study found DPM-Solver++ better than the SR stage's students at the same steps; "distilled"
# ships the student), NICE (default 19) and FIRST_CPU (default 0) can be set in the environment. The speed comparison
# wants an idle machine.
set -euo pipefail
CODE="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-/work/runs/distill}"
NUM="${NUM:-2000}"
BASE_STEPS="${BASE_STEPS:-2}"
SR_STEPS="${SR_STEPS:-5}"
SR_SAMPLER="${SR_SAMPLER:-dpmpp}"
export PYTHONPATH="$CODE" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$CODE"
mkdir -p "$RUNS"
cdm() { nice -n "${NICE:-19}" python -m cascaded_diffusion.cli "$@"; }

case "${1:-}" in
  train)
    # base8: eps-prediction + learned variances -> a v-prediction student; 64 -> 32 -> 16 -> 8 -> 4 -> 2 steps
    # sr8to32_noaug: v-prediction + learned variances; 16 -> 8 -> 4 -> 2 -> 1 steps
    cpu="${FIRST_CPU:-0}"
    ncpu=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    stages="${2:-base8 sr8to32_noaug}"
    case "$stages" in base8|sr8to32_noaug|"base8 sr8to32_noaug") ;; *) echo "unknown stage: $stages" >&2; exit 2 ;; esac
    for stage in $stages; do
      set -- "$stage" "pretrained:fashion-mnist/$stage"
      nohup taskset -c "$cpu" nice -n "${NICE:-19}" python -m cascaded_diffusion.cli distill "$2" --out "$RUNS/$1" \
        --config "configs/fashion-mnist/distill_$1.toml" >> "$RUNS/$1.out" 2>&1 &
      cpu=$(( (cpu + 1) % ncpu ))
    done
    wait
    ;;
  long4)
    # the shipped base: round 4 (8 -> 4 steps) from round 3's student with 12000 instead of 4000 optimizer steps
    OMP_NUM_THREADS="${THREADS:-1}" cdm distill "$RUNS/base8/round_3" --out "$RUNS/base8_round4_long" \
      --config configs/fashion-mnist/distill_base8.toml --rounds 1 --start-steps 8 --round-steps 12000 \
      >> "$RUNS/base8_round4_long.out" 2>&1
    mkdir -p "$RUNS/long/base8"
    for k in 1 2 3; do ln -sfn "$RUNS/base8/round_$k" "$RUNS/long/base8/round_$k"; done
    ln -sfn "$RUNS/base8_round4_long/round_1" "$RUNS/long/base8/round_4"
    ln -sfn "$RUNS/sr8to32_noaug" "$RUNS/long/sr8to32_noaug"
    ln -sfn "$RUNS/ref_fmnist_train_32.npz" "$RUNS/long/ref_fmnist_train_32.npz"
    ;;
  study)
    # the reference: the 60000 training images' classifier features, as for the shipped cascade's numbers
    [ -f "$RUNS/ref_fmnist_train_32.npz" ] || cdm stats fashion-mnist --features classifier --resolution 32 \
      --out "$RUNS/ref_fmnist_train_32.npz"
    nice -n "${NICE:-19}" python scripts/few_steps_study.py --runs "$RUNS" --ref "$RUNS/ref_fmnist_train_32.npz" \
      --num "$NUM" --out "$RUNS/study" --plot "$RUNS/study/few_steps.png"
    # the candidates of at most 8 evaluations and the shipped cascade at the target's 10000 samples, each with CAS
    # over 3 classifier seeds (dpmpp20+dpmpp4: where CAS goes, the shipped base with the SR stage at 4 steps); then
    # the speed of the shipped cascade and the candidates (interleaved batches of 250, both cores)
    candidates="cascade/pd4+dpmpp4 cascade/pd4+pd4 cascade/pd2+dpmpp6 cascade/pd2+dpmpp5 base/dpmpp20 cascade/dpmpp20+dpmpp4"
    nice -n "${NICE:-19}" python scripts/few_steps_study.py --runs "$RUNS" --ref "$RUNS/ref_fmnist_train_32.npz" \
      --num 10000 --out "$RUNS/study10k" --points "$(echo $candidates | tr ' ' ,)"
    for point in $candidates; do
      point=${point//\//_}; point=${point//+/_}
      for seed in 0 1 2; do
        out="$RUNS/study10k/samples/$point.cas$seed.json"
        [ -f "$out" ] || cdm cas "$RUNS/study10k/samples/$point.npz" --test fashion-mnist:test --seed "$seed" --out "$out"
      done
    done
    OMP_NUM_THREADS=$(env -u OMP_NUM_THREADS nproc) python scripts/few_steps_study.py --runs "$RUNS" \
      --ref "$RUNS/ref_fmnist_train_32.npz" --num 10000 --out "$RUNS/study10k" --points none --speed --speed-repeats 3 \
      --speed-points "cascade/dpmpp20+dpmpp10,cascade/pd4+dpmpp4,cascade/pd2+dpmpp6,cascade/pd2+dpmpp5"
    ;;
  ship)
    python scripts/ship_fashion_mnist_distilled.py "$RUNS" --base-steps "$BASE_STEPS" --sr-steps "$SR_STEPS" \
      --sr-sampler "$SR_SAMPLER" --study "$RUNS/study10k/results.json"
    python scripts/write_bundle_cards.py fashion-mnist-distilled
    ;;
  *)
    echo "usage: $0 train [base8|sr8to32_noaug]|long4|study|ship" >&2
    exit 2
    ;;
esac
