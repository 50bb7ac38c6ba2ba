#!/usr/bin/env bash
# The 256 px emoji cascade's trainings (docs/emoji256.md), two at a time, one thread and one core each, in the
# background. Restartable: the same command resumes every run exactly from its newest checkpoint.
#
#   scripts/emoji256_train.sh top      # sr64to256 (blur) and sr64to256_noaug
#   scripts/emoji256_train.sh lower    # base16 and sr16to64 (noise)
#   scripts/emoji256_train.sh rest     # sr16to64_noaug and sr64to256_noise
#   FIRST_CPU=1 scripts/emoji256_train.sh base16   # any run names (configs/emoji256/NAME.toml), one core each
#   STEPS=2000 scripts/emoji256_train.sh sr64to256  # stop at a budget below train.steps (resume later with more)
#
# RUNS (default /work/runs/emoji256), DATA (default /work/data: emoji256/, emoji256-train/, emoji256-test/) and
# CODE (default: this checkout; the runs of 2026-12-07 use a frozen worktree of commit 5fd358b at /work/frozen256,
# `git worktree add --detach /work/frozen256 5fd358b`) can be set in the environment. The data is prepared first
# when it is missing (npm pack needs the npm registry once; the tarballs are cached).
set -euo pipefail
CODE="${CODE:-$(cd "$(dirname "$0")/.." && pwd)}"
RUNS="${RUNS:-/work/runs/emoji256}"
DATA="${DATA:-/work/data}"
export PYTHONPATH="$CODE" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$CODE"
pair=()
for arg in "$@"; do
  case "$arg" in
    top) pair+=(sr64to256 sr64to256_noaug) ;;
    lower) pair+=(base16 sr16to64) ;;
    rest) pair+=(sr16to64_noaug sr64to256_noise) ;;
    *) [ -f "configs/emoji256/$arg.toml" ] || { echo "usage: $0 top|lower|rest|RUN_NAME..." >&2; exit 2; }
       pair+=("$arg") ;;
  esac
done
[ "${#pair[@]}" -gt 0 ] || { echo "usage: $0 top|lower|rest|RUN_NAME..." >&2; exit 2; }
if [ ! -f "$DATA/emoji256-train/manifest.json" ] || [ ! -f "$DATA/emoji256-test/manifest.json" ]; then
  python scripts/prepare_emoji256.py --out "$DATA/emoji256"
  for split in train test; do
    python -m cascaded_diffusion.cli prepare "imagefolder:$DATA/emoji256/$split" --resolutions 16,64,256 \
      --out "$DATA/emoji256-$split" --quiet
  done
fi
mkdir -p "$RUNS"
cpu="${FIRST_CPU:-0}"
for name in "${pair[@]}"; do
  nohup taskset -c "$cpu" python -m cascaded_diffusion.cli train "configs/emoji256/$name.toml" --out "$RUNS/$name" \
    --set "data.source=prepared:$DATA/emoji256-train" --set train.progress=false ${STEPS:+--steps "$STEPS"} > "$RUNS/$name.out" 2>&1 &
  cpu=$(( (cpu + 1) % $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) ))  # nproc alone obeys OMP_NUM_THREADS=1
done
wait
