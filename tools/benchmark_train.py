"""Training throughput: online VAE encoding vs the latent cache, Lightning vs a bare PyTorch loop, per
DiT config, the 2B model on a GPU, and the data stream from local vs remote (HTTP) shards.

    OMP_NUM_THREADS=1 python tools/benchmark_train.py                 # tiny and small models, CPU
    python tools/benchmark_train.py --gpu_2b true                        # + 2B model, LIBERO layout, when CUDA is present
    OMP_NUM_THREADS=1 python tools/benchmark_train.py --configs '[small]' --remote_data true  # + streamed shards

``--remote_data true`` converts the bundled Meta-World demonstrations (``samples/metaworld``), serves them
over HTTP from 127.0.0.1 (the standard library's server, in this process; ``--latency_ms`` delays every
response, like a far object store) and times the data module's training stream -- shard reading, JPEG
decoding, augmentation, batching, with the integrity checks -- from the local folder and from the URL
(``storage.py``). Streaming does not starve the step when its samples/s stays above the step's.

"From latent cache" runs the same steps on batches whose images were replaced by their VAE latents
(what ``data/latent_cache.py`` stores), so the difference is the VAE's share of an online step.

Both loops run the same ``CosmosPolicyModule`` on the same in-memory batches (batch contract of
``data/datamodule.py``, random images and vectors): VAE encode of the whole pixel sequence, injection,
noising, DiT forward / backward, per-modality L1s, gradient clipping, AdamW, LR schedule. The ratio
``bare / Lightning`` of samples/s is the framework's overhead (target <= 1.05).

For the 2B model (random init: no hub access needed) it prints samples/s per GPU and the model FLOP
utilisation (6 x parameters x tokens per sample, over the GPU's dense bf16 peak); target >= 12 samples/s
on one H100 for the LIBERO layout. The VAE is a random Wan2.1-sized ``AutoencoderKLWan`` (same cost).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from cosmos_policy_lightning.embodiment import Embodiment  # noqa: E402
from cosmos_policy_lightning.model.module import CosmosPolicyModule  # noqa: E402
from cosmos_policy_lightning.model.schedule import lr_multiplier  # noqa: E402
from cosmos_policy_lightning.model.sequence import encode_pixel_sequence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
WAN21_SIZED_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                   "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}


def make_batches(emb: Embodiment, n: int, batch_size: int, text_len: int, text_dim: int, seed: int = 0):
    """``n`` random batches following the data module's batch contract."""
    g = torch.Generator().manual_seed(seed)
    h, w = emb.image_size
    cams, k, a, p = emb.num_cameras, emb.action.chunk_size, emb.action.dim, emb.proprio.dim
    out = []
    for _ in range(n):
        out.append({
            "images": torch.randint(0, 256, (batch_size, cams, h, w, 3), generator=g, dtype=torch.uint8),
            "future_images": torch.randint(0, 256, (batch_size, cams, h, w, 3), generator=g, dtype=torch.uint8),
            "proprio": torch.rand(batch_size, p, generator=g) * 2 - 1,
            "future_proprio": torch.rand(batch_size, p, generator=g) * 2 - 1,
            "actions": torch.rand(batch_size, k, a, generator=g) * 2 - 1,
            "value": torch.rand(batch_size, generator=g) * 2 - 1,
            "objective": torch.randint(0, 3, (batch_size,), generator=g),
            "success": torch.ones(batch_size, dtype=torch.bool),
            "score": torch.ones(batch_size),
            "text": torch.randn(batch_size, text_len, text_dim, generator=g),
            "text_mask": torch.ones(batch_size, text_len, dtype=torch.bool),
        })
    return out


def build_module(emb: Embodiment, transformer: str, vae, text_dim: int, checkpointing: bool = False,
                 device: str = "cpu"):
    torch.manual_seed(0)
    with torch.device(device):  # initialise the 2B model directly on the GPU (seconds, not minutes)
        m = CosmosPolicyModule(embodiment=emb.to_dict(), text_dim=text_dim, transformer=transformer, vae=vae,
                               image_log_every_n_steps=0, warmup_steps=10, activation_checkpointing=checkpointing)
        m.configure_model()
    return m


def bare_loop(module: CosmosPolicyModule, batches, device: str, dtype: torch.dtype | None) -> float:
    """The same work as ``training_step`` + Lightning's optimisation, by hand. Returns seconds."""
    module.to(device)
    module.train()
    h = module.hparams
    opt = torch.optim.AdamW(module.dit.parameters(), lr=h.learning_rate, betas=tuple(h.betas), eps=h.eps,
                            weight_decay=h.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, h.warmup_steps, h.decay_steps, 10_000))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = None
    for i, batch in enumerate(batches):
        if i == 1:  # the first step warms up allocators and kernels in both loops
            sync()
            t0 = time.perf_counter()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            x0, x0_pred, loss, obj = module._noised_step(batch)
            with torch.no_grad():
                l1 = {name: v.mean().item() for name, v in module._l1_by_objective(x0, x0_pred, obj)}
        loss_value = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.dit.parameters(), h.grad_clip_norm)
        opt.step()
        sched.step()
        del l1, loss_value
    sync()
    return time.perf_counter() - t0


class _Timer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def lightning_loop(module: CosmosPolicyModule, batches, device: str, precision: str) -> float:
    timer = _Timer()
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=len(batches), precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[timer])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def cached_batches(module: CosmosPolicyModule, batches, device: str, dtype) -> list[dict]:
    """The same batches as the latent cache delivers them: VAE latents instead of images (vector
    frames left to the model), encoded once here exactly as ``data/latent_cache.py`` does."""
    module.to(device)
    out = []
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        for batch in batches:
            latents = encode_pixel_sequence(module.layout, module.vae, batch["images"].to(device),
                                            batch["future_images"].to(device)).float().cpu()
            rest = {k: v for k, v in batch.items() if k not in ("images", "future_images")}
            out.append({**rest, "latents": latents})
    return out


def compare(emb: Embodiment, transformer: str, vae, steps: int, batch_size: int, text_dim: int, device: str,
            precision: str, dtype, checkpointing: bool, repeats: int, bare: bool = True) -> dict:
    """Best-of-``repeats`` samples/s of: Lightning with online VAE encoding, Lightning from cached latents,
    and (``bare``) a bare PyTorch loop with online encoding; runs interleaved so drift hits all alike."""
    batches = make_batches(emb, steps + 1, batch_size, 16, text_dim)
    module = build_module(emb, transformer, vae, text_dim, device=device)
    latent_batches = cached_batches(module, batches, device, dtype)
    x = torch.zeros(1, 16, module.layout.num_latent_frames, *module.layout.latent_frame_shape[1:])
    flops_per_sample, params = module._estimate_flops(x, 16), sum(p.numel() for p in module.dit.parameters())
    del module
    samples = steps * batch_size
    rates = {"lightning": [], "cached": [], "bare": []}
    for _ in range(repeats):
        if bare:
            rates["bare"].append(samples / bare_loop(build_module(emb, transformer, vae, text_dim, checkpointing,
                                                                 device), batches, device, dtype))
        rates["lightning"].append(samples / lightning_loop(build_module(emb, transformer, vae, text_dim,
                                                                        checkpointing, device), batches, device,
                                                           precision))
        rates["cached"].append(samples / lightning_loop(build_module(emb, transformer, vae, text_dim,
                                                                     checkpointing, device), latent_batches, device,
                                                        precision))
    best = {k: max(v) if v else float("nan") for k, v in rates.items()}
    return {**best, "ratio": best["bare"] / best["lightning"], "flops_per_sample": flops_per_sample,
            "vae_fraction": 1 - best["lightning"] / best["cached"], "params": params}


def _report(name: str, r: dict, peak: float | None = None) -> None:
    mfu = (lambda rate: f"   MFU {rate * r['flops_per_sample'] / peak:6.1%}") if peak else (lambda rate: "")
    print(f"  {name}: {r['params'] / 1e6:.2f} M DiT parameters")
    print(f"    online VAE encoding  {r['lightning']:8.2f} samples/s{mfu(r['lightning'])}")
    print(f"    from latent cache    {r['cached']:8.2f} samples/s{mfu(r['cached'])}   "
          f"(x{r['cached'] / r['lightning']:.1f}; the VAE takes {r['vae_fraction']:.0%} of an online step)")
    if r["bare"] == r["bare"]:  # not NaN
        print(f"    bare PyTorch, online {r['bare']:8.2f} samples/s   ratio bare / Lightning = {r['ratio']:.3f} "
              f"(target <= 1.05)")


def _serve(folder: Path, latency_ms: float) -> str:
    """Serve ``folder`` over HTTP on 127.0.0.1 in a daemon thread, each response ``latency_ms`` late."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            time.sleep(latency_ms / 1000.0)
            return super().send_head()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a loader dropped mid-shard when a case ends resets its connection: not news

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def stream_rate(data_dir: str, batches: int, batch_size: int, workers: int) -> float:
    """Samples/s of the data module's training stream (after one warm-up batch) from ``data_dir``."""
    from cosmos_policy_lightning.data.datamodule import CosmosDataModule

    dm = CosmosDataModule(data_dir, batch_size=batch_size, num_workers=workers, latent_cache=False, shuffle_buffer=200)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def compare_streams(batches: int, batch_size: int, workers: int, latency_ms: float, step_rate: float | None) -> None:
    """Print the training stream's samples/s from local shards and from the same shards over HTTP."""
    import tempfile

    from cosmos_policy_lightning.data.convert import convert

    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        convert(str(REPO / "samples" / "metaworld"), output=f"{tmp}/ds", embodiment=str(REPO / "embodiments" / "metaworld.yaml"),
                format="robomimic", val_fraction=0.15, text_encoder="minilm", progress=False)
        rows = [("local folder", f"{tmp}/ds"), ("http://127.0.0.1", _serve(Path(tmp), 0.0) + "/ds")]
        if latency_ms:
            rows.append((f"http://127.0.0.1 + {latency_ms:g} ms per request", _serve(Path(tmp), latency_ms) + "/ds"))
        print(f"Data stream, Meta-World sample shards (64x64, 2 cameras, JPEG decode + augmentation), batch "
              f"{batch_size}, {workers} loader worker(s), {batches} batches:")
        local = None
        for name, where in rows:
            rate = stream_rate(where, batches, batch_size, workers)
            local = local or rate
            line = f"  {name:<40} {rate:7.1f} samples/s  ({rate / local:.2f} x local)"
            if step_rate:
                line += f", {rate / step_rate:.1f} x the training step's {step_rate:.1f} samples/s"
            print(line, flush=True)


def main(steps: int = 30, batch_size: int = 16, repeats: int = 2, configs: list[str] = ("tiny", "small"),
         gpu_2b: bool = False, gpu_batch_size: int = 16, remote_data: bool = False, latency_ms: float = 20.0,
         stream_batches: int = 40, stream_workers: int = 1) -> None:
    """Print training samples/s with online VAE encoding and from the latent cache, per DiT config,
    with Lightning vs a bare loop for the overhead, and for the 2B model on a GPU.

    Args:
        steps: timed optimisation steps per run (one more warms up).
        batch_size: samples per batch for the CPU configs.
        repeats: runs of each loop, interleaved; the best of each is reported.
        configs: CPU-sized DiT configs to measure (``model/dit.py``).
        gpu_2b: also measure the 2B model on CUDA (LIBERO layout, 224x224, Wan2.1-sized VAE).
        gpu_batch_size: samples per batch for the 2B model.
        remote_data: also time the data stream from local vs HTTP-served shards (module docstring), next
            to the last CPU config's training samples/s with online VAE encoding (the step that consumes
            pixel batches).
        latency_ms: added delay per HTTP request of the second remote case (0: only the plain one).
        stream_batches: batches timed per data-stream case.
        stream_workers: data-loader worker processes of the data-stream cases.
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mw = Embodiment.from_yaml(REPO / "embodiments" / "metaworld.yaml")
    vae = str(REPO / "assets" / "tiny_wan_vae") if (REPO / "assets" / "tiny_wan_vae").is_dir() else TINY_VAE
    print(f"Meta-World layout (64x64, 2 cameras, 9 latent frames), tiny Wan VAE, batch {batch_size}, CPU "
          f"{torch.get_num_threads()} thread(s):")
    step_rate = None
    for name in configs:
        r = compare(mw, name, vae, steps, batch_size, 384, "cpu", "32-true", None, False, repeats,
                    bare=name == "tiny")
        _report(name, r)
        step_rate = r["lightning"]
    if remote_data:
        compare_streams(stream_batches, batch_size, stream_workers, latency_ms, step_rate)

    if gpu_2b:
        if not torch.cuda.is_available():
            print("2B model: skipped (no CUDA device)")
            return
        from lightning.fabric.utilities.throughput import get_available_flops

        libero = Embodiment.from_yaml(REPO / "embodiments" / "libero.yaml")
        r = compare(libero, "cosmos-predict2-2b", WAN21_SIZED_VAE, max(5, steps // 3), gpu_batch_size,
                    1024, "cuda", "bf16-mixed", torch.bfloat16, True, 1, bare=False)
        print(f"2B model, LIBERO layout (224x224, 2 cameras, 9 latent frames), Wan2.1-sized VAE, batch "
              f"{gpu_batch_size}, {torch.cuda.get_device_name()}, bf16, activation checkpointing:")
        _report("cosmos-predict2-2b", r, get_available_flops(torch.device("cuda"), torch.bfloat16))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
