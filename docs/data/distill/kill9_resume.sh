#!/usr/bin/env bash
# The kill -9 check of docs/results.md ("Few steps"), as run on 2026-12-07 (paths of that session: /tmp/d33, the venv /work/venv33).
# kill -9 a distillation mid-round, rerun it, and compare every tensor of every round's final checkpoint with an
# uninterrupted run of the same command
set -u
cd /tmp/d33
CDM="nice -n 19 env OMP_NUM_THREADS=1 /work/venv33/bin/cdm"
ARGS="pretrained:fashion-mnist/base8 --rounds 2 --start-steps 8 --round-steps 8 --set train.batch_size=16 --set train.ckpt_every=2 --set train.log_every=2 --set train.progress=false"
rm -rf k9_straight k9_killed
$CDM distill $ARGS --out k9_straight > k9_straight.log 2>&1
$CDM distill $ARGS --out k9_killed > k9_killed_1.log 2>&1 &
pid=$!
# the python process is the child of nice/env: find it
while [ ! -d k9_killed/round_1/checkpoints/step_00000004 ] && [ ! -d k9_killed/round_1/checkpoints/step_00000006 ]; do sleep 0.2; done
py=$(pgrep -f "cdm distill .*--out k9_killed" | head -1)
kill -9 $py
echo "killed pid $py after: $(ls k9_killed/round_1/checkpoints)"
wait $pid
echo "rc of the killed run: $?"
$CDM distill $ARGS --out k9_killed > k9_killed_2.log 2>&1
echo "rc of the rerun: $?"
/work/venv33/bin/python - <<'PY'
from pathlib import Path
import torch
from cascaded_diffusion.checkpoint import latest_checkpoint, load_tensors, load_state
same = True
for k in (1, 2):
    a, b = (latest_checkpoint(Path(d) / f"round_{k}") for d in ("k9_straight", "k9_killed"))
    for stem in ("model", "ema", "optimizer", "rng"):
        ta, tb = load_tensors(a, stem), load_tensors(b, stem)
        eq = ta.keys() == tb.keys() and all(torch.equal(ta[x], tb[x]) for x in ta)
        same &= eq
        print(f"round {k} {stem}: step {load_state(a)['step']} vs {load_state(b)['step']}: {'identical' if eq else 'DIFFERENT'}")
print("bit-identical" if same else "DIFFERENT")
PY
