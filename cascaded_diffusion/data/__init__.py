"""The data: a dataset spec (``fashion-mnist``, ``npz:PATH``, ``imagefolder:PATH``, ``prepared:DIR``) to uint8
images (:func:`load_images`, in :mod:`.source`), and what it is made of:

* :mod:`.readers`: :class:`ImageArray`, the Fashion-MNIST and ``.npz`` readers, the shared pixel operations;
* :mod:`.imagefolder`: image folders (listing, fingerprint, the one image decoder);
* :mod:`.prepared`, :mod:`.partial` and :mod:`.prepare`: a folder decoded once into memory-mapped arrays
  (``cdm prepare``): the format and its reader, the resumable chunked decoding, and the pipeline that writes it
  (the ``imagefolder:`` cache is one);
* :mod:`.loader`: the trainer's batches (deterministic, resumable order; read ahead in a thread);
* :mod:`.mirror`: whether a data set's classes face one way (``data.flip`` would teach both).
"""

from .readers import ImageArray
from .source import load_images

__all__ = ["ImageArray", "load_images"]
