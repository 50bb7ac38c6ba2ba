#!/usr/bin/env bash
# The Fashion-MNIST conditioning-augmentation study (docs/results.md), end to end:
#   train base 8x8, SR 8->32 with and without noise augmentation, and a single 32x32 model;
#   score every setting with classifier features (FID, KID, IS, precision/recall) and CAS;
#   sweep the augmentation level s (non-truncated and truncated, generated and ground-truth inputs).
# Everything resumes: rerunning skips finished training and reuses existing sample files.
#
# Knobs (environment): RUNS (output dir), STEPS_BASE / STEPS_SR / STEPS_SINGLE (training steps; the single
# model's default matches base + SR in training FLOPs: per image of batch 64 the base costs 0.198 forward GFLOP,
# the SR stage on its 16x16 crops 0.141, the single 32x32 model 0.556 (scripts/stage_costs.py), so one base step
# is 0.356 and one SR step 0.254 of a single-model step; STEPS_SINGLE=0 leaves the single model out),
# NUM (samples per setting, paper protocol 10000), SWEEP_NUM, LEVELS, SAMPLER / SAMPLE_STEPS (per stage,
# base,SR), S (sampling level; default: the non-truncated sweep's optimum), DEVICE (cpu|cuda),
# FEATURES (default: the classifier shipped with the package), CAS_SEEDS (classifier seeds for CAS, default 0;
# e.g. 0,1,2 for a mean ± std: seed 0 writes NAME.cas.json, seed K NAME.cas_seedK.json).
# After training, two lanes run side by side (one CPU core each): the sweeps, and the settings that do not
# depend on s (base samples, the cascade without augmentation, the single model); then the s-dependent ones.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/study}
STEPS_BASE=${STEPS_BASE:-4000}
STEPS_SR=${STEPS_SR:-3500}
STEPS_SINGLE=${STEPS_SINGLE:-$(((STEPS_BASE * 356 + STEPS_SR * 254) / 1000))}
NUM=${NUM:-10000}
SWEEP_NUM=${SWEEP_NUM:-1000}
LEVELS=${LEVELS:-0,50,100,200,400,700}
SAMPLER=${SAMPLER:-dpmpp}
SAMPLE_STEPS=${SAMPLE_STEPS:-20,10}
S=${S:-}
DEVICE=${DEVICE:-auto}
FEATURES=${FEATURES:-classifier}
CAS_SEEDS=${CAS_SEEDS:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUNS"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUNS/study.log"; }

train() {  # config run_dir steps
  [ -d "$RUNS/$2/checkpoints/step_$(printf %08d "$3")" ] && return 0  # already trained that far
  log "train $1 -> $2 ($3 steps)"
  cdm train "configs/fashion-mnist/$1.toml" --out "$RUNS/$2" --steps "$3" --device "$DEVICE" --set train.progress=false
}
# base 8x8 and the single model first; the two SR models train on the same schedule
train base8 base8 "$STEPS_BASE"
train sr8to32 sr8to32 "$STEPS_SR"
train sr8to32_noaug sr8to32_noaug "$STEPS_SR"
if [ "$STEPS_SINGLE" -gt 0 ]; then train single32 single32 "$STEPS_SINGLE"; fi

REF="$RUNS/ref_fmnist_train_32.npz"
[ -f "$REF" ] || { log "reference stats"; cdm stats fashion-mnist --resolution 32 --features "$FEATURES" --out "$REF" --device "$DEVICE"; }
SR_STEPS=${SAMPLE_STEPS##*,}
BASE_STEPS=${SAMPLE_STEPS%%,*}

sample() {  # name args...
  local name=$1; shift
  [ -f "$RUNS/$name.npz" ] || { log "sample $name"; cdm sample "$@" --num "$NUM" --out "$RUNS/$name.npz" \
      --grid "$RUNS/$name.png" --sampler "$SAMPLER" --device "$DEVICE" --quiet; }
}

sweeps() {  # the sweep picks s for the noise-augmented cascade (generated and ground-truth low-res curves)
  for mode in nontruncated truncated; do
    local flag="" gt="--ground-truth fashion-mnist"
    # with ground-truth inputs truncation changes nothing (the base does not run), so that curve is measured once
    [ "$mode" = truncated ] && { flag="--truncated"; gt="--no-ground-truth"; }
    local out="$RUNS/sweep_$mode.json"
    [ -f "$out" ] || { log "sweep $mode"; cdm sweep "$RUNS/base8" "$RUNS/sr8to32" --aug-levels "$LEVELS" --num "$SWEEP_NUM" \
        --ref "$REF" $gt --features "$FEATURES" --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" \
        --device "$DEVICE" --out "$out" --plot "$RUNS/sweep_$mode.png" $flag; }
  done
}

independent_of_s() {
  # base samples once, shared by every cascade setting (so the settings differ only in their SR stage)
  [ -f "$RUNS/base8_samples.npz" ] || { log "sample base"; cdm sample "$RUNS/base8" --num "$NUM" --steps "$BASE_STEPS" \
      --sampler "$SAMPLER" --out "$RUNS/base8_samples.npz" --grid "$RUNS/base8_samples.png" --device "$DEVICE" --quiet; }
  sample cascade_noaug "$RUNS/base8" "$RUNS/sr8to32_noaug" --steps "$SAMPLE_STEPS" --low-res-samples "$RUNS/base8_samples.npz"
  if [ -d "$RUNS/single32" ]; then sample single32 "$RUNS/single32" --steps "$SR_STEPS"; fi
}

sweeps > "$RUNS/lane_sweeps.log" 2>&1 &
independent_of_s > "$RUNS/lane_settings.log" 2>&1 &
wait
if [ -z "$S" ]; then
  S=$(python -c "import json; print(json.load(open('$RUNS/sweep_nontruncated.json'))['best_level'])")
fi
log "sampling level s=$S (non-truncated sweep optimum)"
# is the sampling default close to many-step sampling? (the full FID-vs-steps curve: docs/performance.md)
[ -f "$RUNS/sampler_check.json" ] || { log "sampler check"; python scripts/sampler_curve.py "$RUNS/base8" "$RUNS/sr8to32" \
    --ref "$REF" --features "$FEATURES" --num "${CHECK_NUM:-500}" --aug-level "$S" --device "$DEVICE" \
    --points "${CHECK_POINTS:-dpmpp:10,dpmpp:20,ddpm:100}" --base-steps "dpmpp:$BASE_STEPS" \
    --out "$RUNS/sampler_check.json" --plot "$RUNS/sampler_check.png"; } &
sample cascade_noise "$RUNS/base8" "$RUNS/sr8to32" --steps "$SAMPLE_STEPS" --aug-level "$S" --low-res-samples "$RUNS/base8_samples.npz" &
[ "$S" = 0 ] || sample cascade_noise_s0 "$RUNS/base8" "$RUNS/sr8to32" --steps "$SAMPLE_STEPS" --aug-level 0 \
    --low-res-samples "$RUNS/base8_samples.npz" &
wait

score() {
  local name=$1 real=$2
  [ -f "$RUNS/$name.npz" ] || return 0
  [ -f "$RUNS/$name.metrics.json" ] || { log "eval $name"; cdm eval "$RUNS/$name.npz" --ref "$REF" --features "$FEATURES" \
      --metrics fid,kid,is,pr --out "$RUNS/$name.metrics.json" --device "$DEVICE"; }
  [ -f "$RUNS/$name.cas.json" ] || { log "cas $name"; cdm cas "$RUNS/$name.npz" --test fashion-mnist:test $real \
      --out "$RUNS/$name.cas.json" --device "$DEVICE"; }
  local seed
  for seed in ${CAS_SEEDS//,/ }; do  # the classifier's own spread: the same samples, other training seeds
    [ "$seed" = 0 ] || [ -f "$RUNS/$name.cas_seed$seed.json" ] || { log "cas $name, seed $seed"
      cdm cas "$RUNS/$name.npz" --test fashion-mnist:test --seed "$seed" --out "$RUNS/$name.cas_seed$seed.json" \
          --device "$DEVICE"; }
  done
}
# the real-data CAS baseline (same N, same recipe) is trained once, with the first setting
{ score cascade_noise "--real fashion-mnist"; score cascade_noise_s0 ""; } &
{ score cascade_noaug ""; score single32 ""; } &
wait
python scripts/study_tables.py "$RUNS" > "$RUNS/tables.md"
log "done: results in $RUNS (tables.md)"
