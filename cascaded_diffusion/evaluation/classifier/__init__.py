"""The evaluation classifier: a small ResNet whose features stand in for Inception on Fashion-MNIST.

One job per module:

* :mod:`.model`: the network (:class:`ClassifierConfig`, :class:`ResNetClassifier`), the conversion of uint8
  NHWC images to its input, and :func:`classifier_outputs` (features and logits of an image array);
* :mod:`.recipe`: the fixed training recipe (:func:`train_classifier`: data order, augmentation, optimizer,
  schedule) and the eval loop (:func:`evaluate_classifier`), used for the shipped classifier and for CAS;
* :mod:`.files`: ``NAME.safetensors`` + ``NAME.json``, written and read with the stage-export machinery of
  ``checkpoint.py`` (:func:`save_classifier`, :func:`load_classifier`, :func:`feature_network_name`);
* :mod:`.legacy`: the one-time conversion of v1 files (config in the safetensors header).

The shipped Fashion-MNIST classifier is :data:`DEFAULT_CLASSIFIER_PATH`.
"""

from .files import (
    CLASSIFIER_FORMAT,
    CLASSIFIER_FORMAT_VERSION,
    DEFAULT_CLASSIFIER_PATH,
    classifier_paths,
    feature_network_name,
    load_classifier,
    read_classifier_description,
    save_classifier,
)
from .model import (
    ClassifierConfig,
    ResidualBlock,
    ResNetClassifier,
    check_images_uint8_nhwc,
    classifier_outputs,
    pixels_to_model_input,
    uint8_batch_to_pixels,
)
from .recipe import ClassifierRecipe, TrainingHistory, evaluate_classifier, random_crop_and_flip, train_classifier

__all__ = [
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_FORMAT_VERSION",
    "DEFAULT_CLASSIFIER_PATH",
    "ClassifierConfig",
    "ClassifierRecipe",
    "ResNetClassifier",
    "ResidualBlock",
    "TrainingHistory",
    "check_images_uint8_nhwc",
    "classifier_outputs",
    "classifier_paths",
    "evaluate_classifier",
    "feature_network_name",
    "load_classifier",
    "pixels_to_model_input",
    "random_crop_and_flip",
    "read_classifier_description",
    "save_classifier",
    "train_classifier",
    "uint8_batch_to_pixels",
]
