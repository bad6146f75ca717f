"""Injection / extraction of vectors into latent frames (docs/method.md §1)."""

import math

import pytest
import torch

from cosmos_policy_lightning.injection import extract, inject


def test_layout_is_row_major_time_major_tiled():
    chunk = torch.arange(6.0).reshape(3, 2)  # K=3, d=2 -> 0,1,2,3,4,5
    vol = inject(chunk, (2, 2, 2), vector_ndim=2)  # V = 8: 0..5 then 0,1
    assert vol.flatten().tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    # the trailing partial copy (0, 1) is ignored on extraction
    assert extract(vol, 6).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("k, d, shape", [(16, 4, (16, 8, 8)),      # 64 divides 1024 exactly
                                         (16, 7, (16, 28, 28)),     # LIBERO: 112 | 12544
                                         (50, 14, (16, 28, 28)),    # ALOHA: 700 into 12544 -> 17 copies + partial
                                         (32, 7, (16, 28, 28))])    # RoboCasa: 224 | 12544
def test_round_trip(k, d, shape):
    g = torch.Generator().manual_seed(0)
    chunk = torch.rand(k, d, generator=g) * 2 - 1
    vol = inject(chunk, shape, vector_ndim=2)
    assert vol.shape == shape
    back = extract(vol, k * d).reshape(k, d)
    torch.testing.assert_close(back, chunk)
    V, L = math.prod(shape), k * d
    if V % L:  # partial copy: noise on it does not change the result
        noisy = vol.clone().flatten()
        noisy[(V // L) * L:] += 100.0
        torch.testing.assert_close(extract(noisy.reshape(shape), L).reshape(k, d), chunk)


def test_extraction_averages_copies():
    vol = inject(torch.tensor([1.0, -1.0]), (1, 2, 2))  # [1, -1, 1, -1]
    noisy = vol + torch.tensor([0.2, 0.0, -0.2, 0.4]).reshape(1, 2, 2)
    torch.testing.assert_close(extract(noisy, 2), torch.tensor([1.0, -0.8]))


def test_scalar_value_fills_volume_and_comes_back_as_mean():
    values = torch.tensor([0.25, -1.0, 1.0])
    vol = inject(values, (16, 8, 8), vector_ndim=0)
    assert vol.shape == (3, 16, 8, 8)
    assert torch.all(vol[0] == 0.25) and torch.all(vol[1] == -1.0)
    vol2 = vol.clone()
    vol2[0, 0] += 1.0  # one channel shifted by 1 -> mean shifted by 1/16
    assert extract(vol2, 1).squeeze(-1).tolist() == pytest.approx([0.25 + 1 / 16, -1.0, 1.0])


def test_batched_leading_dims():
    g = torch.Generator().manual_seed(1)
    chunks = torch.randn(2, 3, 16, 4, generator=g)
    vol = inject(chunks, (16, 8, 8), vector_ndim=2)
    assert vol.shape == (2, 3, 16, 8, 8)
    torch.testing.assert_close(vol[1, 2], inject(chunks[1, 2], (16, 8, 8), vector_ndim=2))
    torch.testing.assert_close(extract(vol, 64).reshape(2, 3, 16, 4), chunks)


def test_too_long_vector_is_refused():
    with pytest.raises(ValueError, match="1025 values do not fit in a latent frame of shape \\(16, 8, 8\\)"):
        inject(torch.zeros(1025), (16, 8, 8))
    with pytest.raises(ValueError, match="do not fit"):
        extract(torch.zeros(16, 8, 8), 2000)
