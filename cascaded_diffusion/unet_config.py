"""The U-Net's hyper-parameters: :class:`ModelOptions` (a stage config's ``[model]`` section, loaded as is) and
:class:`UNetConfig` (everything :class:`~cascaded_diffusion.unet.UNet` is built from, validated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["LOW_RES_UPSAMPLE_MODES", "ModelOptions", "UNetConfig", "UNetConfigError"]

LOW_RES_UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest")

class UNetConfigError(ValueError):
    """A U-Net hyper-parameter out of range or inconsistent with the others; ``field`` names it (a
    :class:`UNetConfig` field), ``detail`` says what is wrong."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"UNetConfig.{detail}")
        self.field, self.detail = field, detail


_NOT_SHAPE = {"architecture": False}  # an option that leaves the network's shape (and so its weights) unchanged


@dataclass
class ModelOptions:
    """The ``[model]`` section of a stage config, loaded as is: the network's own options. The rest of its
    :class:`UNetConfig` follows from the stage (:meth:`UNetConfig.from_options`). Options marked
    ``architecture: False`` may change between a run and its resume; every other one fixes the weights' shapes."""

    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    # ADM's middle block attends over the whole bottom feature map; false drops it, for an SR stage trained on
    # crops and sampled whole, where that attention would see 16x more tokens at sampling than in training
    middle_attention: bool = True
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = field(default=0.0, metadata=_NOT_SHAPE)
    label_dropout: float = field(default=0.0, metadata=_NOT_SHAPE)  # > 0 trains the null class (guidance)
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    norm_groups: int = 32
    gradient_checkpointing: bool = field(default=False, metadata=_NOT_SHAPE)

    def architecture(self) -> dict[str, Any]:
        """The options that fix the network's shape."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("architecture", True)}


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet`. Validated on construction (``ValueError`` naming the bad field).

    ``attention_resolutions`` are feature-map sizes (e.g. ``(16, 8)``), not downsampling factors.
    ``num_head_channels > 0`` fixes the channels per head and overrides ``num_heads``.
    ``num_classes=None`` builds an unconditional network; otherwise the class table has ``num_classes + 1``
    rows, the last one being the null class. ``low_res_channels > 0`` makes a super-resolution network that
    takes an extra low-resolution image. ``gradient_checkpointing`` trades compute for activation memory
    during training.
    """

    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    middle_attention: bool = True
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    learn_sigma: bool = False
    use_aug_level: bool = False
    low_res_channels: int = 0
    low_res_upsample: str = "bilinear"
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    norm_groups: int = 32
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Accept lists (JSON/TOML) for the tuple fields so that configs round-trip.
        self.channel_mult = _as_int_tuple("channel_mult", self.channel_mult)
        self.attention_resolutions = _as_int_tuple("attention_resolutions", self.attention_resolutions)
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """Number of resolutions in the U (one per entry of ``channel_mult``)."""
        return len(self.channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map resolution at each level, from the input resolution down."""
        return tuple(self.resolution // 2**level for level in range(self.num_levels))

    @property
    def emb_channels(self) -> int:
        """Width of the timestep/class/augmentation embedding (4 × model_channels, as ADM)."""
        return 4 * self.model_channels

    @property
    def output_channels(self) -> int:
        """Channels of the raw network output: ``2 * out_channels`` with learned variances."""
        return 2 * self.out_channels if self.learn_sigma else self.out_channels

    def head_layout(self, channels: int) -> tuple[int, int]:
        """``(num_heads, head_dim)`` of an attention block over ``channels`` channels."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise UNetConfigError("num_head_channels", f"num_head_channels={self.num_head_channels} must divide the "
                                      f"attention block width {channels}")
            return channels // self.num_head_channels, self.num_head_channels
        if channels % self.num_heads:
            raise UNetConfigError("num_heads", f"num_heads={self.num_heads} must divide the attention block width "
                                  f"{channels}")
        return self.num_heads, channels // self.num_heads

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`UNetConfigError` (a ``ValueError``) if any field is out of range or the fields are
        inconsistent: the one check of a ``[model]`` section (a stage config runs it through
        :meth:`from_options`)."""
        for name in ("resolution", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                     "num_heads", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UNetConfigError(name, f"{name} must be a positive integer, got {value!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise UNetConfigError("channel_mult", f"channel_mult must be a non-empty tuple of positive ints, got "
                                  f"{self.channel_mult!r}")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise UNetConfigError("num_head_channels", f"num_head_channels must be -1 (use num_heads) or positive, "
                                  f"got {self.num_head_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise UNetConfigError("dropout", f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise UNetConfigError("num_classes", f"num_classes must be None (unconditional) or >= 1, got "
                                  f"{self.num_classes!r}")
        if self.low_res_channels < 0:
            raise UNetConfigError("low_res_channels", f"low_res_channels must be >= 0 (0 = base model), got "
                                  f"{self.low_res_channels}")
        if self.low_res_upsample not in LOW_RES_UPSAMPLE_MODES:
            raise UNetConfigError("low_res_upsample", f"low_res_upsample must be one of {LOW_RES_UPSAMPLE_MODES}, "
                                  f"got {self.low_res_upsample!r}")

        downsample_factor = 2 ** (self.num_levels - 1)
        if self.resolution % downsample_factor:
            raise UNetConfigError("resolution", f"resolution={self.resolution} must be divisible by "
                                  f"2**(len(channel_mult)-1)={downsample_factor} so that every level halves the "
                                  "feature map exactly")
        unreachable = sorted(set(self.attention_resolutions) - set(self.level_resolutions))
        if unreachable:
            raise UNetConfigError("attention_resolutions", f"attention_resolutions {unreachable} are not feature-map "
                                  f"resolutions of this network; available: {self.level_resolutions}")
        widths = {self.model_channels} | {self.model_channels * m for m in self.channel_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise UNetConfigError("norm_groups", f"norm_groups={self.norm_groups} must divide every block width, but "
                                  f"does not divide {bad} (model_channels={self.model_channels}, channel_mult="
                                  f"{self.channel_mult})")
        for level, mult in enumerate(self.channel_mult):
            if self.level_resolutions[level] in self.attention_resolutions:
                self.head_layout(self.model_channels * mult)

    @classmethod
    def from_options(
        cls,
        options: ModelOptions,
        *,
        resolution: int,
        channels: int,
        num_classes: int | None,
        learn_sigma: bool,
        use_aug_level: bool = False,
        low_res_channels: int = 0,
        low_res_upsample: str = "bilinear",
    ) -> "UNetConfig":
        """The network of a stage: its ``[model]`` options plus what the stage fixes (image size and channels,
        classes, learned variances, and for an SR stage the low-res input and its augmentation level)."""
        return cls(
            resolution=resolution, in_channels=channels, out_channels=channels, model_channels=options.channels,
            channel_mult=tuple(options.channel_mult), num_res_blocks=options.num_res_blocks,
            attention_resolutions=tuple(options.attention_resolutions), middle_attention=options.middle_attention,
            num_heads=options.num_heads,
            num_head_channels=options.num_head_channels, dropout=options.dropout, num_classes=num_classes,
            learn_sigma=learn_sigma, use_aug_level=use_aug_level, low_res_channels=low_res_channels,
            low_res_upsample=low_res_upsample, resblock_updown=options.resblock_updown,
            use_scale_shift_norm=options.use_scale_shift_norm, norm_groups=options.norm_groups,
            gradient_checkpointing=options.gradient_checkpointing,
        )

    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists); ``middle_attention`` only when false, so the files of
        networks made before the option existed keep their bytes."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
            if not (key == "middle_attention" and value)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**dict(data))


def _as_int_tuple(name: str, value: Iterable[int] | int) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"UNetConfig.{name} must be a sequence of ints, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"UNetConfig.{name} must contain only ints, got {items!r}")
    return items
