"""method §4 augmentation: one parameter set per sample, the documented ranges, a deterministic test transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cosmos_policy_lightning.data.augment import (
    REFERENCE_AUGMENT,
    AugmentConfig,
    AugmentParams,
    apply_float,
    apply_uint8,
    augment,
    center_crop_params,
    sample_params,
    test_transform,
)
from cosmos_policy_lightning.errors import CosmosPolicyError


def _textured(h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([3 * xx + 20, 4 * yy + 10, 128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)], -1)
    img = img + rng.normal(0, 4, img.shape)
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))


def test_params_within_spec_ranges():
    rng = np.random.default_rng(0)
    h, w = 48, 64
    draws = [sample_params(rng, (h, w)) for _ in range(2000)]
    side = math.sqrt(0.9)
    for p in draws:
        assert p.crop_height == pytest.approx(h * side) and p.crop_width == pytest.approx(w * side)
        assert p.crop_height * p.crop_width == pytest.approx(0.9 * h * w)
        assert 0 <= p.crop_top <= h - p.crop_height and 0 <= p.crop_left <= w - p.crop_width
        assert -5 <= p.angle <= 5 and 0.7 <= p.brightness <= 1.3 and 0.6 <= p.contrast <= 1.4
        assert 0.5 <= p.saturation <= 1.5 and -0.05 <= p.hue <= 0.05
        assert sorted(p.order) == [0, 1, 2, 3]
    # The draws cover their ranges (uniform), not a constant or a narrow band.
    angles = np.array([p.angle for p in draws])
    bright = np.array([p.brightness for p in draws])
    assert angles.min() < -4.9 and angles.max() > 4.9 and abs(angles.mean()) < 0.3
    assert bright.min() < 0.71 and bright.max() > 1.29
    assert len({p.order for p in draws}) == 24


def test_one_parameter_set_shared_by_every_image_of_a_sample():
    img = _textured()
    # Four copies = 2 cameras x 2 time steps of one sample with identical pixels.
    batch = img.unsqueeze(0).repeat(4, 1, 1, 1)
    out = augment(batch, np.random.default_rng(3))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    for i in range(1, 4):
        assert torch.equal(out[i], out[0])
    assert not torch.equal(out[0], img)  # it did change the image
    # Two draws differ.
    out2 = augment(batch, np.random.default_rng(4))
    assert (out2[0].float() - out[0].float()).abs().mean() > 1.0


def test_test_transform_is_deterministic_centre_crop():
    img = _textured()
    a, b = test_transform(img[None]), test_transform(img[None])
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (1, 48, 64, 3)
    # On a linear ramp, bilinear resampling is exact: output x maps to input centre-crop coordinates.
    h, w = 48, 64
    ramp = torch.arange(w, dtype=torch.float32).expand(1, 3, h, w).clone() / w
    p = center_crop_params((h, w))
    assert p.crop_left == pytest.approx((w - w * math.sqrt(0.9)) / 2)
    out = apply_float(ramp, p)[0, 0, h // 2] * w
    x = torch.arange(w, dtype=torch.float64)
    expected = (x + 0.5) * p.crop_width / w + p.crop_left - 0.5
    assert torch.allclose(out.double(), expected, atol=1e-4)
    # The crop zooms in: the first output column shows input column ~1.6, the last ~61.4.
    assert 1.0 < expected[0] < 2.0 and 61.0 < expected[-1] < 62.0


def test_colour_factors_follow_torchvision_formulas():
    grey = torch.full((1, 8, 8, 3), 100, dtype=torch.uint8)
    full = (0.0, 0.0, 8.0, 8.0)
    # Brightness multiplies.
    p = AugmentParams(*full, brightness=1.3)
    assert int(apply_uint8(grey, p)[0, 0, 0, 0]) == 130
    # Contrast and saturation leave a uniform grey image unchanged (blend with its own mean / grey).
    for kw in ({"contrast": 0.6}, {"saturation": 1.5}, {"hue": 0.05}):
        assert torch.equal(apply_uint8(grey, AugmentParams(*full, **kw)), grey)
    # Contrast 0.6 pulls a two-level image towards its grey mean by 40%.
    two = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    two[:, :, :4] = 200
    two[:, :, 4:] = 100
    out = apply_uint8(two, AugmentParams(*full, contrast=0.6)).float()
    assert out[0, 0, 0, 0] == pytest.approx(150 + 0.6 * 50, abs=1)
    assert out[0, 0, 7, 0] == pytest.approx(150 - 0.6 * 50, abs=1)
    # Saturation 0 gives grey; a hue shift of 1/3 turn maps pure red to pure green.
    red = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    red[..., 0] = 255
    g = apply_uint8(red, AugmentParams(0.0, 0.0, 4.0, 4.0, saturation=0.0))[0, 0, 0]
    assert int(g.max()) - int(g.min()) <= 1
    green = apply_uint8(red, AugmentParams(0.0, 0.0, 4.0, 4.0, hue=1 / 3))[0, 0, 0]
    assert green.tolist() == [0, 255, 0]


def test_rotation_brings_black_corners_and_keeps_centre():
    img = torch.full((1, 64, 64, 3), 200, dtype=torch.uint8)
    p = AugmentParams(0.0, 0.0, 64.0, 64.0, angle=5.0)
    out = apply_uint8(img, p)
    assert int(out[0, 0, 0, 0]) < 100 and int(out[0, 32, 32, 0]) == 200
    # Without rotation the full-frame "crop" is the identity.
    assert torch.equal(apply_uint8(img, AugmentParams(0.0, 0.0, 64.0, 64.0)), img)


def test_bad_input_and_config():
    with pytest.raises(CosmosPolicyError, match="uint8"):
        apply_uint8(torch.zeros(1, 8, 8, 3), center_crop_params((8, 8)))
    with pytest.raises(CosmosPolicyError, match="crop_area"):
        AugmentConfig(crop_area=1.5)
    assert REFERENCE_AUGMENT.crop_area == 0.9 and REFERENCE_AUGMENT.max_rotation == 5.0


def test_warp_matrix_matches_kornia_rotation_about_the_centre():
    from kornia.geometry.transform import get_rotation_matrix2d

    from cosmos_policy_lightning.data.augment import warp_matrix

    h, w = 60, 64
    p = AugmentParams(3.2, 1.7, 57.0, 60.0, angle=-4.2)
    sx, sy = w / p.crop_width, h / p.crop_height
    crop = torch.tensor([[sx, 0, (0.5 - p.crop_left) * sx - 0.5], [0, sy, (0.5 - p.crop_top) * sy - 0.5], [0, 0, 1.0]],
                        dtype=torch.float64)
    rot = get_rotation_matrix2d(torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=torch.float64),
                                torch.tensor([p.angle], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))[0]
    expected = (torch.cat([rot, torch.tensor([[0, 0, 1.0]], dtype=torch.float64)]) @ crop)[:2]
    assert torch.allclose(warp_matrix(p, (h, w))[0].double(), expected, atol=1e-5)
