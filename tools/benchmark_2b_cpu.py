"""The 2B path runs here: one real optimizer step of the 2B LIBERO recipe on CPU, and the memory / FLOPs
table of the reference runs computed from the model. A benchmark, not a test (minutes, ~14 GB of RAM).

    OMP_NUM_THREADS=1 python tools/benchmark_2b_cpu.py                # table, then the 2-process step
    OMP_NUM_THREADS=1 python tools/benchmark_2b_cpu.py --table_only true

**The step.** ``CosmosPolicyModule`` with the model settings of ``recipes/libero.yaml`` (Cosmos-Predict2-2B
DiT, activation checkpointing on every block, T5-width text padded to 512 tokens, a Wan2.1-sized VAE),
LIBERO layout (9 latent frames, 224 x 224, 2 cameras), one sample per process, under Lightning's
``ModelParallelStrategy``: FSDP2 over 2 CPU processes talking gloo, ``bf16-true`` (bf16 parameters,
gradients and activations). Weights are random (no Hub access; the arithmetic is the same). AdamW's two
moments would add 2 x 1.96 B values (7.8 GB in bf16 for the 2 processes, 15.7 GB with fp32 master
weights) to a step that already needs ~12 GB of a 24 GB machine shared with other work, so the step uses
SGD without momentum (no optimizer state) unless ``--optimizer adamw``; ``auto`` picks AdamW only when the
free memory allows it. Each process prints its step time (forward, backward, optimizer step) and peak
resident memory (``VmHWM``, reset at the start of the step, and over the whole run).

**The table.** From the 2B model on the meta device: parameters; FLOPs per sample counted by
``torch.utils.flop_counter.FlopCounterMode`` (forward, forward + backward, + the recomputed forward of
activation checkpointing); activation bytes per sample from the tensors autograd saves (``saved_tensors_hooks``,
bf16, block by block); then memory per GPU under the recipes' HSDP (fp32 master weights, fp32 gradients
and AdamW moments sharded over the 8 GPUs of a node, bf16 compute) at the paper's global batch sizes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3
H100_BYTES = 80e9            # H100 80GB (SXM): usable HBM
H100_BF16_FLOPS = 989e12     # dense bf16 peak
RUNS = [  # (name, embodiment, global batch, GPUs): the paper's settings (LIBERO 64 GPUs, ALOHA 8) and LIBERO on 8
    ("LIBERO", "libero", 1920, 64),
    ("LIBERO", "libero", 1920, 8),
    ("ALOHA", "aloha", 200, 8),
]


# ------------------------------------------------------------------------------------- from the model


def _meta_dit():
    from cosmos_policy_lightning.model.dit import VideoDiT

    with torch.device("meta"):
        dit = VideoDiT("cosmos-predict2-2b")
    return dit.to(torch.bfloat16)


def _meta_inputs(frames: int, latent_hw: int, batch: int = 1):
    x = torch.empty(batch, 16, frames, latent_hw, latent_hw, device="meta", dtype=torch.bfloat16)
    t = torch.empty(batch, frames, device="meta")
    cond = torch.zeros(batch, frames, dtype=torch.bool, device="meta")
    text = torch.empty(batch, 512, 1024, device="meta", dtype=torch.bfloat16)   # T5, padded to 512 tokens
    return x, t, cond, text


def flops_per_sample(frames: int, latent_hw: int) -> dict[str, float]:
    """Forward and forward + backward FLOPs of one sample (FlopCounterMode, meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    dit = _meta_dit()
    x, t, cond, text = _meta_inputs(frames, latent_hw)
    with FlopCounterMode(display=False) as fwd:
        out = dit(x, t, cond, text, None)
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return {"forward": f, "backward": b, "train": f + b + f}  # + the recomputed forward of checkpointing


class _FlashAttentionSaves(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` while activations are counted: saves what flash
    attention saves on an H100 (q, k, v, output and a float32 log-sum-exp per query), where the meta
    device's math attention would save float32 copies and the (heads, queries, keys) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: only the forward's saved tensors are counted
        raise NotImplementedError


def activation_bytes_per_sample(frames: int, latent_hw: int, dit=None) -> dict[str, float]:
    """Bytes autograd saves for backward, per sample, bf16 compute: per block, outside the blocks, and a
    block's input (what activation checkpointing keeps instead).

    Counted from the storages of the tensors autograd saves in a meta-device forward (each storage once,
    whatever views of it are saved). Weights saved by matmuls (and their transposed views) are
    parameters, not activations, and are left out; attention saves what flash attention saves.
    ``dit``: a meta-device DiT to count (default: the plain 2B; ``tools/memory_model.py`` passes a LoRA one).
    """
    dit = _meta_dit() if dit is None else dit
    x, t, cond, text = _meta_inputs(frames, latent_hw)
    tokens = frames * (latent_hw // 2) ** 2
    current = {"where": "outside"}
    totals: dict[str, float] = {"outside": 0.0}
    seen: set[int] = set()
    weight_shapes = {tuple(p.shape) for p in dit.parameters()} | {tuple(p.shape[::-1]) for p in dit.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()   # views share it: count each storage once
        if storage._cdata not in seen and not (tensor.dim() == 2 and tuple(tensor.shape) in weight_shapes):
            seen.add(storage._cdata)
            totals[current["where"]] = totals.get(current["where"], 0.0) + storage.nbytes()
        return tensor

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FlashAttentionSaves.apply(query, key, value)

    handles = []
    for i, block in enumerate(dit.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: current.update(where=f"block{i}")))
        handles.append(block.register_forward_hook(lambda m, a, o: current.update(where="outside")))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            dit(x, t, cond, text, None)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    blocks = [v for k, v in totals.items() if k.startswith("block")]
    return {"per_block": max(blocks), "outside": totals["outside"], "num_blocks": len(blocks),
            "block_input": tokens * 2048 * 2, "tokens": tokens}


def memory_table() -> list[dict]:
    from cosmos_policy_lightning.embodiment import load_embodiment
    from cosmos_policy_lightning.layout import SequenceLayout

    dit = _meta_dit()
    n_params = sum(p.numel() for p in dit.parameters())
    block_params = sum(p.numel() for p in dit.blocks[0].parameters())
    rows = []
    cache: dict[int, tuple] = {}
    for name, emb_name, global_batch, gpus in RUNS:
        layout = SequenceLayout.from_embodiment(load_embodiment(REPO / "embodiments" / f"{emb_name}.yaml"))
        frames = layout.num_latent_frames
        latent_hw = layout.latent_frame_shape[1]
        if frames not in cache:
            cache[frames] = (flops_per_sample(frames, latent_hw), activation_bytes_per_sample(frames, latent_hw))
        flops, act = cache[frames]
        shard = min(gpus, 8)   # HSDP: sharded within a node of 8, replicated across nodes
        params = 4 * n_params / shard
        grads = 4 * n_params / shard
        optim = 8 * n_params / shard
        gathered = 2 * 2 * block_params   # bf16 copies of the current and the prefetched block
        # per sample with checkpointing: every block's input + what runs outside the blocks + one block's
        # saved tensors while it is recomputed and back-propagated
        per_sample = act["num_blocks"] * act["block_input"] + act["outside"] + act["per_block"]
        per_gpu = math.ceil(global_batch / gpus)
        fixed = params + grads + optim + gathered
        fits = max(1, int((0.9 * H100_BYTES - fixed) // per_sample))
        accumulation = math.ceil(per_gpu / fits)          # gradient accumulation when a GPU's share does not fit
        micro = math.ceil(per_gpu / accumulation)
        rows.append({
            "run": f"{name} ({frames} latent frames, {act['tokens']} tokens)", "gpus": gpus,
            "global_batch": global_batch, "per_gpu": per_gpu, "micro_batch": micro, "accumulation": accumulation,
            "params_gb": params / 1e9, "grads_gb": grads / 1e9, "optimizer_gb": optim / 1e9,
            "gathered_gb": gathered / 1e9, "activations_gb": micro * per_sample / 1e9,
            "total_gb": (fixed + micro * per_sample) / 1e9,
            "flops_forward": flops["forward"], "flops_train": flops["train"],
            "step_s_at_40pct": per_gpu * flops["train"] / (0.4 * H100_BF16_FLOPS),
            "n_params": n_params, "per_sample_gb": per_sample / 1e9,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    n = rows[0]["n_params"]
    print(f"\nCosmos-Predict2-2B DiT: {n / 1e9:.3f} B parameters. HSDP over the 8 GPUs of a node (recipes/*.yaml): "
          f"fp32 master weights, fp32 gradients, AdamW moments fp32, bf16 compute, checkpointing on every block.")
    print("Memory per GPU (GB, 1e9 bytes) and FLOPs per sample, computed from the model:\n")
    head = ("| run | H100s | global batch | per GPU | micro-batch x accumulation | params | grads | AdamW "
            "| bf16 gathered blocks | activations | total | FLOPs/sample fwd | FLOPs/sample train | "
            "step at 40 % MFU |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r['run']} | {r['gpus']} | {r['global_batch']} | {r['per_gpu']} | {r['micro_batch']} x "
              f"{r['accumulation']} | {r['params_gb']:.2f} | {r['grads_gb']:.2f} | {r['optimizer_gb']:.2f} | "
              f"{r['gathered_gb']:.2f} | {r['activations_gb']:.1f} ({r['per_sample_gb']:.3f}/sample) | "
              f"{r['total_gb']:.1f} | {r['flops_forward'] / 1e12:.1f} T | {r['flops_train'] / 1e12:.1f} T | "
              f"{r['step_s_at_40pct']:.1f} s |")
    print("\n'train' = forward + backward + the forward recomputed by activation checkpointing. Activations: the "
          "storages autograd saves (flash attention), every block's input plus one block being recomputed; "
          "allocator fragmentation and backward temporaries come on top.")


# ------------------------------------------------------------------------------------------ the step


def _vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _reset_peak() -> None:
    try:  # "5" resets the peak resident set size of this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def free_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def run_step(optimizer: str, batch_size: int, transformer: str, image_size: int | None) -> None:
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy

    from benchmark_train import WAN21_SIZED_VAE, make_batches
    from benchmark_inference import synthetic_stats
    from cosmos_policy_lightning.embodiment import load_embodiment
    from cosmos_policy_lightning.inference_record import InferenceRecord
    from cosmos_policy_lightning.model.module import CosmosPolicyModule

    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "libero.yaml").read_text())["model"]["init_args"]
    emb = load_embodiment(REPO / "embodiments" / "libero.yaml")
    if image_size is not None:   # a smaller check of the same path (not the benchmark)
        emb = load_embodiment({**emb.to_dict(), "image_size": [image_size, image_size]})

    class Step(CosmosPolicyModule):
        def configure_optimizers(self):
            params = [p for p in self.dit.parameters() if p.requires_grad]
            if optimizer == "adamw":
                return torch.optim.AdamW(params, lr=recipe["learning_rate"], betas=tuple(recipe["betas"]),
                                         eps=recipe["eps"], weight_decay=recipe["weight_decay"])
            return torch.optim.SGD(params, lr=recipe["learning_rate"])

    class Measure(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rss_before = _vm_hwm_gb()
            _reset_peak()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seconds = time.perf_counter() - self.start
            row = {"rank": trainer.global_rank, "step_s": seconds, "step_peak_gb": _vm_hwm_gb(),
                   "run_peak_gb": max(self.rss_before, _vm_hwm_gb()), "loss": float(outputs["loss"])
                   if isinstance(outputs, dict) else float(outputs),
                   "params_local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                       for p in pl_module.dit.parameters()),
                   "dtype": str(next(pl_module.dit.parameters()).dtype).replace("torch.", "")}
            rows = [None] * trainer.world_size
            dist.all_gather_object(rows, row)
            if trainer.global_rank == 0:
                print(f"\nOne optimizer step, LIBERO recipe with the {transformer} DiT, {emb.image_size[0]}x"
                      f"{emb.image_size[1]} images, CPU, FSDP2 over 2 gloo processes, bf16-true, activation "
                      f"checkpointing, {optimizer.upper()}, {batch_size} sample(s) per process:")
                for r in rows:
                    print(f"  rank {r['rank']}: step {r['step_s']:.1f} s, peak RSS during the step "
                          f"{r['step_peak_gb']:.2f} GB, peak RSS of the process {r['run_peak_gb']:.2f} GB, "
                          f"local parameters {r['params_local'] / 1e9:.3f} B ({r['dtype']}), loss {r['loss']:.4f}")

    module = Step(embodiment=emb.to_dict(), text_dim=1024, transformer=transformer, pretrained_transformer=None,
                  vae=WAN21_SIZED_VAE, activation_checkpointing=recipe["activation_checkpointing"],
                  image_log_every_n_steps=0,
                  # the reference's padded T5 text (recipes use T5-11B, 1024-d)
                  inference_record=InferenceRecord(emb, synthetic_stats(emb), "t5:google-t5/t5-11b"))
    batches = make_batches(emb, 1, batch_size, text_len=20, text_dim=1024)
    batches[0]["objective"][:] = 0                           # the policy objective
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2, process_group_backend="gloo",
                                     save_distributed_checkpoint=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-true", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Measure()],
                        default_root_dir=str(REPO / "runs" / "benchmark_2b_cpu"))
    trainer.fit(module, train_dataloaders=loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table_only", default="false", choices=["true", "false"])
    parser.add_argument("--optimizer", default="auto", choices=["auto", "sgd", "adamw"])
    parser.add_argument("--batch_size", type=int, default=1, help="samples per process")
    parser.add_argument("--min_free_gb", type=float, default=18.0, help="abort the step below this free memory")
    parser.add_argument("--transformer", default="cosmos-predict2-2b", help="(tiny: a quick check of the path)")
    parser.add_argument("--image_size", type=int, default=None, help="(a quick check of the path)")
    args = parser.parse_args()
    launched = "LOCAL_RANK" in os.environ      # Lightning re-runs this script for rank 1: skip the table there
    if not launched:
        print_table(memory_table())
        if args.table_only == "true":
            return
        free = free_memory_gb()
        print(f"\nfree memory: {free:.1f} GiB")
        if free < args.min_free_gb:
            sys.exit(f"error: {free:.1f} GiB free, the 2-process step needs {args.min_free_gb} GiB; not started")
    optimizer = args.optimizer
    if optimizer == "auto":
        # AdamW's bf16 moments: 2 x 2 bytes x 1.96 B parameters over the two processes, on top of ~12 GB
        optimizer = "adamw" if free_memory_gb() > 12 + 8 + 4 else "sgd"
        os.environ["BENCHMARK_2B_OPTIMIZER"] = os.environ.get("BENCHMARK_2B_OPTIMIZER", optimizer)
        optimizer = os.environ["BENCHMARK_2B_OPTIMIZER"]   # rank 1 follows rank 0's choice
    run_step(optimizer, args.batch_size, args.transformer, args.image_size)


if __name__ == "__main__":
    main()
