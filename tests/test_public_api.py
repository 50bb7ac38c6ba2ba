"""The public API: ``from cascaded_diffusion import Cascade``, and ``Cascade.generate`` returning the very bytes that
``cdm sample`` writes for the same settings, at any batch size."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cascaded_diffusion
from cascaded_diffusion import Cascade
from cascaded_diffusion.cli import main


def test_the_public_names_resolve_and_the_package_imports_lazily():
    for name in cascaded_diffusion.__all__:
        assert getattr(cascaded_diffusion, name) is not None, name
    # importing the package alone loads none of the heavy modules (torch is imported by the first name used)
    code = "import sys, cascaded_diffusion; print('torch' in sys.modules, 'cascaded_diffusion.cascade' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.fixture(scope="module")
def fashion_mnist():
    return Cascade.load(pretrained="fashion-mnist")


def test_generate_is_the_bytes_of_cdm_sample_at_any_batch_size(fashion_mnist, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--pretrained", "fashion-mnist", "--num", "8", "--seed", "5", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    with np.load(out) as f:
        written_images, written_labels = f["arr_0"], f["arr_1"]
    for batch_size in (64, 5):
        images, labels = fashion_mnist.generate(num=8, seed=5, batch_size=batch_size)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert images.shape == (8, 32, 32, 1)
        assert np.array_equal(labels, written_labels)
        assert np.array_equal(images, written_images), f"batch_size={batch_size}"


def test_generate_takes_labels_or_classes_and_refuses_what_does_not_fit(fashion_mnist):
    labels = fashion_mnist.labels_for(6, class_labels=[3, 7])
    assert labels.tolist() == [3, 3, 3, 7, 7, 7]
    assert fashion_mnist.labels_for(labels=[9, 0]).tolist() == [9, 0]
    with pytest.raises(ValueError, match="classes 0..9"):
        fashion_mnist.generate(labels=[10])
    with pytest.raises(ValueError, match="num is 3, but 2 labels"):
        fashion_mnist.generate(num=3, labels=[1, 2])
    with pytest.raises(ValueError, match="class_labels 12 is outside"):  # the library names its own parameter
        fashion_mnist.labels_for(2, class_labels=[12])
