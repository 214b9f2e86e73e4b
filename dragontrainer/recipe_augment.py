"""The recipe's `augment` section: one spec per augmentation (each with its probability `p`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dragontrainer.recipe_base import Section, _ordered_range


class FlipSpec(Section):
    """Horizontal flip."""

    p: float | Literal["auto"] = "auto"  # auto: 0.5, or 0 for data whose meaning flips (digits)

    @field_validator("p")
    @classmethod
    def _probability(cls, p: float | str) -> float | str:
        if p != "auto" and not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"must be 'auto' or a probability in [0, 1], got {p}")
        return p


class Op(Section):
    """An augmentation applied to each image with probability p (0: off)."""

    p: float = Field(0.0, ge=0, le=1)


class CropSpec(Op):
    """Padded random crop back to the original size (a random shift by up to `padding` pixels)."""

    p: float = Field(1.0, ge=0, le=1)
    padding: int | Literal["auto"] = "auto"  # auto: image size / 8 (4 px on 32×32, 1 px on 8×8)
    padding_mode: Literal["reflect", "zeros"] = "reflect"

    @field_validator("padding")
    @classmethod
    def _non_negative(cls, padding: int | str) -> int | str:
        if padding != "auto" and int(padding) < 0:
            raise ValueError(f"must be 'auto' or an integer >= 0, got {padding}")
        return padding


class ResizedCropSpec(Op):
    """Random resized crop: a box of `scale` of the area and `ratio` aspect, resized to the full size."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ranges(self) -> ResizedCropSpec:
        _ordered_range(*self.scale, "scale")
        _ordered_range(*self.ratio, "ratio")
        if not 0 < self.scale[0] <= 1 or self.scale[1] > 1 or self.ratio[0] <= 0:
            raise ValueError(f"scale must lie in (0, 1] and ratio be positive, got {self.scale}, {self.ratio}")
        return self


class RotateSpec(Op):
    """Rotation by an angle uniform in ±degrees."""

    degrees: float = Field(15.0, ge=0, le=180)


class TranslateSpec(Op):
    """Shift by up to ±fraction of the width and height."""

    fraction: float = Field(0.1, ge=0, le=1)


class AffineSpec(Op):
    """Random affine: rotation, translation, isotropic scale and shear together."""

    degrees: float = Field(10.0, ge=0, le=180)
    translate: float = Field(0.1, ge=0, le=1)
    scale: tuple[float, float] = (0.9, 1.1)
    shear_degrees: float = Field(5.0, ge=0, lt=90)

    @model_validator(mode="after")
    def _ranges(self) -> AffineSpec:
        _ordered_range(*self.scale, "scale")
        return self


class ColorJitterSpec(Op):
    """Brightness (±, additive), contrast, saturation (× factor in 1 ± x) and hue (± fraction of the circle)."""

    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)  # RGB only
    hue: float = Field(0.05, ge=0, le=0.5)  # RGB only


class HsvJitterSpec(Op):
    """The reference's HSV jitter: S and V → S^power·factor + offset; hue + offset (per image)."""

    power: tuple[float, float] = (0.25, 4.0)  # drawn log-uniformly, so 1 is the median
    factor: tuple[float, float] = (0.7, 1.4)
    offset: tuple[float, float] = (-0.1, 0.1)
    hue_offset: tuple[float, float] = (-0.1, 0.1)  # fraction of the hue circle

    @model_validator(mode="after")
    def _ranges(self) -> HsvJitterSpec:
        for name in ("power", "factor", "offset", "hue_offset"):
            _ordered_range(*getattr(self, name), name)
        if self.power[0] <= 0:
            raise ValueError(f"power must be positive, got {self.power}")
        return self


class FancyPcaSpec(Op):
    """AlexNet's fancy PCA: add Σ αᵢλᵢpᵢ to every pixel, α ~ N(0, std²) drawn per image, each use."""

    std: float = Field(0.1, ge=0)


class NoiseSpec(Op):
    """Additive Gaussian noise on the pixels (in [0, 1] units)."""

    std: float = Field(0.03, ge=0)


class CutoutSpec(Op):
    """Cutout (DeVries & Taylor 2017): a square of `size` pixels filled with the mean colour."""

    size: int | Literal["auto"] = "auto"  # auto: half the image side (16 px on 32×32)

    @field_validator("size")
    @classmethod
    def _positive(cls, size: int | str) -> int | str:
        if size != "auto" and int(size) < 1:
            raise ValueError(f"must be 'auto' or an integer >= 1, got {size}")
        return size


class ErasingSpec(Op):
    """Random erasing (Zhong et al. 2020): a box of `area` fraction and `ratio` aspect filled with noise."""

    area: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)

    @model_validator(mode="after")
    def _ranges(self) -> ErasingSpec:
        _ordered_range(*self.area, "area")
        _ordered_range(*self.ratio, "ratio")
        return self


class MixSpec(Op):
    """Mix pairs of images in a batch (applied to a whole batch with probability p); soft targets."""

    alpha: float = Field(0.2, gt=0)  # λ ~ Beta(alpha, alpha)


class AugmentSpec(Section):
    """Per-batch augmentation on the device, in pixel space ([0, 1]) before preprocessing, in this order."""

    hflip: FlipSpec = FlipSpec()
    vflip: Op = Op()
    crop: CropSpec = CropSpec()
    resized_crop: ResizedCropSpec = ResizedCropSpec()
    rotate: RotateSpec = RotateSpec()
    translate: TranslateSpec = TranslateSpec()
    affine: AffineSpec = AffineSpec()
    color_jitter: ColorJitterSpec = ColorJitterSpec()
    hsv_jitter: HsvJitterSpec = HsvJitterSpec()
    fancy_pca: FancyPcaSpec = FancyPcaSpec()
    noise: NoiseSpec = NoiseSpec()
    cutout: CutoutSpec = CutoutSpec()
    erasing: ErasingSpec = ErasingSpec()
    mixup: MixSpec = MixSpec()
    cutmix: MixSpec = MixSpec(alpha=1.0)
    tta_flip: bool = False  # evaluation averages the softmax of each image and its mirror image
    # rare classes (fewer than half the largest class's training images): this probability of an extra
    # random resized crop (resized_crop's scale and ratio) on top of the other augmentation
    rare_class_boost: float = Field(0.0, ge=0, le=1)
