"""Classification Accuracy Score (Ravuri & Vinyals, 2019).

Train the fixed classifier recipe on generated images only (each labelled with the class it was
conditioned on), then measure top-1/top-5 accuracy on the real test split. Calling the same function
with real training images of the same count gives the real-data baseline the paper reports beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .classifier import (ClassifierConfig, ClassifierRecipe, check_images_uint8_nhwc, evaluate_classifier,
                         train_classifier)


def classification_accuracy_score(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    recipe: ClassifierRecipe | None = None,
    *,
    config: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train on ``train_images`` (generated, or real for the baseline), evaluate on the real test split.

    ``recipe`` (:class:`~.classifier.ClassifierRecipe`), ``config``, ``device`` and ``progress`` go to
    :func:`~.classifier.train_classifier`; keep them identical between the generated and the real-data runs.
    The test split is used only once, after training (never for model selection).

    Returns ``{"top1", "top5", "n_train", "n_test"}``.
    """
    train = check_images_uint8_nhwc(train_images, "train_images")
    test = check_images_uint8_nhwc(test_images, "test_images")
    if train.shape[-1] != test.shape[-1]:
        raise ValueError(
            f"train images have {train.shape[-1]} channels but test images have {test.shape[-1]}; "
            "CAS needs the generated and real images in the same format"
        )
    model, _ = train_classifier(train, train_labels, num_classes, recipe, config=config, device=device,
                                progress=progress)
    scores = evaluate_classifier(model, test, test_labels)
    return {"top1": scores["top1"], "top5": scores["top5"], "n_train": int(train.shape[0]), "n_test": int(test.shape[0])}
