"""Print the markdown tables of docs/results.md from a study directory's JSON results.

    python scripts/study_tables.py RUNS_DIR

Reads ``sweep_nontruncated.json``, ``sweep_truncated.json`` and, per setting, ``NAME.metrics.json`` and
``NAME.cas.json`` (and ``NAME.cas_seedK.json``, the same CAS with other classifier seeds; as written by
scripts/fashion_mnist_study.sh with CAS_SEEDS), and ``convergence.jsonl`` (as written by
scripts/convergence_study.py), so the tables are generated, never typed.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SETTINGS = [
    ("cascade_noise", "cascade 8→32, noise augmentation (s from the sweep)"),
    ("cascade_noise_s0", "same cascade, s = 0 (no augmentation at sampling)"),
    ("cascade_noaug", "cascade 8→32, SR trained without augmentation"),
    ("single32", "single 32×32 model"),
]


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_cas(runs: Path, name: str):
    """NAME's seed-0 CAS: ``NAME.cas.json`` as the study writes it, else ``NAME.cas_seed0.json`` (the same
    classifier seed under the ``--seed K`` naming); None if neither exists."""
    return load(runs / f"{name}.cas.json") or load(runs / f"{name}.cas_seed0.json")


def cas_top1_over_seeds(runs: Path, name: str) -> list[float]:
    """CAS top-1 (%) of every classifier seed scored on NAME's samples, seed 0 first."""
    first = load_cas(runs, name)
    # a NAME.cas_seed0.json beside NAME.cas.json repeats it (the study writes seed 0 there): not counted twice
    others = [load(f) for f in sorted(runs.glob(f"{name}.cas_seed*.json")) if f.name != f"{name}.cas_seed0.json"]
    return [100 * c["generated"]["top1"] for c in [first, *others] if c]


def cas_over_seeds(runs: Path, name: str) -> str:
    """CAS top-1 as mean ± std over the classifier seeds scored; the spread of the classifier's training,
    which a single CAS number hides. Empty with fewer than two seeds."""
    top1 = cas_top1_over_seeds(runs, name)
    if len(top1) < 2:
        return ""
    return f"{statistics.mean(top1):.1f} ± {statistics.stdev(top1):.1f} ({len(top1)} seeds)"


def main(root: str) -> None:
    runs = Path(root)
    rows = []
    # the real-data CAS baseline (same N, same recipe) is trained once, alongside one of the settings
    real_cas = next((c["real"] for c in (load_cas(runs, n) for n, _ in SETTINGS) if c and c.get("real")), None)
    for name, label in SETTINGS:
        m = load(runs / f"{name}.metrics.json")
        if m is None:
            continue
        cas = load_cas(runs, name)
        cells = [
            label,
            str(m["num_samples"]),
            f"{m['fid']:.2f}",
            f"{m['kid']['mean']:.3f} ± {m['kid']['std']:.3f}",
            f"{m['is']['mean']:.2f} ± {m['is']['std']:.2f}",
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
        ]
        if cas:
            g = cas["generated"]
            cells.append(f"{100 * g['top1']:.1f} / {100 * g['top5']:.1f}")
            r = cas.get("real") or real_cas
            cells.append(f"{100 * r['top1']:.1f} / {100 * r['top5']:.1f}" if r else "")
        else:
            cells += ["", ""]
        cells.append(cas_over_seeds(runs, name))
        rows.append(cells)
    if rows:
        network = load(runs / f"{SETTINGS[0][0]}.metrics.json") or {}
        print(f"Feature network: `{network.get('feature_network', '?')}` (classifier features, not Inception).\n")
        print("| setting | N | FID | KID | IS | precision | recall | CAS top-1 / top-5 % | real-data CAS (same N) "
              "| CAS top-1 %, classifier seeds |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
        print()
    convergence_table(runs / "convergence.jsonl")
    for mode in ("nontruncated", "truncated"):
        sweep = load(runs / f"sweep_{mode}.json")
        if sweep is None:
            continue
        gt = {r["level"]: r["fid"] for r in sweep.get("ground_truth", [])}
        print(f"Sweep, {mode} (N = {sweep['num_samples']} per level, best s = {sweep['best_level']}):\n")
        print("| s | FID, generated low-res inputs | FID, ground-truth low-res inputs |")
        print("|---|---|---|")
        for r in sweep["generated"]:
            g = gt.get(r["level"])
            print(f"| {r['level']} | {r['fid']:.2f} | {'' if g is None else f'{g:.2f}'} |")
        print()


def convergence_table(path: Path) -> None:
    """FID at every scored checkpoint: one row per budget, the augmented model at each scored s."""
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    levels = sorted({r["s"] for r in records if r["model"] == "sr8to32" and r["s"] is not None})
    base_steps = sorted({r["base_step"] for r in records if r.get("base_step") is not None})
    on_base = f"; every cascade point super-resolves the same base samples, base step {', '.join(map(str, base_steps))}"
    print(f"Quality against training compute (N = {records[0]['num']} per point, classifier features, "
          f"± bootstrap std{on_base if base_steps else ''}):\n")
    head = ["SR steps", "SR epochs", "cascade training (PFLOP)", "CPU-hours"]
    gaps = load(path.parent / "convergence_gaps.json") or {}  # paired bootstrap (convergence_study.py --gaps)
    head += [f"augmented, s = {s}" for s in levels] + ["without augmentation", "augmented (best s) − without"
                                                       + (" (± paired bootstrap)" if gaps else "")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    by_step: dict[int, dict] = {}
    for r in records:
        if r["model"] == "single32":
            continue
        by_step.setdefault(r["step"], {})[(r["model"], r["s"])] = r
    for step in sorted(by_step):
        row = by_step[step]
        any_rec = next(iter(row.values()))
        best = min((r for (m, _), r in row.items() if m == "sr8to32"), key=lambda r: r["fid"], default=None)

        def cell(r):
            if r is None:
                return ""
            text = f"{r['fid']:.2f} ± {r['fid_bootstrap_std'] or 0:.2f}"
            return f"**{text}**" if r is best else text

        cells = [str(step), f"{any_rec['epochs']:.1f}", f"{any_rec['train_flops'] / 1e15:.2f}",
                 f"{any_rec['cpu_hours']:.2f}"]
        noaug = row.get(("sr8to32_noaug", None))
        cells += [cell(row.get(("sr8to32", s))) for s in levels] + [cell(noaug)]
        paired = gaps.get(str(step))
        if paired and best and paired["s"] == best["s"]:
            cells.append(f"{paired['gap']:+.2f} ± {paired['gap_paired_std']:.2f}")
        else:
            cells.append(f"{best['fid'] - noaug['fid']:+.2f}" if best and noaug else "")
        print("| " + " | ".join(cells) + " |")
    single = sorted((r for r in records if r["model"] == "single32"), key=lambda r: r["step"])
    if single:
        print("\nSingle 32×32 model:\n")
        print("| steps | epochs | training (PFLOP) | CPU-hours | FID |")
        print("|---|---|---|---|---|")
        for r in single:
            print(f"| {r['step']} | {r['epochs']:.1f} | {r['train_flops'] / 1e15:.2f} | {r['cpu_hours']:.2f} | "
                  f"{r['fid']:.2f} ± {r['fid_bootstrap_std'] or 0:.2f} |")
    print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/study")
