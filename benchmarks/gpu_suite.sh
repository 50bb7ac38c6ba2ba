#!/usr/bin/env bash
# Every GPU check and benchmark of docs/performance.md in one run, sized for a short lease on one GPU.
#
#   OUT=gpu_out BUDGET=540 benchmarks/gpu_suite.sh
#
# Sections run in order of importance, each under its own time limit, and none starts once the BUDGET
# (seconds) is nearly spent; every section appends to $OUT/suite.log and its JSON results to
# $OUT/results.jsonl as it finishes, so a run cut short keeps what it measured. Needs diffusers for the
# U-Net comparison (pip install -e .[bench]) and, for the sampler curve, a reference stats file
# (REF, default .devcarry/ref_stats.npz, written by `cdm stats`).
set -u
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-540}
REF=${REF:-.devcarry/ref_stats.npz}
SMOKE_DATA=${SMOKE_DATA:-.devcarry/fmnist_2k_32.npz}
CURVE_NUM=${CURVE_NUM:-5000}
CURVE_POINTS=${CURVE_POINTS:-ddpm:50,ddpm:250,ddim:20,ddim:100,dpmpp:30,dpmpp:50,ddim:10}
# A dry run of the wiring on a CPU: DEVICE=cpu BENCH_CONFIG=cpu-32 BENCH_EXTRA="--batch-size 2 --compile-backend aot_eager"
#   SAMPLING_BATCH=4 SAMPLING_EXTRA="--compile-backend aot_eager" ...
DEVICE=${DEVICE:-cuda}
BENCH_CONFIG=${BENCH_CONFIG:-adm-64}
BENCH_EXTRA=${BENCH_EXTRA:-}
mkdir -p "$OUT"
# CURVE_RESUME=earlier_curve.json: the sampler curve adds its points to that run's (same settings and reference)
[[ -n ${CURVE_RESUME:-} ]] && cp "$CURVE_RESUME" "$OUT/curve.json"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/suite.log"
START=$(date +%s)

left() { echo $((BUDGET - ($(date +%s) - START))); }

# section NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, time left); its last JSON line -> results.jsonl
section() {
    local name=$1 limit=$2
    shift 2
    local l
    l=$(left)
    if ((l < 25)); then
        echo "=== $name: SKIPPED (${l}s of the budget left)" | tee -a "$LOG"
        return
    fi
    ((limit > l)) && limit=$l
    echo "=== $name (limit ${limit}s, $(($(date +%s) - START))s into the run)" | tee -a "$LOG"
    local t0=$(date +%s) rc
    timeout -k 15 "$limit" "$@" >"$OUT/section.log" 2>&1
    rc=$?
    cat "$OUT/section.log" >>"$LOG"
    grep -v "^  train \|^  forward " "$OUT/section.log" | tail -n 12
    local json
    json=$(grep '^{' "$OUT/section.log" | tail -n 1)
    if [[ -n $json ]]; then
        echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"result\": $json}" >>"$OUT/results.jsonl"
    else
        echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"result\": null}" >>"$OUT/results.jsonl"
    fi
    rm -f "$OUT/section.log"
    echo "--- $name: rc $rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
}

section env 40 python3 - <<'EOF'
import json, subprocess, time, torch
print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                      "--format=csv"], capture_output=True, text=True).stdout)
d = torch.device("cuda")
a = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
ev[0].record()
for _ in range(20):
    a @ b
ev[1].record()
torch.cuda.synchronize()
ms = ev[0].elapsed_time(ev[1]) / 20
props = torch.cuda.get_device_properties(d)
print(json.dumps({"device": torch.cuda.get_device_name(d), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                  "bf16_matmul_tflops": round(2 * 8192**3 / ms / 1e9, 1)}))
EOF

BENCH="python3 benchmarks/unet_throughput.py --config $BENCH_CONFIG --device $DEVICE --dtype bf16 --channels-last --no-cpu-memory $BENCH_EXTRA"
# The issue's targets first: compiled training (ours against diffusers, both compiled, with a profile of one step),
# then eager with the A/B of our sub-pixel upsampling, then compiled forward. Compilation dominates these sections.
section ${BENCH_CONFIG}_compiled_train 280 $BENCH --compile --warmup 3 --iters 10 --skip-forward --profile 15
section ${BENCH_CONFIG}_eager 100 $BENCH --warmup 3 --iters 10 --with-direct-upsample --profile 15
section ${BENCH_CONFIG}_compiled_forward 150 $BENCH --compile --warmup 2 --iters 10 --skip-train
section cascade_sampling 150 python3 benchmarks/cascade_sampling.py --pretrained fashion-mnist --device "$DEVICE" \
    --batch-size "${SAMPLING_BATCH:-1000}" --batches 3 --modes "${SAMPLING_MODES:-eager,reduce-overhead}" ${SAMPLING_EXTRA:-}
section cuda_train_smoke 90 bash -c "
    set -e
    cdm() { python3 -m cascaded_diffusion.cli \"\$@\"; }
    R=\$(mktemp -d)
    cdm train configs/fashion-mnist/sr8to32.toml --out \$R/sr --device $DEVICE --steps 40 \
        --set data.source=npz:$SMOKE_DATA --set train.batch_size=${SMOKE_BATCH:-256} --set train.ckpt_every=20 \
        --set train.sample_every=0 --set train.log_every=10
    cdm train configs/fashion-mnist/sr8to32.toml --out \$R/sr --device $DEVICE --steps 60 \
        --set data.source=npz:$SMOKE_DATA --set train.batch_size=${SMOKE_BATCH:-256} --set train.ckpt_every=20 \
        --set train.sample_every=0 --set train.log_every=10
    cdm sample --pretrained fashion-mnist --num ${SMOKE_NUM:-2000} --batch-size 1000 --device $DEVICE --out \$R/s.npz --quiet
    python3 -c \"import json,numpy as np; a=np.load('\$R/s.npz')['arr_0']; print(json.dumps({'samples': a.shape[0], 'mean': float(a.mean())}))\"
"
section sampler_curve 170 python3 scripts/sampler_curve.py --pretrained fashion-mnist --ref "$REF" \
    --num "$CURVE_NUM" --batch-size 2500 --device "$DEVICE" --out "$OUT/curve.json" --plot "$OUT/curve.png" --points "$CURVE_POINTS"
echo "=== done in $(($(date +%s) - START))s" | tee -a "$LOG"
# The short table last, so that the end of the output is the summary.
python3 - "$OUT/results.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    r = row["result"] or {}
    keys = [k for k in ("device", "bf16_matmul_tflops", "train_img_s_ours", "train_img_s_diffusers", "train_speedup",
                        "train_speedup_paired_median", "train_subpixel_speedup", "forward_img_s_ours",
                        "forward_img_s_diffusers", "forward_subpixel_speedup",
                        "forward_speedup", "forward_speedup_paired_median", "train_peak_mem_bytes_ours",
                        "train_peak_mem_bytes_diffusers", "samples_per_s", "speedup_vs_eager", "max_abs_diff_vs_eager",
                        "samples", "mean") if r.get(k) is not None]
    cells = ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys)
    print(f"{row['section']:28s} rc={row['rc']} {row['seconds']:4d}s  {cells}")
EOF
python3 -c "
import json, sys
for p in json.load(open(sys.argv[1]))['points']:
    print(f\"curve {p['sampler']:5s} {str(p['steps']):>9s}  FID {p['fid']:.3f}  KID {p['kid']['mean']:.4f}  {p['samples_per_s']:.1f} samples/s\")
" "$OUT/curve.json" 2>/dev/null
