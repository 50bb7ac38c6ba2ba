"""How good is a low-resolution base model on its own, and is it still improving with training?

The question: the cascade's FID is dominated by its base's samples (the SR stage alone scores 1.22 on real 8×8
inputs, 5.6–6.2 on the base's). This scores base samples *at the base's resolution*, with no SR stage in the
way: samples and real images are both upsampled bilinearly to the feature network's 32×32 (what an SR stage
conditions on) and compared with classifier features against the base's own training images (the same
resize the base was trained on). The test split, resized alike, is the real-data floor. Several sample files
(e.g. the base at 10000 and 20000 steps, same sampler and seed) give the base's compute curve.

It also reports, for the classes whose real images all face one way (Fashion-MNIST's sandals, sneakers and
ankle boots: cascaded_diffusion/data/mirror.py), the fraction of samples that face that way: about 50 % from a
base trained with random flips, which is what this script found the base's error to be.

    python scripts/base_quality.py /work/runs/conv/base8_samples.npz /work/runs/final20k/base8_samples.npz \
        --names 10000,20000 --out docs/data/convergence/base_quality.json

Every FID here is a classifier-feature FID of upsampled 8×8 images, not an Inception FID and not comparable
with the 32×32 cascade numbers; only differences between rows mean something.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cascaded_diffusion.augment import upsample
from cascaded_diffusion.data import load_images
from cascaded_diffusion.evaluation import (
    FeatureStats,
    extract,
    fid_from_stats,
    get_feature_extractor,
    kid,
)
from cascaded_diffusion.evaluation.evaluate import load_samples
from cascaded_diffusion.images import images_to_tensor, tensor_to_images
from cascaded_diffusion.data.mirror import ONE_WAY_THRESHOLD, MirrorPatterns, one_way_fractions


def to_feature_size(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N×h×w×C → uint8 N×size×size×C through the SR stages' bilinear upsampling."""
    return np.concatenate([tensor_to_images(upsample(images_to_tensor(images[lo : lo + 1000]), size, "bilinear"))
                           for lo in range(0, len(images), 1000)])


def balanced(images: np.ndarray, labels: np.ndarray | None, num: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` images and their labels, every class equally often: sample files are written class by class, so
    their first ``num`` rows would hold only the first classes."""
    if labels is None:
        raise SystemExit("sample files need labels (arr_1): the mirror check is per class")
    images, labels = np.asarray(images), np.asarray(labels)
    if num >= len(images):
        return images, labels
    classes = np.unique(labels)
    if num % len(classes):
        raise SystemExit(f"--num {num} is not a multiple of the {len(classes)} classes")
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[: num // len(classes)] for c in classes]))
    if len(keep) < num:
        raise SystemExit(f"too few samples of some class for a class-balanced --num {num}")
    return images[keep], labels[keep]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="+", help="sample .npz files of the base (uint8 N×h×w×C)")
    p.add_argument("--names", default="", help="comma-separated row names (default: the file names)")
    p.add_argument("--data", default="fashion-mnist",
                   help="the base's training data spec (its :test split is the floor)")
    p.add_argument("--features", default="classifier")
    p.add_argument("--size", type=int, default=32, help="the feature network's input side")
    p.add_argument("--num", type=int, default=10000, help="samples scored per file")
    p.add_argument("--turn-round", action="store_true",
                   help="also score every file with its one-way classes' samples that face the wrong way mirrored "
                        "back: what the mirrored ones cost (a diagnosis, not a way to sample)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = args.names.split(",") if args.names else [Path(s).stem for s in args.samples]
    if len(names) != len(args.samples):
        p.error(f"--names has {len(names)} entries for {len(args.samples)} sample files")

    samples = [load_samples(s) for s in args.samples]
    res, channels = samples[0][0].shape[1], samples[0][0].shape[-1]
    extractor = get_feature_extractor(args.features)

    def features(images: np.ndarray) -> np.ndarray:
        return extract(to_feature_size(images, args.size), extractor, batch_size=250)[0]

    t = time.time()
    train_split = load_images(args.data, res, channels=channels)
    train, train_labels = np.asarray(train_split.images), np.asarray(train_split.labels)
    ref_features = features(train)
    ref = FeatureStats.from_features(ref_features, network=extractor.name, source=f"{args.data} @ {res}px")
    # the classes whose real images face one way, and the way they face (fitted on the training images)
    real_one_way = {c: f for c, f in one_way_fractions(train, train_labels).items() if f >= ONE_WAY_THRESHOLD}
    patterns = MirrorPatterns.fit(train, train_labels)
    rows = []
    test_split = load_images(f"{args.data}:test", res, channels=channels)
    sets = [("real test split (floor)", balanced(test_split.images, test_split.labels, args.num))]
    sets += [(n, balanced(*s, args.num)) for n, s in zip(names, samples)]
    for name, (images, labels) in sets:
        if images.shape[1:] != (res, res, channels):
            raise SystemExit(f"{name}: images of shape {images.shape[1:]}, expected {(res, res, channels)}")
        f = features(images)
        stats = FeatureStats.from_features(f, network=extractor.name, source=name)
        k_mean, k_std = kid(f, ref_features, seed=0)
        facing = patterns.one_way(images, labels)
        rows.append({"name": name, "num": len(images), "fid": fid_from_stats(stats, ref), "kid": k_mean,
                     "kid_std": k_std, "facing_the_data_way": {str(c): facing[c] for c in real_one_way if c in facing}})
        if args.turn_round:
            wrong = np.flatnonzero(np.isin(labels, list(real_one_way)) & ~patterns.faces_its_way(images, labels))
            turned = images.copy()
            turned[wrong] = turned[wrong][:, :, ::-1]
            rows[-1]["fid_turned_round"] = fid_from_stats(
                FeatureStats.from_features(features(turned), network=extractor.name), ref)
            rows[-1]["turned_round"] = len(wrong)
        way = " ".join(f"{c}:{100 * facing[c]:.0f}%" for c in real_one_way if c in facing)
        turned = (f"  turned round ({rows[-1]['turned_round']}): FID {rows[-1]['fid_turned_round']:.3f}"
                  if args.turn_round else "")
        print(f"{name:>28}  N={len(images)}  FID {rows[-1]['fid']:.3f}  KID {k_mean:.4f} ± {k_std:.4f}  "
              f"facing the data's way (one-way classes) {way}{turned}", flush=True)
    result = {
        "what": f"base samples at {res}px, bilinear to {args.size}px, vs the {args.data} training images resized alike",
        "feature_network": extractor.name,
        "reference": ref.source,
        "one_way_classes": {str(c): f for c, f in real_one_way.items()},
        "rows": rows,
        "seconds": round(time.time() - t, 1),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
