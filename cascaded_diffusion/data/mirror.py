"""Is a data set mirror-symmetric? The check behind ``data.flip``.

Random horizontal flips double a data set only if its mirror images are images it could contain. ImageNet's
mostly are; Fashion-MNIST's are not: every ankle boot and sneaker points the same way. A model trained with
flips there generates half its boots mirrored — images the data never holds — and every metric against the
real data pays for them (on Fashion-MNIST this was 4.6 of the cascade's 5.6 FID: docs/results.md).

The test: a class's mean image, minus its own mirror image, is the left/right pattern the class has on
average. An image "faces the class's way" when its projection on that pattern is positive. In a
mirror-symmetric class about half the images do; in Fashion-MNIST's boots all of them do. The pattern is fitted
on one half of each class and applied to the other, so a symmetric class scores ≈ 0.5 and not the
over-fitted > 0.5 of scoring the images that made the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MirrorPatterns", "one_way_fractions", "flip_warning"]

# a class counts as facing one way when at least this fraction of its held-out half faces its pattern's way
ONE_WAY_THRESHOLD = 0.9
_SIDE = 16  # images are compared at most this big: the left/right pattern is coarse, and it keeps the check cheap


def _small_gray(images: np.ndarray, rows: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """uint8 N×H×W×C (the given ``rows`` of it) → float n×h×w, grayscale, box-downsampled to at most ``_SIDE``
    pixels a side; read in chunks, so a memory-mapped 256-pixel data set is never held whole or as floats."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out = []
    for lo in range(0, len(rows), chunk):
        x = np.asarray(images[rows[lo : lo + chunk]], dtype=np.float32).mean(axis=-1)
        n, h, w = x.shape
        fh, fw = max(1, h // _SIDE), max(1, w // _SIDE)
        if fh > 1 or fw > 1:
            x = x[:, : h - h % fh, : w - w % fw].reshape(n, h // fh, fh, w // fw, fw).mean(axis=(2, 4))
        out.append(x - x.mean(axis=(1, 2), keepdims=True))
    if not out:
        return np.zeros((0, 1, 1), np.float32)
    return np.concatenate(out)


@dataclass
class MirrorPatterns:
    """Each class's left/right pattern (its mean image minus the mirrored mean), fitted on real images."""

    patterns: dict[int, np.ndarray]

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> "MirrorPatterns":
        """``rows``: fit on these rows of ``images``/``labels`` only (default all)."""
        labels = np.asarray(labels) if rows is None else np.asarray(labels)[rows]
        x = _small_gray(images, rows)
        patterns = {}
        for c in np.unique(labels):
            mean = x[labels == c].mean(axis=0)
            patterns[int(c)] = mean - mean[:, ::-1]
        return cls(patterns)

    def faces_its_way(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Per image (of ``rows``), whether it faces its class's way (classes without a pattern: False)."""
        labels = np.asarray(labels) if rows is None else np.asarray(labels)[rows]
        x = _small_gray(images, rows)
        facing = np.zeros(len(labels), bool)
        for c, pattern in self.patterns.items():
            mine = labels == c
            facing[mine] = (x[mine] * pattern).sum(axis=(1, 2)) > 0
        return facing

    def one_way(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> dict[int, float]:
        """Per class, the fraction of ``images`` (of its ``rows``) that face the way of the class's pattern."""
        facing = self.faces_its_way(images, labels, rows)
        labels = np.asarray(labels) if rows is None else np.asarray(labels)[rows]
        return {c: float(facing[labels == c].mean()) for c in self.patterns if (labels == c).any()}


def one_way_fractions(images: np.ndarray, labels: np.ndarray, *, max_images: int = 5000,
                      seed: int = 0) -> dict[int, float]:
    """Per class, the fraction of its images facing the class's average left/right way (≈ 0.5 for a
    mirror-symmetric class, → 1 for one whose mirror images never occur). Patterns are fitted on one half of
    a class and scored on the other.

    At most ``max_images`` images are read (a fraction needs no more, and a large memory-mapped data set is
    only read there): at least 100 per class, so with many classes a random subset of them is checked
    (50 of ImageNet's 1000). Classes with fewer than 100 images are left out (on
    50 held-out images a symmetric class reaches 0.9 with odds of 1e-9; on 10, of 1 %)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(100, min(1000, max_images // max(1, len(classes))))
    if len(classes) * per_class > max_images:
        classes = np.sort(rng.choice(classes, size=max(1, max_images // per_class), replace=False))
    fit_rows, test_rows = [], []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if len(rows) < 100:
            continue
        rows = rng.permutation(rows)[:per_class]
        half = len(rows) // 2
        fit_rows.append(rows[:half])
        test_rows.append(rows[half:])
    if not fit_rows:
        return {}
    fit_rows, test_rows = np.sort(np.concatenate(fit_rows)), np.sort(np.concatenate(test_rows))
    return MirrorPatterns.fit(images, labels, fit_rows).one_way(images, labels, test_rows)


def flip_warning(images: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
                 threshold: float = ONE_WAY_THRESHOLD) -> str | None:
    """The warning for ``data.flip = true`` on data whose classes face one way, or ``None`` if none does."""
    fractions = one_way_fractions(images, labels)
    one_way = sorted((f, c) for c, f in fractions.items() if f >= threshold)
    if not one_way:
        return None

    def name(c: int) -> str:
        return f"{c} ({class_names[c]})" if class_names and c < len(class_names) else str(c)

    checked = f"{len(fractions)} classes" + (" checked" if len(fractions) < len(np.unique(labels)) else "")
    listed = ", ".join(f"class {name(c)} {100 * f:.0f} %" for f, c in reversed(one_way[-5:]))
    more = f" and {len(one_way) - 5} more" if len(one_way) > 5 else ""
    return (
        f"data.flip = true mirrors half of every batch, but {len(one_way)} of {checked} face one "
        f"way ({listed}{more} of their images): their mirror images never occur in the data, and the model "
        "will learn to generate them. Set data.flip = false unless that is intended (on Fashion-MNIST it cost "
        "the cascade 4.6 FID; docs/results.md)."
    )
