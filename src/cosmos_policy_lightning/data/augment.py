"""Image augmentation of docs/method.md §4, one random parameter set per training sample.

Training (:func:`augment`): a random crop of 90% of the image area resized back to the full size,
a rotation by U(-5, 5) degrees, then colour jitter -- brightness U(0.7, 1.3), contrast U(0.6, 1.4),
saturation U(0.5, 1.5), hue U(-0.05, 0.05) of a full turn -- applied in a random order drawn per
sample (as torchvision's ``ColorJitter`` does). Test time (:func:`test_transform`): the centre crop
of 90% area resized back, nothing else, so train and test images show objects at the same scale.

One :class:`AugmentParams` is drawn per sample and applied to every image of that sample -- all
cameras at step t and at step t' -- so the current and future frames stay geometrically and
photometrically consistent (the world model must predict the future in the same "view").

The maths is kornia's (no torchvision, which must never be installed: see docs/method.md §6): crop, resize and
rotation are composed into one affine warp (a single bilinear resampling, black outside the image,
like torchvision's rotation fill), and the colour steps are kornia's torchvision-equivalent
functions (brightness multiplies, contrast blends with the grey mean, saturation blends with the
grey image, hue rotates in HSV). Images are uint8 ``(M, H, W, 3)`` in and out; floats only inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.geometry.transform import warp_affine

from ..errors import CosmosPolicyError


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation (defaults: docs/method.md §4).

    Attributes:
        crop_area: fraction of the image area kept by the crop, in (0, 1]; the crop keeps the image's
            aspect ratio, so each side is scaled by ``sqrt(crop_area)``.
        max_rotation: rotation angle ~ U(-max_rotation, max_rotation), degrees.
        brightness, contrast, saturation: (low, high) of the uniform multiplicative factors.
        hue: (low, high) of the uniform hue shift, in fractions of a full turn.
    """

    crop_area: float = 0.9
    max_rotation: float = 5.0
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.6, 1.4)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.05, 0.05)

    def __post_init__(self):
        if not 0.0 < self.crop_area <= 1.0:
            raise CosmosPolicyError(f"augmentation: crop_area must be in (0, 1], got {self.crop_area}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise CosmosPolicyError(f"augmentation: {name} range ({lo}, {hi}) has low > high")


#: The augmentation of docs/method.md §4.
REFERENCE_AUGMENT = AugmentConfig()

#: Colour steps, indexed by :attr:`AugmentParams.order`.
COLOR_STEPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation parameters, shared by all its images.

    Attributes:
        crop_top, crop_left: top-left corner of the crop window, pixels (continuous; pixel edges at
            integers, so the full image is the window ``(0, 0, H, W)``).
        crop_height, crop_width: size of the crop window, pixels (continuous).
        angle: rotation of the resized crop about the image centre, degrees, counter-clockwise.
        brightness, contrast, saturation: multiplicative factors (1 = unchanged).
        hue: hue shift in fractions of a full turn (0 = unchanged).
        order: application order of the colour steps, a permutation of ``(0, 1, 2, 3)`` indexing
            :data:`COLOR_STEPS`.
    """

    crop_top: float
    crop_left: float
    crop_height: float
    crop_width: float
    angle: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def has_color(self) -> bool:
        """False when every colour factor is neutral (the colour steps are skipped)."""
        return not (self.brightness == 1.0 and self.contrast == 1.0 and self.saturation == 1.0 and self.hue == 0.0)


def sample_params(rng: np.random.Generator, image_size: tuple[int, int],
                  config: AugmentConfig = REFERENCE_AUGMENT) -> AugmentParams:
    """Draw one sample's parameters (docs/method.md §4).

    Args:
        rng: numpy generator (one per data-loader worker, so workers draw independent streams).
        image_size: ``(H, W)`` in pixels.
        config: ranges; default :data:`REFERENCE_AUGMENT`.

    Returns:
        the parameters; the crop window lies inside the image, uniformly placed.
    """
    h, w = image_size
    side = math.sqrt(config.crop_area)
    ch, cw = h * side, w * side
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    return AugmentParams(
        crop_top=u(0.0, h - ch), crop_left=u(0.0, w - cw), crop_height=ch, crop_width=cw,
        angle=u(-config.max_rotation, config.max_rotation),
        brightness=u(*config.brightness), contrast=u(*config.contrast),
        saturation=u(*config.saturation), hue=u(*config.hue),
        order=tuple(int(i) for i in rng.permutation(len(COLOR_STEPS))),
    )


def center_crop_params(image_size: tuple[int, int], crop_area: float = REFERENCE_AUGMENT.crop_area) -> AugmentParams:
    """The test-time transform's parameters: centred crop of ``crop_area`` of the area, no rotation,
    no colour change (docs/method.md §4)."""
    h, w = image_size
    side = math.sqrt(crop_area)
    ch, cw = h * side, w * side
    return AugmentParams(crop_top=(h - ch) / 2, crop_left=(w - cw) / 2, crop_height=ch, crop_width=cw)


def warp_matrix(params: AugmentParams, image_size: tuple[int, int]) -> torch.Tensor:
    """The affine map from source pixel centres to output pixel centres: crop-and-resize, then
    rotation about the image centre.

    Returns:
        float32 ``(1, 2, 3)`` matrix in kornia's ``warp_affine`` convention (pixel ``i`` at coordinate
        ``i``, source -> destination).
    """
    h, w = image_size
    sx, sy = w / params.crop_width, h / params.crop_height
    # Pixel centre x maps to edge coordinate x + 0.5; the crop window [left, left + cw) is stretched
    # onto [0, W), then we return to centre coordinates.
    crop = np.array([[sx, 0.0, (0.5 - params.crop_left) * sx - 0.5],
                     [0.0, sy, (0.5 - params.crop_top) * sy - 0.5],
                     [0.0, 0.0, 1.0]])
    # Rotation about the centre, counter-clockwise on screen (y points down): OpenCV's / kornia's
    # get_rotation_matrix2d, written out because building it through kornia costs more than the warp.
    a = math.radians(params.angle)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot = np.array([[cos, sin, (1 - cos) * cx - sin * cy],
                    [-sin, cos, sin * cx + (1 - cos) * cy],
                    [0.0, 0.0, 1.0]])
    return torch.from_numpy((rot @ crop)[:2]).float().unsqueeze(0)


def apply_float(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` to float images.

    Args:
        images: ``(M, 3, H, W)`` float in [0, 1] -- every image of one sample.
        params: from :func:`sample_params` or :func:`center_crop_params`.

    Returns:
        ``(M, 3, H, W)`` float in [0, 1]; pixels the rotation brings in from outside the image are black.
    """
    m, _, h, w = images.shape
    matrix = warp_matrix(params, (h, w)).expand(m, 2, 3)
    out = warp_affine(images, matrix, (h, w), mode="bilinear", padding_mode="zeros", align_corners=True)
    if params.has_color:
        out = out.clamp(0.0, 1.0)
        for step in params.order:
            name = COLOR_STEPS[step]
            if name == "brightness" and params.brightness != 1.0:
                out = adjust_brightness_accumulative(out, float(params.brightness))
            elif name == "contrast" and params.contrast != 1.0:
                out = adjust_contrast_with_mean_subtraction(out, float(params.contrast))
            elif name == "saturation" and params.saturation != 1.0:
                out = adjust_saturation_with_gray_subtraction(out, float(params.saturation))
            elif name == "hue" and params.hue != 0.0:
                # kornia takes radians in [-pi, pi]; method §4 gives the hue range in turns.
                out = adjust_hue(out, float(params.hue) * 2.0 * math.pi)
    return out.clamp(0.0, 1.0)


def apply_uint8(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` to uint8 images ``(M, H, W, 3)``; returns uint8 ``(M, H, W, 3)``.

    Raises:
        CosmosPolicyError: images not uint8 ``(M, H, W, 3)``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CosmosPolicyError(f"augmentation: expected uint8 images (M, H, W, 3), got {images.dtype} "
                                f"{tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    y = apply_float(x, params)
    return y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def augment(images: torch.Tensor, rng: np.random.Generator, config: AugmentConfig = REFERENCE_AUGMENT) -> torch.Tensor:
    """Training augmentation of one sample: draw one :class:`AugmentParams` and apply it to every image.

    Args:
        images: uint8 ``(M, H, W, 3)``, all cameras at both time steps of one sample.
        rng: the worker's numpy generator.

    Returns:
        uint8 ``(M, H, W, 3)``.
    """
    return apply_uint8(images, sample_params(rng, tuple(images.shape[1:3]), config))


def test_transform(images: torch.Tensor, crop_area: float = REFERENCE_AUGMENT.crop_area) -> torch.Tensor:
    """Deterministic test-time transform (docs/method.md §4): centre crop of ``crop_area`` of the area, resized
    back to ``(H, W)``. uint8 ``(M, H, W, 3)`` in and out. Use it at inference on every camera image
    of a model trained with augmentation."""
    return apply_uint8(images, center_crop_params(tuple(images.shape[1:3]), crop_area))


# pytest would collect a module-level function called test_*; this one is library code.
test_transform.__test__ = False  # type: ignore[attr-defined]
