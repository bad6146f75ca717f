"""Full vs LoRA fine-tuning of the 2B on one GPU: peak memory and samples/s at batch 1, 4 and 16.

    python tools/benchmark_lora.py                                   # on a GPU: the 2B, random weights, ~10 min
    OMP_NUM_THREADS=1 python tools/benchmark_lora.py --device cpu --transformer tiny --image_size 32 \
        --batches 1,2 --steps 2 --warmup 1                            # CPU smoke check of the same path (~1 min)

Each row is a real Lightning ``fit`` of ``CosmosPolicyModule`` with the model settings of
``recipes/libero_lora.yaml`` (activation checkpointing, T5-width text padded to 512 tokens,
``bf16-mixed`` on a GPU, AdamW, gradient clipping), once with ``lora`` (rank 16, bf16 base) and once
without (full fine-tuning, fp32 master weights), on random latent batches of the LIBERO layout (9 latent
frames, 224 x 224: the latent cache's batches, so the VAE is not in the step), random weights (no Hub).
After ``--warmup`` steps, ``--steps`` steps are timed (``torch.cuda.synchronize`` around each);
peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (RSS high-water mark on CPU).
A configuration that does not fit prints ``OOM``. MFU uses the FLOPs per sample of
``tools/memory_model.py`` and the device's dense bf16 peak (``--peak_tflops``; H100 / H200 SXM: 989).
Compare with the computed table of ``tools/memory_model.py`` and docs/model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def latent_batches(emb, batch: int, n: int, text_dim: int, device: str) -> list[dict]:
    """``n`` random batches of the latent cache's contract (``latents`` instead of images)."""
    from cosmos_policy_lightning.layout import SequenceLayout

    layout = SequenceLayout.from_embodiment(emb)
    c, h, w = layout.latent_frame_shape
    g = torch.Generator().manual_seed(0)
    k, a, p = emb.action.chunk_size, emb.action.dim, emb.proprio.dim
    out = []
    for _ in range(n):
        out.append({
            "latents": torch.randn(batch, c, layout.num_latent_frames, h, w, generator=g),
            "proprio": torch.rand(batch, p, generator=g) * 2 - 1,
            "future_proprio": torch.rand(batch, p, generator=g) * 2 - 1,
            "actions": torch.rand(batch, k, a, generator=g) * 2 - 1,
            "value": torch.rand(batch, generator=g) * 2 - 1,
            "objective": torch.randint(0, 3, (batch,), generator=g),
            "success": torch.ones(batch, dtype=torch.bool), "score": torch.ones(batch),
            "text": torch.randn(batch, 20, text_dim, generator=g),
            "text_mask": torch.ones(batch, 20, dtype=torch.bool),
        })
    return out


def _rss_peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def run(method: str, batch: int, args) -> dict:
    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import Callback

    from benchmark_inference import synthetic_stats
    from cosmos_policy_lightning.embodiment import load_embodiment
    from cosmos_policy_lightning.inference_record import InferenceRecord
    from cosmos_policy_lightning.model.module import CosmosPolicyModule

    recipe = yaml.safe_load((REPO / "recipes" / "libero_lora.yaml").read_text())["model"]["init_args"]
    emb = load_embodiment(REPO / "embodiments" / "libero.yaml")
    if args.image_size:
        emb = load_embodiment({**emb.to_dict(), "image_size": [args.image_size, args.image_size]})
    gpu = args.device != "cpu"
    text_dim = 1024 if args.transformer == "cosmos-predict2-2b" else 384
    lora = dict(recipe["lora"]) if method == "lora" else None
    if lora is not None and not gpu:
        lora["base_dtype"] = "float32"  # CPU smoke: no bf16 autocast in 32-true
    times: list[float] = []

    class Measure(Callback):
        def on_train_batch_start(self, trainer, module, b, i):
            if gpu:
                torch.cuda.synchronize()
                if i == args.warmup:
                    torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, b, i):
            if gpu:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - self.start)

    module = CosmosPolicyModule(
        embodiment=emb.to_dict(), text_dim=text_dim, transformer=args.transformer, pretrained_transformer=None,
        vae={"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
             "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16},
        activation_checkpointing=True, image_log_every_n_steps=0, lora=lora, warmup_steps=1,
        learning_rate=recipe["learning_rate"], weight_decay=recipe["weight_decay"],
        inference_record=InferenceRecord(emb, synthetic_stats(emb), "t5:google-t5/t5-11b"))
    loader = torch.utils.data.DataLoader(latent_batches(emb, batch, args.warmup + args.steps, text_dim, args.device),
                                         batch_size=None)
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Measure()], default_root_dir=str(REPO / "runs" / "benchmark_lora"))
    row = {"method": method, "batch": batch, "transformer": args.transformer}
    try:
        trainer.fit(module, train_dataloaders=loader)
    except torch.cuda.OutOfMemoryError:
        return {**row, "oom": True}
    step = sum(times) / len(times)
    row.update(oom=False, step_s=step, samples_per_s=batch / step,
               trainable=sum(p.numel() for p in module.dit.parameters() if p.requires_grad),
               peak_gb=(torch.cuda.max_memory_allocated() / 1e9) if gpu else _rss_peak_gb())
    del trainer, module
    if gpu:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--transformer", default="cosmos-predict2-2b")
    parser.add_argument("--image_size", type=int, default=None, help="square image size (default: LIBERO's 224)")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU here: run with --device cpu --transformer tiny --image_size 32 for the smoke check")
    flops = None
    if args.transformer == "cosmos-predict2-2b" and not args.image_size:
        from memory_model import _meta_dit, train_flops

        flops = {"full": train_flops(_meta_dit(False), 9, 28), "lora": train_flops(_meta_dit(True), 9, 28)}
    rows = []
    for method in args.methods.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = run(method, batch, args)
            if flops and not row["oom"]:
                row["mfu"] = row["samples_per_s"] * flops[method] / (args.peak_tflops * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{args.transformer} on {device}, LIBERO layout, activation checkpointing, "
          f"{'bf16-mixed' if args.device == 'cuda' else '32-true'}:\n")
    print("| method | batch | peak memory (GB) | step (s) | samples/s | MFU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["oom"]:
            print(f"| {r['method']} | {r['batch']} | OOM | | | |")
        else:
            mfu = f"{100 * r['mfu']:.0f} %" if "mfu" in r else "-"
            print(f"| {r['method']} | {r['batch']} | {r['peak_gb']:.1f} | {r['step_s']:.3f} | "
                  f"{r['samples_per_s']:.2f} | {mfu} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
