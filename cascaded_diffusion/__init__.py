"""Cascaded Diffusion Models: a class-conditional base diffusion model followed by
super-resolution diffusion models trained with conditioning augmentation."""

__version__ = "0.1.0"
