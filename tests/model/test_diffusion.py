"""Noise levels, preconditioning, loss and sampler against hand-computed numbers (docs/method.md §3)."""

import math

import pytest
import torch

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.model.diffusion import (
    LOSS_SCALE,
    Denoiser,
    add_noise,
    diffusion_loss,
    karras_sigmas,
    latent_view,
    loss_weight,
    precondition,
    sample,
    sample_sigma,
)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ------------------------------------------------------------------------------------ sample_sigma


def test_sigma_scales_with_sqrt_of_latent_frames():
    a = sample_sigma(64, 1, generator=torch.Generator().manual_seed(3))
    b = sample_sigma(64, 9, generator=torch.Generator().manual_seed(3))
    c = sample_sigma(64, 11, generator=torch.Generator().manual_seed(3))
    assert a.shape == (64,) and a.dtype == torch.float32
    torch.testing.assert_close(b, 3.0 * a)
    torch.testing.assert_close(c, math.sqrt(11) * a)


def test_sigma_mixture_matches_closed_form():
    n = 400_000
    s = sample_sigma(n, 1, generator=torch.Generator().manual_seed(0)).double()
    assert (s > 0).all()
    ln4, std = math.log(4.0), 1.2

    def p_between(lo: float, hi: float) -> float:  # mixture probability of lo < sigma < hi
        logn = _phi((math.log(hi) - ln4) / std) - _phi((math.log(lo) - ln4) / std)
        uni = max(0.0, min(hi, 85.0) - max(lo, 1.0)) / 84.0
        return 0.7 * logn + 0.3 * uni

    # below 1 only the log-normal part contributes: 0.7 * Phi(-ln4 / 1.2) = 0.0868
    assert (s < 1).double().mean().item() == pytest.approx(0.7 * _phi(-ln4 / std), abs=0.002)
    assert 0.7 * _phi(-ln4 / std) == pytest.approx(0.0868, abs=1e-3)
    # above 85 likewise: 0.7 * (1 - Phi(ln(85/4) / 1.2)) = 0.0038
    assert (s > 85).double().mean().item() == pytest.approx(0.7 * (1 - _phi(math.log(85 / 4) / std)), abs=0.0006)
    for lo, hi in [(1, 4), (4, 10), (40, 50)]:
        frac = ((s > lo) & (s < hi)).double().mean().item()
        assert frac == pytest.approx(p_between(lo, hi), abs=0.003), (lo, hi)
    # mean: 0.7 * 4 * exp(1.2^2 / 2) + 0.3 * 43 = 18.65
    expected_mean = 0.7 * 4 * math.exp(std**2 / 2) + 0.3 * 43.0
    assert expected_mean == pytest.approx(18.652, abs=1e-3)
    assert s.mean().item() == pytest.approx(expected_mean, rel=0.02)


def test_sigma_rejects_bad_sizes():
    with pytest.raises(CosmosPolicyError):
        sample_sigma(0, 9)
    with pytest.raises(CosmosPolicyError):
        sample_sigma(4, 0)


# -------------------------------------------------------------------------------- preconditioning


def test_precondition_hand_values():
    sigma = torch.tensor([0.0, 1.0, 4.0, 80.0])
    c_skip, c_out, c_in, t = precondition(sigma)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.5, 0.8, 80 / 81]))
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.5, 0.2, 1 / 81]))
    torch.testing.assert_close(c_in, c_skip)
    torch.testing.assert_close(c_out, torch.tensor([0.0, -0.5, -0.8, -80 / 81]))


def test_precondition_broadcasts_per_frame():
    sigma = torch.tensor([[0.0, 3.0, 3.0], [0.0, 0.0, 1.0]])  # (B=2, T=3), conditioning frames at 0
    pre = precondition(sigma)
    assert all(v.shape == (2, 3) for v in pre)
    torch.testing.assert_close(pre.t, torch.tensor([[0.0, 0.75, 0.75], [0.0, 0.0, 0.5]]))
    assert latent_view(pre.t).shape == (2, 1, 3, 1, 1)
    assert latent_view(torch.ones(2)).shape == (2, 1, 1, 1, 1)
    # sigma 0: output is exactly the clean input whatever the network says
    x, f = torch.randn(5), torch.randn(5)
    c_skip, c_out, _, _ = precondition(torch.zeros(5))
    assert torch.equal(c_skip * x + c_out * f, x)


# --------------------------------------------------------------------------------------------- loss


def test_loss_weight_hand_values():
    torch.testing.assert_close(loss_weight(torch.tensor([0.5, 1.0, 4.0])), torch.tensor([9.0, 4.0, 1.5625]))
    # w = 1 / c_out^2
    sigma = torch.tensor([0.3, 2.0, 50.0])
    torch.testing.assert_close(loss_weight(sigma), 1 / precondition(sigma).c_out ** 2)


def test_diffusion_loss_hand_computed():
    # B=1, C=1, T=2, H=W=1: errors 1 and 2, sigma 1 (w=4), only frame 0 carries loss.
    x0 = torch.zeros(1, 1, 2, 1, 1)
    pred = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1, 1)
    loss = diffusion_loss(pred, x0, torch.tensor([1.0]), torch.tensor([[True, False]]))
    # mean over both elements (the masked one contributes zero, stays in the denominator): (4*1 + 0)/2 * 10
    assert LOSS_SCALE == 10.0
    assert loss.item() == pytest.approx(20.0)
    # B=2, C=2, T=3, H=1, W=2 with per-sample sigma
    x0 = torch.zeros(2, 2, 3, 1, 2)
    pred = torch.ones(2, 2, 3, 1, 2)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    per_sample = diffusion_loss(pred, x0, torch.tensor([1.0, 4.0]), mask, reduction="none")
    # sample 0: 8 of 12 elements with w=4 -> 32/12; sample 1: 4 of 12 with w=1.5625 -> 6.25/12
    torch.testing.assert_close(per_sample, torch.tensor([32 / 12 * 10, 6.25 / 12 * 10]))
    assert diffusion_loss(pred, x0, torch.tensor([1.0, 4.0]), mask).item() == pytest.approx(per_sample.mean().item())


def test_diffusion_loss_per_frame_sigma_with_zero_on_masked_frames_has_finite_gradient():
    x0 = torch.zeros(1, 1, 3, 1, 1)
    pred = torch.full((1, 1, 3, 1, 1), 0.5, requires_grad=True)
    sigma = torch.tensor([[0.0, 1.0, 1.0]])  # conditioning frame at sigma 0
    loss = diffusion_loss(pred, x0, sigma, torch.tensor([[False, True, True]]))
    loss.backward()
    assert loss.item() == pytest.approx(2 * 4 * 0.25 / 3 * 10)
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 0, 0].item() == 0.0


def test_diffusion_loss_rejects_bad_mask_shape():
    with pytest.raises(CosmosPolicyError, match="loss_mask"):
        diffusion_loss(torch.zeros(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1), torch.ones(1), torch.ones(1, 3, dtype=torch.bool))


def test_add_noise():
    x0, eps = torch.ones(2, 1, 2, 1, 1), torch.ones(2, 1, 2, 1, 1)
    out = add_noise(x0, torch.tensor([[0.0, 2.0], [1.0, 3.0]]), eps)
    assert out.flatten().tolist() == [1.0, 3.0, 2.0, 4.0]


# ------------------------------------------------------------------------------------------ schedule


def test_karras_schedule_hand_values():
    assert karras_sigmas(1).tolist() == [80.0]
    assert karras_sigmas(2).tolist() == [80.0, 4.0]
    mid = ((80 ** (1 / 7) + 4 ** (1 / 7)) / 2) ** 7
    assert mid == pytest.approx(20.97245, abs=1e-4)
    torch.testing.assert_close(karras_sigmas(3), torch.tensor([80.0, mid, 4.0], dtype=torch.float64))
    s = karras_sigmas(10)
    assert s.shape == (10,) and s[0] == 80.0 and s[-1] == 4.0
    assert (s[1:] < s[:-1]).all()
    with pytest.raises(CosmosPolicyError):
        karras_sigmas(0)


# -------------------------------------------------------------------------------------------- sampler


class _Counting:
    def __init__(self, fn):
        self.fn, self.sigmas, self.inputs = fn, [], []

    def __call__(self, x, sigma):
        self.sigmas.append(sigma[0].item())
        self.inputs.append(x.clone())
        return self.fn(x, sigma)


@pytest.mark.parametrize("steps", [1, 5, 10])
def test_sampler_makes_n_network_calls_ending_at_sigma_min(steps):
    den = _Counting(lambda x, sigma: torch.zeros_like(x))
    sample(den, torch.randn(2, 3), steps)
    assert len(den.sigmas) == steps
    expected = karras_sigmas(steps).tolist()
    assert den.sigmas == pytest.approx(expected, rel=1e-6)
    assert den.sigmas[-1] == pytest.approx(80.0 if steps == 1 else 4.0)


def test_one_step_is_a_single_prediction_at_sigma_max():
    noise = torch.randn(3, 4)
    den = _Counting(lambda x, sigma: 0.25 * x)
    out = sample(den, noise, 1)
    torch.testing.assert_close(den.inputs[0], 80.0 * noise)
    torch.testing.assert_close(out, 0.25 * 80.0 * noise)


def test_first_step_is_euler():
    noise = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    den = _Counting(lambda x, sigma: target + 0.1 * x)
    sample(den, noise, 3)
    s0, s1 = karras_sigmas(3)[:2].tolist()
    x0 = 80.0 * noise
    d = target + 0.1 * x0
    euler = x0 + (s1 - s0) * (x0 - d) / s0  # dx/dsigma = (x - D) / sigma
    torch.testing.assert_close(den.inputs[1], euler)


def test_multistep_steps_use_the_reference_2ab_coefficient():
    """Every step after the first, in closed form (the reference's "2ab" RES multistep):
    x_{i+1} = e^-h x_i + (1 - e^-h) D_i + (h - 1 + e^-h) / h_last (D_i - D_{i-1}), h in log-sigma."""
    noise = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.randn(2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    den = _Counting(lambda x, sigma: target + 0.1 * x + 0.01 * sigma.double().view(-1, 1) * x)
    sample(den, noise, 5)
    sig = karras_sigmas(5).tolist()
    x, previous = 80.0 * noise, None
    for i in range(4):
        torch.testing.assert_close(den.inputs[i], x)  # the solver's state at every network call
        d = target + 0.1 * x + 0.01 * sig[i] * x
        h = math.log(sig[i] / sig[i + 1])
        x_next = math.exp(-h) * x + (1 - math.exp(-h)) * d
        if previous is not None:
            h_last = math.log(sig[i - 1] / sig[i])
            coefficient = (h - 1 + math.exp(-h)) / h_last
            # DPM-Solver++(2M)'s coefficient is 10-13 % smaller on this schedule
            dpm = (1 - math.exp(-h)) * h / (2 * h_last)
            assert 0.10 < 1 - dpm / coefficient < 0.13
            x_next = x_next + coefficient * (d - previous)
        x, previous = x_next, d
    torch.testing.assert_close(den.inputs[4], x)  # the final x0 prediction sees the last state


def _gaussian_problem(n=2000):
    """Data x0 ~ N(mu, s^2) per element: the exact denoiser and the exact sampler output are known."""
    mu, s = 0.5, 2.0

    def exact_denoiser(x, sigma):
        sigma = sigma.double().view(-1, 1)
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    noise = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # probability-flow ODE from 80 to 4: x(sigma) - mu scales with sqrt(s^2 + sigma^2); then D(x(4), 4)
    exact = mu + s**2 / math.sqrt((s**2 + 16) * (s**2 + 6400)) * (80 * noise - mu)
    return exact_denoiser, noise, exact


def test_sampler_lands_on_the_exact_answer_for_gaussian_data():
    den, noise, exact = _gaussian_problem()
    err10 = (sample(den, noise, 10) - exact).abs().max().item()
    assert err10 < 0.02 * exact.abs().max().item()
    # a single point as data: the exact denoiser is constant, any step count returns it
    out = sample(lambda x, sigma: torch.full_like(x, 0.7), noise, 5)
    torch.testing.assert_close(out, torch.full_like(noise, 0.7))


def test_sampler_is_second_order():
    den, noise, exact = _gaussian_problem()
    err = {(n, o): (sample(den, noise, n, order=o) - exact).abs().max().item() for n in (11, 21) for o in (1, 2)}
    # doubling the solver steps divides the error by ~2 for Euler and by ~4 for the 2ab multistep solver
    assert 1.7 < err[11, 1] / err[21, 1] < 2.3
    assert 3.3 < err[11, 2] / err[21, 2] < 4.7
    assert err[11, 2] < 0.5 * err[11, 1]


# ------------------------------------------------------------------------------------------- Denoiser


def _cond_setup():
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(2, 3, 4, 2, 2, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    x_sigma = torch.randn(2, 3, 4, 2, 2, generator=g) * 5
    sigma = torch.tensor([3.0, 0.5])
    return clean, mask, x_sigma, sigma


def test_denoiser_zero_network_and_exact_conditioning():
    clean, mask, x_sigma, sigma = _cond_setup()
    seen = {}

    def net(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in)

    out = Denoiser(net, clean, mask)(x_sigma, sigma)
    frames = latent_view(mask).expand_as(clean)
    assert torch.equal(out[frames], clean[frames])  # conditioning outputs are the clean latents, exactly
    c_skip = 1 / (1 + sigma)  # 1 - t
    torch.testing.assert_close(out[~frames], (latent_view(c_skip) * x_sigma)[~frames])
    # network inputs: time 0 on conditioning frames, t = sigma / (1 + sigma) elsewhere; clean frames unscaled
    t_expected = torch.where(mask, torch.zeros(2, 4), (sigma / (1 + sigma))[:, None].expand(2, 4))
    torch.testing.assert_close(seen["t"], t_expected)
    assert torch.equal(seen["x_in"][frames], clean[frames])
    torch.testing.assert_close(seen["x_in"][~frames], (latent_view(c_skip) * x_sigma)[~frames])


def test_denoiser_formula_with_a_nonzero_network():
    clean, mask, x_sigma, sigma = _cond_setup()
    out = Denoiser(lambda x, t: 2.0 * x + 1.0, clean, mask)(x_sigma, sigma)
    t = (sigma / (1 + sigma)).view(2, 1, 1, 1, 1)
    expected = (1 - t) * x_sigma - t * (2.0 * (1 - t) * x_sigma + 1.0)
    frames = latent_view(mask).expand_as(clean)
    torch.testing.assert_close(out[~frames], expected[~frames])
    assert torch.equal(out[frames], clean[frames])


def test_denoiser_in_the_sampler_keeps_conditioning_frames():
    clean, mask, _, _ = _cond_setup()
    out = sample(Denoiser(lambda x, t: torch.randn_like(x), clean, mask), torch.randn_like(clean), 5)
    frames = latent_view(mask).expand_as(clean)
    assert torch.equal(out[frames], clean[frames])


def test_denoiser_rejects_mismatched_mask():
    with pytest.raises(CosmosPolicyError, match="condition_mask"):
        Denoiser(lambda x, t: x, torch.zeros(1, 2, 3, 1, 1), torch.zeros(1, 4, dtype=torch.bool))
