#!/usr/bin/env bash
# Does the 8x8 base's sampler limit the cascade? Base (final20k, step 20000) with DPM-Solver++ 20 (the
# study's setting) vs ancestral DDPM 100 and 250 steps; every arm super-resolved by the unaugmented SR model with
# DPM-Solver++ 10 (the study's), 5000 class-balanced samples, classifier FID vs the 60k training images.
# RUNS holds base8, sr8to32_noaug and ref_fmnist_train_32.npz (the final study's dir, scripts/fashion_mnist_study.sh);
# every file is kept, so a rerun only adds what is missing.
#   RUNS=/work/runs/final20k OUT=/work/runs/basesampler scripts/base_sampler_check.sh
set -uo pipefail
R=${RUNS:-/work/runs/final20k}; O=${OUT:-/work/runs/basesampler}; mkdir -p "$O"
cd "$(dirname "$0")/.."; export OMP_NUM_THREADS=${THREADS:-1}
for arm in ${ARMS:-dpmpp:20 ddpm:100 ddpm:250}; do
  s=${arm%%:*}; n=${arm##*:}; b=$O/base_${s}${n}.npz; c=$O/cascade_${s}${n}.npz
  [ -f $b ] || { t=$(date +%s); python -m cascaded_diffusion.cli sample $R/base8 --num 5000 --sampler $s --steps $n --seed 0 --quiet --out $b; echo "base $arm $(( $(date +%s)-t )) s"; }
  [ -f $c ] || { t=$(date +%s); python -m cascaded_diffusion.cli sample $R/base8 $R/sr8to32_noaug --low-res-samples $b --num 5000 --sampler dpmpp --steps 10 --seed 1 --quiet --out $c; echo "sr $arm $(( $(date +%s)-t )) s"; }
  [ -f $c.json ] || python -m cascaded_diffusion.cli eval $c --ref $R/ref_fmnist_train_32.npz --features classifier --metrics fid,kid --out $c.json
  python -c "import json;d=json.load(open('$c.json'));print('$arm', 'FID', round(d['fid'],3), 'KID', d['kid'])"
done
