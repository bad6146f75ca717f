"""Train the tiny Wan video VAE shipped in ``assets/tiny_wan_vae`` on Meta-World frames (CPU, minutes).

The quickstart cannot download the real Wan2.1 VAE, and a randomly initialised one decodes noise, so
the predicted futures shown in TensorBoard would be unreadable. This tool trains a small
``diffusers.AutoencoderKLWan`` (the same class, small widths, z_dim 16, 8x spatial / 4x temporal
compression) on the camera frames of robomimic HDF5 files such as ``samples/metaworld``.

The framework encodes ``1 + 4k`` pixel frames: a black frame, then groups of 4 identical copies of an
image (or 4 black frames for vector slots), docs/method.md §1. Training on such sequences on a CPU is slow
(every copy runs through the network), so training has two phases:

1. *images*: the VAE starts "temporally transparent" -- every causal convolution sees only the current
   frame, the encoder's temporal downsampling keeps the last frame and the decoder's temporal upsampling
   repeats its input -- so a group of 4 copies encodes to exactly the latent of the single image, and
   one latent decodes to 4 copies of that image's decoding. Single frames (the encoder's first-frame
   path) are then ~5x cheaper to train on, and what they teach holds unchanged in the sequence regime.
2. *sequences*: fine-tuning on ``1 + 4 * 2``-frame sequences (black, 4 x image A or black, 4 x image B),
   the regime the framework uses, which also trains the temporal taps.

Held-out PSNR (the last ``holdout_episodes`` episodes of every file) is measured in the sequence regime
before and after phase 2; phase 2's weights are kept only if they are better. The per-channel latent
mean / std (like Wan2.1's ``latents_mean`` / ``latents_std``) are measured on training frames in the
sequence regime and written into the saved config, so ``VideoVAE`` normalises the latents to about
zero mean and unit variance.

    OMP_NUM_THREADS=1 python tools/train_tiny_vae.py --data samples/metaworld --output assets/tiny_wan_vae

Writes ``<output>/{config.json, diffusion_pytorch_model.safetensors, training.json, README.md}``
atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jsonargparse import CLI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cosmos_policy_lightning.embodiment import Embodiment  # noqa: E402
from cosmos_policy_lightning.errors import CosmosPolicyError, DataError  # noqa: E402

GROUP = 4  # pixel frames per latent frame after the first (Wan2.1 temporal compression)


# ----------------------------------------------------------------------------------------- data
def load_frames(paths: list[Path], cameras: list, holdout_episodes: int,
                max_episodes: int | None = None, frame_stride: int = 1) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the camera frames of HDF5 demonstrations in either layout the converter reads.

    - robomimic (``data/demo_N/obs/<key>``, many episodes per file): the camera's ``robomimic`` key
      (default ``<name>_rgb``); the last ``holdout_episodes`` episodes of every file are held out.
    - ACT / ALOHA per-episode files (``observations/images/<camera>``, one episode per file, as written by
      ``cosmos-policy collect``): the camera's ``episode_hdf5`` key; the last ``holdout_episodes`` files of
      every directory are held out.

    Args:
        paths: HDF5 files (sorted; per-episode files are grouped by their directory).
        cameras: the embodiment's cameras (:class:`~cosmos_policy_lightning.embodiment.CameraSpec`).
        holdout_episodes: episodes held out per file (robomimic) or per directory (per-episode files).
        max_episodes: read at most this many episodes per file / directory (tests).
        frame_stride: keep every this-many-th step of each episode (long episodes change slowly).

    Returns:
        ``(train, heldout, holdout)``: uint8 arrays ``(N, H, W, 3)`` and the held-out episode names per
        file or directory. ``heldout`` interleaves the cameras per step (camera 0 at step t, camera 1 at
        step t, ...).

    Raises:
        DataError: a file has neither layout or lacks a camera key, or frames are not (T, H, W, 3) uint8.
    """
    import h5py

    train, held, holdout = [], [], {}

    def read(path: Path, f, names: list[str], episode: str, hold: bool) -> None:
        cams = []
        for name in names:
            if name not in f:
                raise DataError(f"{path}: episode {episode}: missing camera key {name}")
            frames = f[name][::frame_stride]
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise DataError(f"{path}: {name}: expected (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
            cams.append(frames)
        if hold:
            held.append(np.stack(cams, axis=1).reshape(-1, *cams[0].shape[1:]))
        else:
            train.extend(cams)

    def split(names: list[str]) -> list[str]:
        names = names[:max_episodes] if max_episodes is not None else names
        n_hold = min(holdout_episodes, len(names) - 1) if len(names) > 1 else 0
        return names, names[len(names) - n_hold:] if n_hold else []

    episode_files: dict[Path, list[Path]] = {}
    for path in paths:
        with h5py.File(path, "r") as f:
            if "data" in f and len(f["data"]):
                demos = sorted(f["data"], key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else 0)
                demos, holdout[path.name] = split(demos)
                names = [f"obs/{c.keys.get('robomimic', f'{c.name}_rgb')}" for c in cameras]
                for demo in demos:
                    read(path, f["data"][demo], names, demo, demo in holdout[path.name])
            elif "observations" in f:
                episode_files.setdefault(path.parent, []).append(path)
            else:
                raise DataError(f"{path}: expected robomimic groups data/demo_N or per-episode observations/images/<camera>")
    for directory, files in episode_files.items():
        files = sorted(files, key=lambda p: (len(p.stem), p.stem))  # episode_2 before episode_10
        files, hold = split(files)
        holdout[str(directory)] = [p.name for p in hold]
        names = [c.keys.get("episode_hdf5", f"observations/images/{c.name}") for c in cameras]
        for path in files:
            with h5py.File(path, "r") as f:
                read(path, f, names, path.stem, path in hold)
    if not train:
        raise DataError(f"no training frames in {[str(p) for p in paths]}")
    heldout = np.concatenate(held) if held else np.zeros((0,) + train[0].shape[1:], np.uint8)
    return np.concatenate(train), heldout, holdout


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def sequence(first: torch.Tensor | None, second: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` images -> ``(B, 3, 1 + 8, H, W)``: black, 4 x first (black if None), 4 x second."""
    black = torch.full_like(second, -1.0)
    a = black if first is None else first
    return torch.cat([black[:, :, None], a[:, :, None].expand(-1, -1, GROUP, -1, -1),
                      second[:, :, None].expand(-1, -1, GROUP, -1, -1)], dim=2)


# ----------------------------------------------------------------------------------------- model
def temporally_transparent_(vae) -> None:
    """Make every temporal operation of a freshly initialised ``AutoencoderKLWan`` act on the current
    frame only (see the module docstring), so single-image training carries over to 4-copy groups."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, WanCausalConv3d) and m.kernel_size[0] == 3:
                # Causal padding puts the current frame at the last temporal tap; keep the response
                # scale of the 3-tap initialisation.
                m.weight[:, :, 2] *= math.sqrt(3.0)
                m.weight[:, :, :2] = 0.0
        for m in vae.modules():
            if isinstance(m, WanResample) and m.mode in ("downsample3d", "upsample3d"):
                w, dim = m.time_conv.weight, m.dim
                w.zero_()
                m.time_conv.bias.zero_()
                eye = torch.eye(dim, dtype=w.dtype)
                w[:dim, :, 2, 0, 0] = eye  # downsample: keep the last frame of each stride-2 window
                if m.mode == "upsample3d":
                    w[dim:, :, 2, 0, 0] = eye  # upsample: both output frames copy the input


@contextlib.contextmanager
def single_frame_fast_path():
    """Run causal 3x3x3 convolutions on a lone first frame as 2D convolutions (phase 1).

    A lone first frame is padded in time with two zero frames, so only the last temporal tap of the
    kernel ever multiplies data: a 2D convolution with that tap gives the same output and the same
    gradients (zero for the other taps) with a third of the arithmetic."""
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    original = WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if (x.shape[2] == 1 and cache_x is None and self.kernel_size[0] == 3 and self.stride[0] == 1
                and self._padding[4] == 2):
            y = F.conv2d(F.pad(x[:, :, 0], self._padding[:4]), self.weight[:, :, -1], self.bias,
                         stride=self.stride[1:], dilation=self.dilation[1:])
            return y[:, :, None]
        return original(self, x, cache_x)

    WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        WanCausalConv3d.forward = original


def build_vae(base_dim: int, dim_mult: list[int], num_res_blocks: int, z_dim: int):
    from diffusers import AutoencoderKLWan

    if len(dim_mult) != 4:
        raise CosmosPolicyError(f"dim_mult needs 4 entries (8x spatial compression), got {dim_mult}")
    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                           attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
                           latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    temporally_transparent_(vae)
    return vae


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator, hard_pixel_weight: float = 0.0,
             hard_pixel_fraction: float = 0.01) -> tuple[torch.Tensor, float]:
    """L1 + MSE reconstruction of ``x`` (B, 3, T, H, W) in [-1, 1] from a posterior sample, plus
    ``kl_weight`` x the mean KL per latent value, plus ``hard_pixel_weight`` x the mean L1 + MSE of the worst
    ``hard_pixel_fraction`` of each frame's pixels. Returns ``(loss, reconstruction MSE)``.

    Why the hard-pixel term: an object of 1-2 pixels (ALOHA's cube in the 64x64 top camera) is about 0.1 % of
    the mean error, so a VAE trained on the mean alone paints the table over it and reaches 28 dB without it;
    the worst pixels of a frame are exactly such objects once the background is learned (a top-k loss, as
    online hard example mining does for pixels)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    err = recon - x
    per_pixel = err.abs() + err.square()
    rec = per_pixel.mean()
    if hard_pixel_weight > 0:
        b, _, t, h, w = per_pixel.shape
        flat = per_pixel.mean(1).reshape(b * t, h * w)   # (frames, pixels), channels averaged
        k = max(1, int(round(hard_pixel_fraction * h * w)))
        rec = rec + hard_pixel_weight * flat.topk(k, dim=1).values.mean()
    # KL to N(0, 1) per latent value (diffusers' .kl() sums over only some of the 5 dims).
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
    return rec + kl_weight * kl, float(err.detach().square().mean())


@torch.no_grad()
def heldout_psnr(vae, frames: np.ndarray, pairs: int, batch: int = 8) -> dict[str, float]:
    """Held-out PSNR (dB, images as uint8) in the framework's regime.

    Consecutive held-out frames (A, B) -- interleaved cameras, so mostly wrist then corner of one step --
    are encoded as [black, 4 x A, 4 x B] with the posterior mode, then
    ``sequence``: the 9 decoded frames, PSNR of the 8 image frames against A / B;
    ``display``: latents [blank, B] decoded alone, last frame against B (how futures are shown).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr

    n = min(pairs, len(frames) - 1)
    if n < 1:
        return {"sequence": float("nan"), "display": float("nan"), "pairs": 0}
    idx = np.linspace(0, len(frames) - 2, n).astype(int)
    seq, disp = [], []
    for s in range(0, n, batch):
        i = idx[s:s + batch]
        a, b = to_pixels(frames[i]), to_pixels(frames[i + 1])
        z = vae.encode(sequence(a, b)).latent_dist.mode()
        rec = vae.decode(z).sample
        target = sequence(a, b)[:, :, 1:]
        q = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731  (as saved images)
        seq.append(psnr(q(rec[:, :, 1:]).transpose(1, 2).flatten(0, 1), q(target).transpose(1, 2).flatten(0, 1),
                        data_range=255.0, reduction="none", dim=(1, 2, 3)))
        last = vae.decode(torch.stack([z[:, :, 0], z[:, :, 2]], dim=2)).sample[:, :, -1]
        disp.append(psnr(q(last), q(b), data_range=255.0, reduction="none", dim=(1, 2, 3)))
    return {"sequence": float(torch.cat(seq).mean()), "display": float(torch.cat(disp).mean()), "pairs": int(n)}


@torch.no_grad()
def latent_stats(vae, frames: np.ndarray, count: int, rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of image latents (posterior mode) in the sequence regime."""
    zs = []
    for s in range(0, count, 16):
        i = rng.integers(0, len(frames), size=(min(16, count - s), 2))
        z = vae.encode(sequence(to_pixels(frames[i[:, 0]]), to_pixels(frames[i[:, 1]]))).latent_dist.mode()
        zs.append(z[:, :, 1:].transpose(0, 1).reshape(z.shape[1], -1))
    z = torch.cat(zs, dim=1)
    return [round(float(v), 5) for v in z.mean(1)], [round(float(v), 5) for v in z.std(1).clamp_min(1e-3)]


# ----------------------------------------------------------------------------------------- main
def train_tiny_vae(
    *,
    data: str = "samples/metaworld",
    output: Path = Path("assets/tiny_wan_vae"),
    embodiment: Path = REPO / "embodiments" / "metaworld.yaml",
    base_dim: int = 16,
    dim_mult: list[int] = [1, 2, 4, 4],
    num_res_blocks: int = 1,
    z_dim: int = 16,
    image_steps: int = 3000,
    image_batch: int = 8,
    image_minutes: float | None = 11.0,
    sequence_steps: int = 30,
    sequence_batch: int = 2,
    black_fraction: float = 0.0625,
    lr: float = 2e-3,
    sequence_lr: float = 2e-4,
    kl_weight: float = 1e-4,
    hard_pixel_weight: float = 0.0,
    hard_pixel_fraction: float = 0.01,
    holdout_episodes: int = 1,
    max_episodes: int | None = None,
    frame_stride: int = 1,
    eval_pairs: int = 64,
    stats_sequences: int = 256,
    seed: int = 0,
    threads: int = 1,
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16",
    scenes: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Train a small ``AutoencoderKLWan`` on camera frames and save it with ``save_pretrained``.

    Args:
        data: an HDF5 file, a directory (``*.hdf5`` / ``*.h5`` anywhere below) or a glob: robomimic files
            or per-episode ACT / ALOHA files (:func:`load_frames`).
        output: directory written (config.json, safetensors, training.json, README.md).
        embodiment: embodiment YAML; its cameras' ``robomimic`` / ``episode_hdf5`` keys name the image datasets.
        base_dim: channels of the first encoder stage (Wan2.1: 96).
        dim_mult: channel multipliers of the 4 stages (Wan2.1: [1, 2, 4, 4]).
        num_res_blocks: residual blocks per stage (Wan2.1: 2).
        z_dim: latent channels (16, as Wan2.1 and the DiT expect).
        image_steps: phase-1 optimiser steps on single frames (at most).
        image_batch: frames per phase-1 step.
        image_minutes: wall-clock budget of phase 1 (null = none): the learning-rate schedule follows
            whichever of steps and time runs out first, and phase 1 ends there. Set it to null for a
            run that depends on the seed only.
        black_fraction: share of phase-1 frames replaced by black frames.
        sequence_steps: phase-2 steps on 9-frame sequences.
        sequence_batch: sequences per phase-2 step.
        lr: phase-1 AdamW learning rate (50-step warm-up, cosine decay to 5%).
        sequence_lr: phase-2 learning rate (same schedule).
        kl_weight: weight of the KL term (per latent value, relative to the per-pixel reconstruction loss).
        hard_pixel_weight: weight of the worst pixels' reconstruction loss (:func:`vae_loss`; 0 = off). Set it
            when the scenes hold objects of a few pixels that the policy must see.
        hard_pixel_fraction: the share of each frame's pixels that counts as its worst.
        holdout_episodes: the last this-many episodes of every file are held out for the PSNR.
        max_episodes: read at most this many episodes per file or directory (tests).
        frame_stride: keep every this-many-th step of each episode (long, slowly changing episodes).
        eval_pairs: held-out image pairs for the PSNR.
        stats_sequences: training sequences encoded for the latent mean / std.
        seed: seeds initialisation, batches and posterior samples.
        threads: torch CPU threads.
        save_dtype: dtype of the stored weights (float16 halves the file; ``from_pretrained`` loads them
            as float32). The reported PSNR is measured with the rounded weights.
        scenes: what the frames show, for the saved README (default: the embodiment's name).
        overwrite: replace an existing output directory.

    Returns:
        the training record written to ``training.json``.
    """
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()
    output = Path(output)
    if output.exists() and not overwrite:
        raise CosmosPolicyError(f"{output} exists (pass --overwrite true to replace it)")
    emb = Embodiment.from_yaml(embodiment)
    src = Path(data)
    paths = sorted(src.rglob("*.hdf5")) + sorted(src.rglob("*.h5")) if src.is_dir() else (
        [src] if src.is_file() else sorted(Path().glob(data)))
    if not paths:
        raise DataError(f"{data}: no HDF5 files")
    train, held, holdout = load_frames(paths, emb.cameras, holdout_episodes, max_episodes, frame_stride)
    h, w = train.shape[1:3]
    if h % 8 or w % 8:
        raise DataError(f"{data}: frames are {h}x{w}; need multiples of 8")
    print(f"{len(train)} training frames, {len(held)} held-out frames ({h}x{w}) from {len(paths)} files", file=sys.stderr)

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = build_vae(base_dim, dim_mult, num_res_blocks, z_dim)
    n_params = sum(p.numel() for p in vae.parameters())
    record: dict = {"command": shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0].endswith("train_tiny_vae.py")
                    else None, "parameters": n_params, "train_frames": int(len(train)),
                    "heldout_frames": int(len(held)), "holdout": holdout, "files": [p.name for p in paths],
                    "scenes": scenes or emb.name, "image_size": f"{h}x{w}"}

    def run_phase(name: str, steps: int, make_batch, peak_lr: float, minutes: float | None = None) -> None:
        if steps <= 0:
            return
        opt = torch.optim.AdamW(vae.parameters(), lr=peak_lr, betas=(0.9, 0.99), weight_decay=0.0)
        vae.train()
        bar = tqdm(range(steps), desc=f"tiny VAE ({name})", dynamic_ncols=True)
        t0, mse_avg, done = time.perf_counter(), None, 0
        for step in bar:
            progress = step / steps
            if minutes:
                progress = max(progress, (time.perf_counter() - t0) / (60 * minutes))
            if progress >= 1:
                break
            for group in opt.param_groups:  # warm-up, then cosine to 5% of the peak
                group["lr"] = peak_lr * min(1.0, (step + 1) / 50) * (0.05 + 0.475 * (1 + math.cos(math.pi * progress)))
            loss, mse = vae_loss(vae, make_batch(), kl_weight, gen, hard_pixel_weight, hard_pixel_fraction)
            if not torch.isfinite(loss):
                raise CosmosPolicyError(f"tiny VAE: non-finite loss in phase {name}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            done += 1
            mse_avg = mse if mse_avg is None else 0.98 * mse_avg + 0.02 * mse
            bar.set_postfix(train_psnr=f"{10 * math.log10(4 / max(mse_avg, 1e-10)):.1f}dB")
        bar.close()
        vae.eval()
        record[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        record[f"{name}_steps"] = done

    def image_batch_fn():
        x = to_pixels(train[rng.integers(0, len(train), image_batch)])
        # Some black frames: every sequence the framework encodes starts with one (docs/method.md §1).
        x[rng.random(image_batch) < black_fraction] = -1.0
        return x[:, :, None]

    def sequence_batch_fn():
        i = rng.integers(0, len(train), (sequence_batch, 2))
        first = to_pixels(train[i[:, 0]])
        # A third of the sequences start with a black group, like the vector slots before a camera.
        first[rng.random(sequence_batch) < 1 / 3] = -1.0
        return sequence(first, to_pixels(train[i[:, 1]]))

    with single_frame_fast_path():
        run_phase("images", image_steps, image_batch_fn, lr, image_minutes)
    vae.eval()
    record["psnr_after_images"] = heldout_psnr(vae, held, eval_pairs)
    if sequence_steps > 0:
        before = {k: v.clone() for k, v in vae.state_dict().items()}
        run_phase("sequences", sequence_steps, sequence_batch_fn, sequence_lr)
        record["psnr_after_sequences"] = heldout_psnr(vae, held, eval_pairs)
        keep = record["psnr_after_sequences"]["sequence"] >= record["psnr_after_images"]["sequence"]
        if not keep or not math.isfinite(record["psnr_after_sequences"]["sequence"]):
            vae.load_state_dict(before)
        record["kept_phase"] = "sequences" if keep else "images"
    if save_dtype != "float32":
        # Round the weights as they will be stored, so the reported PSNR is the shipped model's.
        _cast(vae, save_dtype).float()
    record["psnr"] = heldout_psnr(vae, held, eval_pairs)

    mean, std = latent_stats(vae, train, stats_sequences, rng)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    record["latents_mean"], record["latents_std"] = mean, std
    record["train_seconds"] = round(time.perf_counter() - started, 1)
    record["threads"] = threads
    record["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__}
    _cast(vae, save_dtype)
    _save(vae, output, record, dict(base_dim=base_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks, z_dim=z_dim,
                                   image_steps=image_steps, image_batch=image_batch, image_minutes=image_minutes,
                                   sequence_steps=sequence_steps, sequence_batch=sequence_batch, lr=lr,
                                   sequence_lr=sequence_lr, kl_weight=kl_weight, black_fraction=black_fraction,
                                   hard_pixel_weight=hard_pixel_weight, hard_pixel_fraction=hard_pixel_fraction,
                                   seed=seed, save_dtype=save_dtype))
    p = record["psnr"]
    print(f"saved {output}: {n_params / 1e6:.2f} M parameters, held-out PSNR {p['sequence']:.2f} dB (sequence), "
          f"{p['display']:.2f} dB (display), {record['train_seconds']:.0f} s", file=sys.stderr)
    return record


def _cast(vae, dtype: str):
    """``vae.to(dtype)`` without diffusers' warning about float32-only modules (this VAE has none)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return vae.to(getattr(torch, dtype))
    finally:
        dlogging.set_verbosity(level)


def _save(vae, output: Path, record: dict, settings: dict) -> None:
    """save_pretrained into a temporary sibling directory, add training.json + README.md, rename."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        record["settings"] = settings
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(_readme(record, tmp))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _readme(r: dict, directory: Path) -> str:
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    s, p = r["settings"], r["psnr"]
    scenes = r.get("scenes", "Meta-World")  # records written before the option existed
    hard = (f" + {s['hard_pixel_weight']} x L1 + MSE of each frame's worst {s['hard_pixel_fraction']:.1%} of pixels"
            if s.get("hard_pixel_weight") else "")
    limits = ("- Limits: reconstructions are somewhat blurred; objects a few pixels wide in the corner view (the puck,\n"
              "  goal markers, the fingers) fade or vanish. Good enough to recognise predicted futures, not to judge\n"
              "  fine contacts." if not hard else
              "- Limits: reconstructions are somewhat blurred; the hard-pixel term keeps objects of 1-2 pixels (the\n"
              "  cube in the top camera) where they are, which the plain loss paints over.")
    return f"""# Tiny Wan VAE (trained on {scenes} frames)

A small `diffusers.AutoencoderKLWan` (same class as the Wan2.1 VAE: z_dim {s['z_dim']}, 8x spatial and
4x temporal compression, causal) for CPU work, where the real Wan2.1 VAE cannot be
downloaded. Trained by `tools/train_tiny_vae.py` on the camera frames of {', '.join(r['files']) if len(r['files']) <= 6 else str(len(r['files'])) + ' HDF5 files'}.
Not a general-purpose VAE: it only knows {scenes} scenes at {r.get('image_size', '64x64')}.

- Architecture: base_dim {s['base_dim']}, dim_mult {s['dim_mult']}, num_res_blocks {s['num_res_blocks']},
  no attention; {r['parameters'] / 1e6:.2f} M parameters stored as {s['save_dtype']} ({size / 2**20:.1f} MiB on disk;
  `from_pretrained` loads them as float32).
- Training: {r['train_frames']} frames; phase 1 {r.get('images_steps', 0)} steps x {s['image_batch']} single frames
  ({s['black_fraction']:.1%} of them black)
  (budget {s['image_steps']} steps / {s['image_minutes']} min, AdamW lr {s['lr']}), phase 2 {r.get('sequences_steps', 0)} steps
  x {s['sequence_batch']} sequences of 1 + 4 x 2 frames (black, 4 copies of an image or black, 4 copies of another
  image; lr {s['sequence_lr']}); kept: phase {r.get('kept_phase', 'images')}. L1 + MSE + {s['kl_weight']} x KL{hard},
  seed {s['seed']}.
  {r['train_seconds']:.0f} s in total on {r['threads']} CPU thread(s) (torch {r['versions']['torch']}, diffusers
  {r['versions']['diffusers']}).
- Held-out PSNR ({r['heldout_frames']} frames of the held-out episodes {sorted(r['holdout'].items())}, {p['pairs']} image pairs):
  **{p['sequence']:.2f} dB** in the framework's regime (encode [black, 4 x A, 4 x B], decode all 9 frames,
  PSNR of the 8 image frames), {p['display']:.2f} dB decoding [blank latent, latent of B] alone (how
  predicted futures are shown in TensorBoard), with the stored weights. After phase 1 alone:
  {r['psnr_after_images']['sequence']:.2f} dB.
{limits}
- `latents_mean` / `latents_std` in config.json: per-channel mean / std of the posterior mode of image
  latents of training frames in the sequence regime, so normalised latents have about zero mean and
  unit variance (as Wan2.1's).

Command:

```bash
{r['command'] or 'python tools/train_tiny_vae.py'}
```

`training.json` holds the full record (held-out episodes, per-phase times and PSNRs).
"""


if __name__ == "__main__":
    try:
        CLI(train_tiny_vae)
    except CosmosPolicyError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
