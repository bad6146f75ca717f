"""Diffusion in latent space: noise levels, preconditioning, loss and sampler (docs/method.md §2, §3).

Notation. Latents are laid out ``(B, C, T, H, W)`` (batch, channels, latent frames, height, width).
``sigma`` is the noise level of ``x_sigma = x0 + sigma * eps`` (variance-exploding form, no scaling of
``x0``). ``sigma`` is either per sample ``(B,)`` or per latent frame ``(B, T)``; conditioning frames
have sigma 0.

Preconditioning is the rectified-flow form with ``sigma_data = 1`` that the pretrained
Cosmos-Predict2 weights expect (docs/method.md §3)::

    t = sigma / (1 + sigma),  c_in = c_skip = 1 - t,  c_out = -t
    x0_pred = c_skip * x_sigma + c_out * F(c_in * x_sigma, t)

``t`` is also the network's time input, per frame (0 on conditioning frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..errors import CosmosPolicyError

#: Hybrid training noise distribution (docs/method.md §3): with probability ``P_LOGNORMAL`` ``ln sigma ~
#: N(LN_SIGMA_MEAN, LN_SIGMA_STD^2)``, otherwise ``sigma ~ U[SIGMA_UNIFORM_LOW, SIGMA_UNIFORM_HIGH]``.
P_LOGNORMAL = 0.7
LN_SIGMA_MEAN = math.log(4.0)
LN_SIGMA_STD = 1.2
SIGMA_UNIFORM_LOW = 1.0
SIGMA_UNIFORM_HIGH = 85.0

#: The loss is multiplied by this constant (docs/method.md §3).
LOSS_SCALE = 10.0

#: Sampling schedule (docs/method.md §3): Karras, rho 7, from 80 down to 4. The floor of 4 is deliberate.
SIGMA_MAX = 80.0
SIGMA_MIN = 4.0
RHO = 7.0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CosmosPolicyError(message)


# --------------------------------------------------------------------------------------------- noise


def sample_sigma(
    batch_size: int,
    num_latent_frames: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    p_lognormal: float = P_LOGNORMAL,
    ln_mean: float = LN_SIGMA_MEAN,
    ln_std: float = LN_SIGMA_STD,
    uniform_low: float = SIGMA_UNIFORM_LOW,
    uniform_high: float = SIGMA_UNIFORM_HIGH,
) -> torch.Tensor:
    """Draw one training noise level per sample, shared by all its frames (docs/method.md §3).

    With probability ``p_lognormal`` (0.7) ``ln sigma ~ N(ln 4, 1.2^2)``, otherwise
    ``sigma ~ U[1, 85]``; the result is multiplied by ``sqrt(num_latent_frames)`` (x3 for 9 frames,
    x3.317 for 11): longer sequences carry more redundant signal, so they need more noise.

    Args:
        batch_size: number of samples B (>= 1).
        num_latent_frames: latent frames T of the sequence (>= 1), for the sqrt(T) scaling.
        generator: optional ``torch.Generator`` (must live on ``device``) for reproducible draws.
        device: where to create the result; default CPU.
        p_lognormal, ln_mean, ln_std, uniform_low, uniform_high: the mixture's parameters.

    Returns:
        ``(B,)`` float32 tensor, sigma > 0.

    Raises:
        CosmosPolicyError: non-positive sizes or an invalid mixture.
    """
    _check(batch_size >= 1 and num_latent_frames >= 1,
           f"sample_sigma: expected batch_size >= 1 and num_latent_frames >= 1, got {batch_size}, "
           f"{num_latent_frames}")
    _check(0.0 <= p_lognormal <= 1.0 and ln_std >= 0.0 and 0.0 < uniform_low <= uniform_high,
           f"sample_sigma: invalid mixture p={p_lognormal}, ln_std={ln_std}, "
           f"U[{uniform_low}, {uniform_high}]")
    # Three independent draws, always all three, so the stream of a seeded generator does not depend
    # on which branch each sample takes.
    pick = torch.rand(batch_size, generator=generator, device=device)
    normal = torch.randn(batch_size, generator=generator, device=device)
    uniform = torch.rand(batch_size, generator=generator, device=device)
    lognormal_sigma = torch.exp(ln_mean + ln_std * normal)
    uniform_sigma = uniform_low + (uniform_high - uniform_low) * uniform
    sigma = torch.where(pick < p_lognormal, lognormal_sigma, uniform_sigma)
    return sigma * math.sqrt(num_latent_frames)


def latent_view(value: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(B,)`` or per-frame ``(B, T)`` quantity to broadcast over
    ``(B, C, T, H, W)`` latents: ``(B, 1, 1, 1, 1)`` or ``(B, 1, T, 1, 1)``.

    Raises:
        CosmosPolicyError: ``value`` is not 1-D or 2-D.
    """
    if value.dim() == 1:
        return value.view(-1, 1, 1, 1, 1)
    if value.dim() == 2:
        return value.view(value.shape[0], 1, value.shape[1], 1, 1)
    raise CosmosPolicyError(f"latent_view: expected a (B,) or (B, T) tensor, got shape {tuple(value.shape)}")


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_sigma = x0 + sigma * eps`` (docs/method.md §3).

    Args:
        x0: clean latents ``(B, C, T, H, W)``.
        sigma: ``(B,)`` per sample or ``(B, T)`` per frame, >= 0.
        noise: standard normal ``eps``, same shape as ``x0``.

    Returns:
        ``(B, C, T, H, W)`` noised latents.
    """
    _check(x0.shape == noise.shape, f"add_noise: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
    return x0 + latent_view(sigma).to(x0.dtype) * noise


# --------------------------------------------------------------------------------- preconditioning


class Preconditioning(NamedTuple):
    """Rectified-flow coefficients, each the shape of the ``sigma`` they came from (docs/method.md §3)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    t: torch.Tensor


def precondition(sigma: torch.Tensor) -> Preconditioning:
    """Rectified-flow preconditioning with sigma_data = 1 (docs/method.md §3).

    ``t = sigma / (1 + sigma)``, ``c_in = c_skip = 1 - t``, ``c_out = -t``. Elementwise, so ``sigma``
    may be per sample ``(B,)`` or per frame ``(B, T)``; sigma 0 (a conditioning frame) gives
    ``t = 0``, ``c_skip = 1``, ``c_out = 0``: the output is exactly the clean input.

    Args:
        sigma: noise levels >= 0, any shape.

    Returns:
        ``Preconditioning(c_skip, c_out, c_in, t)``, each shaped like ``sigma``; t in [0, 1).
    """
    t = sigma / (1.0 + sigma)
    one_minus_t = 1.0 - t
    return Preconditioning(c_skip=one_minus_t, c_out=-t, c_in=one_minus_t, t=t)


# -------------------------------------------------------------------------------------------- loss


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Per-sigma loss weight ``w = (1 + sigma)^2 / sigma^2`` (docs/method.md §3); infinite at sigma 0.

    It is ``1 / c_out^2``: the weighted x0 error equals the plain error of the raw network output.
    """
    return (1.0 + sigma) ** 2 / sigma**2


def diffusion_loss(
    x0_pred: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted x0 regression loss (docs/method.md §3).

    ``LOSS_SCALE * mean(w(sigma) * (x0_pred - x0)^2)`` where the mean runs over EVERY element of the
    ``(B, C, T, H, W)`` latents and frames outside ``loss_mask`` contribute zero (they stay in the
    denominator, as in the reference). Computed in float32.

    Args:
        x0_pred: predicted clean latents ``(B, C, T, H, W)``.
        x0: clean latents, same shape.
        sigma: noise level, ``(B,)`` per sample or ``(B, T)`` per frame; must be > 0 on loss frames
            (other frames may hold 0: their weight is never evaluated, so no inf/NaN arises).
        loss_mask: ``(B, T)`` bool, True on frames that carry loss.
        reduction: ``"mean"`` -> scalar; ``"none"`` -> ``(B,)`` per-sample means (their mean is the
            scalar loss, since all samples have the same number of elements).

    Returns:
        float32 scalar, or ``(B,)``.

    Raises:
        CosmosPolicyError: mismatched shapes or an unknown reduction.
    """
    _check(x0_pred.shape == x0.shape and x0.dim() == 5,
           f"diffusion_loss: expected x0_pred and x0 of the same (B, C, T, H, W) shape, got "
           f"{tuple(x0_pred.shape)} and {tuple(x0.shape)}")
    batch, _, frames = x0.shape[:3]
    _check(tuple(loss_mask.shape) == (batch, frames),
           f"diffusion_loss: expected loss_mask of shape {(batch, frames)}, got {tuple(loss_mask.shape)}")
    _check(tuple(sigma.shape) in ((batch,), (batch, frames)),
           f"diffusion_loss: expected sigma of shape {(batch,)} or {(batch, frames)}, got {tuple(sigma.shape)}")
    _check(reduction in ("mean", "none"), f"diffusion_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    mask = loss_mask.to(torch.bool)
    sigma_frames = sigma.float()
    if sigma_frames.dim() == 1:
        sigma_frames = sigma_frames[:, None].expand(batch, frames)
    # Substitute sigma 1 off the loss frames before weighting: w(0) = inf and inf * 0 = NaN, also in
    # the backward pass.
    safe_sigma = torch.where(mask, sigma_frames, torch.ones_like(sigma_frames))
    weight = loss_weight(safe_sigma) * mask
    error = (x0_pred.float() - x0.float()) ** 2
    weighted = error * latent_view(weight)
    per_sample = weighted.flatten(1).mean(dim=1) * LOSS_SCALE
    return per_sample if reduction == "none" else per_sample.mean()


# ----------------------------------------------------------------------------------------- sampling


def karras_sigmas(
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> torch.Tensor:
    """Karras et al. (2022) noise schedule (docs/method.md §3).

    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for
    ``i = 0 .. N-1``: descending from ``sigma_max`` to ``sigma_min`` inclusive; ``N = 1`` gives
    ``[sigma_max]``.

    Args:
        num_steps: N >= 1, the number of network calls of :func:`sample`.
        sigma_min, sigma_max: schedule end points, ``0 < sigma_min <= sigma_max``.
        rho: schedule curvature (> 0).

    Returns:
        ``(N,)`` float64 tensor on the CPU (exact end points).

    Raises:
        CosmosPolicyError: invalid arguments.
    """
    _check(num_steps >= 1, f"karras_sigmas: expected num_steps >= 1, got {num_steps}")
    _check(0.0 < sigma_min <= sigma_max and rho > 0.0,
           f"karras_sigmas: expected 0 < sigma_min <= sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    if num_steps == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    # Pin the end points: the float power round trip can be off in the last bit.
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    order: int = 2,
) -> torch.Tensor:
    """Generate clean latents with ``num_steps`` network calls (docs/method.md §3).

    Step convention: N steps = N calls of ``denoise``: N-1 solver steps along the Karras schedule
    (:func:`karras_sigmas`), then one final x0 prediction at ``sigma_min``, which is the result.
    ``N = 1`` is a single x0 prediction at ``sigma_max``.

    The solver is the reference's second-order multistep method in x0 form, "2ab" (the Adams-Bashforth
    form of the RES solver, Zhang et al. 2023, arXiv 2308.02157), for the variance-exploding ODE
    ``dx/dsigma = (x - D(x, sigma)) / sigma``. With ``h = ln(sigma_i / sigma_{i+1})`` and
    ``h_last = ln(sigma_{i-1} / sigma_i)``:

        x_{i+1} = e^-h x_i + (1 - e^-h) D_i + (h - 1 + e^-h) / h_last * (D_i - D_{i-1})

    (``e^-h = sigma_{i+1} / sigma_i``; the correction term is absent on the first step). The first step
    is therefore exactly an Euler step of the ODE. Its correction coefficient integrates the linear
    extrapolation of D in log-sigma exactly; DPM-Solver++(2M)'s ``(1 - e^-h) h / (2 h_last)``
    approximates it with the extrapolation taken at mid-step and is 10-13 % smaller on the 5-step
    schedule. ``order=1`` uses Euler throughout.

    Args:
        denoise: ``denoise(x_sigma (B, ...), sigma (B,)) -> x0_pred`` of the same shape; the caller's
            closure handles conditioning frames (see :class:`Denoiser`).
        noise: standard normal ``(B, ...)``; the start point is ``sigma_max * noise``.
        num_steps: N >= 1 network calls.
        sigma_min, sigma_max, rho: the schedule (defaults 4, 80, 7).
        order: 2 (default) or 1.

    Returns:
        The final x0 prediction, shape and dtype of ``noise``.

    Raises:
        CosmosPolicyError: invalid arguments.
    """
    _check(order in (1, 2), f"sample: order must be 1 or 2, got {order}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    batch = noise.shape[0]

    def sigma_tensor(value: float) -> torch.Tensor:
        return torch.full((batch,), value, dtype=torch.float32, device=noise.device)

    x = noise * sigmas[0]
    previous = None
    for i in range(num_steps - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma_tensor(sigma))
        ratio = sigma_next / sigma  # e^-h
        x = ratio * x + (1.0 - ratio) * denoised
        if previous is not None and order == 2:
            h = math.log(sigma / sigma_next)
            h_last = math.log(sigmas[i - 1] / sigma)
            x = x + ((h - 1.0 + ratio) / h_last) * (denoised - previous)
        previous = denoised
    return denoise(x, sigma_tensor(sigmas[-1]))


# ---------------------------------------------------------------------------------------- denoiser

NetworkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """x0 prediction with conditioning frames, the four-way treatment of docs/method.md §2 and §3.

    For noised latents ``x_sigma`` at per-sample noise ``sigma``:

    1. conditioning frames of ``x_sigma`` are replaced by the clean latents;
    2. their per-frame sigma is 0, so their time ``t`` is 0 and ``c_in = c_skip = 1``, ``c_out = 0``;
    3. (the condition-mask channel is the network's business: bind it in ``network``);
    4. ``x0_pred = c_skip * x + c_out * F(c_in * x, t)`` per frame, then the conditioning frames of
       the output are replaced by the clean latents (exactly: they carry no loss).

    Works for training (call once at the training sigma) and as the ``denoise`` closure of
    :func:`sample`. Arithmetic is float32 whatever the network's dtype.

    Args:
        network: ``F(x_in (B, C, T, H, W), t (B, T)) -> raw output (B, C, T, H, W)``, e.g.
            ``lambda x, t: dit(x, t, condition_mask, text, text_mask)``.
        clean: clean latents ``(B, C, T, H, W)``; only the conditioning frames are read.
        condition_mask: ``(B, T)`` bool, True on conditioning frames (per sample, per frame).

    Raises:
        CosmosPolicyError: mismatched shapes (at construction or call).
    """

    def __init__(self, network: NetworkFn, clean: torch.Tensor, condition_mask: torch.Tensor) -> None:
        _check(clean.dim() == 5, f"Denoiser: expected clean latents (B, C, T, H, W), got {tuple(clean.shape)}")
        _check(tuple(condition_mask.shape) == (clean.shape[0], clean.shape[2]),
               f"Denoiser: expected condition_mask of shape {(clean.shape[0], clean.shape[2])}, "
               f"got {tuple(condition_mask.shape)}")
        self.network = network
        self.clean = clean
        self.condition_mask = condition_mask.to(torch.bool)
        self._frame_mask = latent_view(self.condition_mask)  # (B, 1, T, 1, 1)

    def frame_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-frame sigma ``(B, T)``: the sample's sigma ``(B,)`` on noised frames, 0 on conditioning."""
        frames = self.condition_mask.shape[1]
        sigma_bt = sigma.float()[:, None].expand(-1, frames)
        return torch.where(self.condition_mask, torch.zeros_like(sigma_bt), sigma_bt)

    def __call__(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Predict clean latents.

        Args:
            x_sigma: noised latents ``(B, C, T, H, W)`` (any values on conditioning frames).
            sigma: ``(B,)`` noise level of the noised frames, > 0.

        Returns:
            ``x0_pred`` ``(B, C, T, H, W)`` float32, equal to ``clean`` on conditioning frames.
        """
        _check(x_sigma.shape == self.clean.shape,
               f"Denoiser: x_sigma {tuple(x_sigma.shape)} does not match clean latents {tuple(self.clean.shape)}")
        _check(tuple(sigma.shape) == (x_sigma.shape[0],),
               f"Denoiser: expected sigma of shape {(x_sigma.shape[0],)}, got {tuple(sigma.shape)}")
        clean = self.clean.float()
        x = torch.where(self._frame_mask, clean, x_sigma.float())
        coeff = precondition(self.frame_sigma(sigma))
        raw = self.network(latent_view(coeff.c_in) * x, coeff.t)
        x0_pred = latent_view(coeff.c_skip) * x + latent_view(coeff.c_out) * raw.float()
        return torch.where(self._frame_mask, clean, x0_pred)
