"""Evaluation: feature networks, FID / KID / precision-recall / IS, and the Classification Accuracy Score.

FIDs computed with our Fashion-MNIST classifier (``"classifier"`` feature network) are *not* Inception
FIDs and must always be reported with the feature network's label next to them.
"""

from .cas import classification_accuracy_score
from .classifier import (
    DEFAULT_CLASSIFIER_PATH,
    ClassifierConfig,
    ResNetClassifier,
    ClassifierRecipe,
    TrainingHistory,
    classifier_outputs,
    evaluate_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from .features import (
    ClassifierFeatureExtractor,
    FeatureExtractor,
    InceptionFeatureExtractor,
    compute_stats,
    extract,
    get_feature_extractor,
)
from .inception import FIDInceptionV3, load_inception, resize_bilinear_tf1
from .inception_weights import INCEPTION_WEIGHTS_ENV
from .metrics import (
    PrecisionRecall,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from .stats import FeatureStats, check_compatible

__all__ = [
    "DEFAULT_CLASSIFIER_PATH",
    "INCEPTION_WEIGHTS_ENV",
    "ClassifierConfig",
    "ClassifierFeatureExtractor",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "PrecisionRecall",
    "ResNetClassifier",
    "ClassifierRecipe",
    "TrainingHistory",
    "check_compatible",
    "classification_accuracy_score",
    "classifier_outputs",
    "compute_stats",
    "evaluate_classifier",
    "extract",
    "fid_from_stats",
    "frechet_distance",
    "get_feature_extractor",
    "inception_score",
    "kid",
    "load_classifier",
    "load_inception",
    "precision_recall",
    "resize_bilinear_tf1",
    "save_classifier",
    "train_classifier",
]
