#!/usr/bin/env bash
# The Fashion-MNIST conditioning-augmentation study (docs/results.md), end to end:
#   train base 8x8, SR 8->32 with and without noise augmentation, and a single 32x32 model;
#   score every setting with classifier features (FID, KID, IS, precision/recall) and CAS;
#   sweep the augmentation level s (non-truncated and truncated, generated and ground-truth inputs).
# Everything resumes: rerunning skips finished training and reuses existing sample files.
#
# Knobs (environment): RUNS (output dir), STEPS_BASE / STEPS_SR / STEPS_SINGLE (training steps),
# NUM (samples per setting, paper protocol 10000), SWEEP_NUM, LEVELS, SAMPLER, SAMPLE_STEPS, S (sampling level),
# DEVICE (cpu|cuda), FEATURES (default: the classifier shipped with the package).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/study}
STEPS_BASE=${STEPS_BASE:-3000}
STEPS_SR=${STEPS_SR:-1500}
STEPS_SINGLE=${STEPS_SINGLE:-1800}
NUM=${NUM:-10000}
SWEEP_NUM=${SWEEP_NUM:-2000}
LEVELS=${LEVELS:-0,25,50,100,200,300,450,600,800,1000}
SAMPLER=${SAMPLER:-ddim}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
S=${S:-}
DEVICE=${DEVICE:-auto}
FEATURES=${FEATURES:-classifier}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUNS"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUNS/study.log"; }

train() {  # config run_dir steps
  log "train $1 -> $2 ($3 steps)"
  cdm train "configs/fashion-mnist/$1.toml" --out "$RUNS/$2" --steps "$3" --device "$DEVICE" --set train.progress=false
}
# base 8x8 and the single model first; the two SR models train on the same schedule
train base8 base8 "$STEPS_BASE"
train sr8to32 sr8to32 "$STEPS_SR"
train sr8to32_noaug sr8to32_noaug "$STEPS_SR"
train single32 single32 "$STEPS_SINGLE"

REF="$RUNS/ref_fmnist_train_32.npz"
[ -f "$REF" ] || { log "reference stats"; cdm stats fashion-mnist --resolution 32 --features "$FEATURES" --out "$REF" --device "$DEVICE"; }

# the sweep picks s for the noise-augmented cascade (generated and ground-truth low-res curves)
for mode in nontruncated truncated; do
  flag=""; [ "$mode" = truncated ] && flag="--truncated"
  out="$RUNS/sweep_$mode.json"
  [ -f "$out" ] || { log "sweep $mode"; cdm sweep "$RUNS/base8" "$RUNS/sr8to32" --aug-levels "$LEVELS" --num "$SWEEP_NUM" \
      --ref "$REF" --ground-truth fashion-mnist --features "$FEATURES" --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" \
      --device "$DEVICE" --out "$out" --plot "$RUNS/sweep_$mode.png" $flag; }
done
if [ -z "$S" ]; then
  S=$(python -c "import json; print(json.load(open('$RUNS/sweep_nontruncated.json'))['best_level'])")
fi
log "sampling level s=$S (non-truncated sweep optimum)"

sample() {  # name args...
  local name=$1; shift
  [ -f "$RUNS/$name.npz" ] || { log "sample $name"; cdm sample "$@" --num "$NUM" --out "$RUNS/$name.npz" \
      --grid "$RUNS/$name.png" --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" --device "$DEVICE" --quiet; }
}
sample cascade_noise "$RUNS/base8" "$RUNS/sr8to32" --aug-level "$S" --save-stages "$RUNS/stages_noise"
sample cascade_noise_s0 "$RUNS/base8" "$RUNS/sr8to32" --aug-level 0 --low-res-samples "$RUNS/stages_noise/stage1_8px.npz"
sample cascade_noaug "$RUNS/base8" "$RUNS/sr8to32_noaug" --low-res-samples "$RUNS/stages_noise/stage1_8px.npz"
sample single32 "$RUNS/single32"

for name in cascade_noise cascade_noise_s0 cascade_noaug single32; do
  [ -f "$RUNS/$name.metrics.json" ] || { log "eval $name"; cdm eval "$RUNS/$name.npz" --ref "$REF" --features "$FEATURES" \
      --metrics fid,kid,is,pr --out "$RUNS/$name.metrics.json" --device "$DEVICE"; }
  [ -f "$RUNS/$name.cas.json" ] || { log "cas $name"; cdm cas "$RUNS/$name.npz" --test fashion-mnist:test --real fashion-mnist \
      --out "$RUNS/$name.cas.json" --device "$DEVICE"; }
done
log "done: results in $RUNS"
