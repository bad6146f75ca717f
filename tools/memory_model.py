"""Memory per GPU of fine-tuning the 2B on one GPU, full vs LoRA, computed from the model (no GPU needed).

    OMP_NUM_THREADS=1 python tools/memory_model.py            # ~1 minute on the CPU, no weights allocated

For the LIBERO (2 cameras, 9 latent frames, 1764 tokens) and ALOHA (3 cameras, 11 latent frames, 2156
tokens) layouts at 224 x 224, T5 text padded to 512 tokens, activation checkpointing on every block:

- **parameters / gradients / optimizer** from the parameter counts of the 2B DiT built on the meta
  device, with peft's adapters added for LoRA (``model/lora.py``, the recipe's rank 16, alpha 16, attention
  + MLP, ``patch_embed.proj`` and ``proj_out`` trained fully):

  | method | weights | gradients | AdamW moments | other |
  |---|---|---|---|---|
  | full, ``bf16-mixed`` | fp32 (4 B/param) | fp32 (4) | fp32 (8) | autocast's bf16 weight copies (2) |
  | full, ``bf16-true`` | bf16 (2) | bf16 (2) | bf16 (4) | -- |
  | LoRA, ``bf16-mixed`` | base bf16 (2) + trainable fp32 (4) | trainable fp32 (4) | trainable fp32 (8) | -- |

  plus the frozen Wan2.1 VAE (fp32, 127 M parameters) that the module holds on the GPU;
- **activations per sample**: the storages autograd saves in a meta-device forward (flash attention's
  saves, ``tools/benchmark_2b_cpu.py``), every block's input plus one block recomputed, for the model as
  it trains (for LoRA: peft's layers, frozen base, so a frozen matmul saves no input for a weight gradient);
- **serving weights** of the 2B in bf16 with and without T5-11B's encoder (built on the meta device);
- **FLOPs per training sample** (``FlopCounterMode``: forward + backward + the recomputed forward): the
  frozen base needs no weight gradients, so LoRA's backward is cheaper.

The largest micro-batch per card is ``(0.9 x card - fixed) / activations per sample``; CUDA context,
cuBLAS workspace and allocator fragmentation (~1-3 GB in practice) come on top, which the 10 % margin is
meant to cover. ``tools/benchmark_lora.py`` measures the same on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYOUTS = (("LIBERO", "libero"), ("ALOHA", "aloha"))
CARDS_GB = (24, 48, 80)
METHODS = ("full bf16-mixed", "full bf16-true", "LoRA r16")


def _meta_dit(lora: bool):
    from cosmos_policy_lightning.model.dit import VideoDiT
    from cosmos_policy_lightning.model.lora import LoraSettings, add_lora

    with torch.device("meta"):
        dit = VideoDiT("cosmos-predict2-2b")
        if lora:
            add_lora(dit.transformer, LoraSettings())
    # computed in bf16 as under autocast (peft would otherwise cast activations to its fp32 adapter weights)
    return dit.to(torch.bfloat16)


def _inputs(frames: int, latent_hw: int):
    x = torch.empty(1, 16, frames, latent_hw, latent_hw, device="meta", dtype=torch.bfloat16, requires_grad=False)
    t = torch.empty(1, frames, device="meta")
    cond = torch.zeros(1, frames, dtype=torch.bool, device="meta")
    text = torch.empty(1, 512, 1024, device="meta", dtype=torch.bfloat16)
    return x, t, cond, text


def activation_bytes(dit, frames: int, latent_hw: int) -> dict[str, float]:
    """Per sample with activation checkpointing: every block's input, what one block saves while it is
    recomputed, and what is saved outside the blocks (bf16; counted by ``tools/benchmark_2b_cpu.py``)."""
    from benchmark_2b_cpu import activation_bytes_per_sample

    a = activation_bytes_per_sample(frames, latent_hw, dit)
    return {"per_sample": a["num_blocks"] * a["block_input"] + a["outside"] + a["per_block"], "tokens": a["tokens"]}


def train_flops(dit, frames: int, latent_hw: int) -> float:
    """Forward + backward + recomputed forward FLOPs of one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, cond, text = _inputs(frames, latent_hw)
    with FlopCounterMode(display=False) as fwd:
        out = dit(x, t, cond, text, None)
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    return 2 * fwd.get_total_flops() + bwd.get_total_flops()


def vae_parameters() -> int:
    from benchmark_train import WAN21_SIZED_VAE
    from cosmos_policy_lightning.model.vae import VideoVAE

    with torch.device("meta"):
        return sum(p.numel() for p in VideoVAE(WAN21_SIZED_VAE).parameters())


def memory_rows() -> list[dict]:
    from cosmos_policy_lightning.embodiment import load_embodiment
    from cosmos_policy_lightning.layout import SequenceLayout

    full, lora = _meta_dit(False), _meta_dit(True)
    n = sum(p.numel() for p in full.parameters())
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    base = sum(p.numel() for name, p in lora.named_parameters() if not p.requires_grad)
    vae = 4 * vae_parameters()
    states = {  # bytes: (weights, gradients, optimizer, other)
        "full bf16-mixed": (4 * n, 4 * n, 8 * n, 2 * n + vae),
        "full bf16-true": (2 * n, 2 * n, 4 * n, vae),
        "LoRA r16": (2 * base + 4 * trainable, 4 * trainable, 8 * trainable, vae),
    }
    rows = []
    for name, emb_name in LAYOUTS:
        layout = SequenceLayout.from_embodiment(load_embodiment(REPO / "embodiments" / f"{emb_name}.yaml"))
        frames, hw = layout.num_latent_frames, layout.latent_frame_shape[1]
        acts = {"full": activation_bytes(_meta_dit(False), frames, hw),
                "lora": activation_bytes(_meta_dit(True), frames, hw)}
        flops = {"full": train_flops(_meta_dit(False), frames, hw), "lora": train_flops(_meta_dit(True), frames, hw)}
        for method in METHODS:
            kind = "lora" if method.startswith("LoRA") else "full"
            weights, grads, optim, other = states[method]
            fixed = weights + grads + optim + other
            per = acts[kind]["per_sample"]
            rows.append({
                "layout": f"{name} ({frames} latent frames, {acts[kind]['tokens']} tokens)", "method": method,
                "weights_gb": weights / 1e9, "grads_gb": grads / 1e9, "optimizer_gb": optim / 1e9,
                "other_gb": other / 1e9, "fixed_gb": fixed / 1e9, "activations_per_sample_gb": per / 1e9,
                "total_gb": {b: (fixed + b * per) / 1e9 for b in (1, 4, 16)},
                "max_micro_batch": {c: max(0, int((0.9 * c * 1e9 - fixed) // per)) for c in CARDS_GB},
                "train_tflops_per_sample": flops[kind] / 1e12,
                "trainable": n if kind == "full" else trainable, "parameters": n,
            })
    return rows


def checkpoint_sizes(rows: list[dict]) -> dict[str, float]:
    """Bytes of a checkpoint's weights: full (fp32 DiT + AdamW moments for resuming) vs LoRA (fp32 adapter +
    modules_to_save + their AdamW moments)."""
    n, t = rows[0]["parameters"], next(r["trainable"] for r in rows if r["method"].startswith("LoRA"))
    return {"full_weights_gb": 4 * n / 1e9, "full_with_adamw_gb": 12 * n / 1e9,
            "lora_weights_mb": 4 * t / 1e6, "lora_with_adamw_mb": 12 * t / 1e6, "merged_gb": 4 * n / 1e9}


def t5_11b_encoder_parameters() -> int:
    """T5-11B's encoder (``google-t5/t5-11b``: d_model 1024, d_ff 65536, 24 layers, 128 heads x 128), on meta."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=1024, d_ff=65536, num_layers=24, num_heads=128, d_kv=128, vocab_size=32128,
                      feed_forward_proj="relu")
    with torch.device("meta"):
        return sum(p.numel() for p in T5EncoderModel(config).parameters())


def serving_weights(rows: list[dict]) -> dict[str, float]:
    """GB of weights to serve the 2B in bf16 (DiT + VAE), without and with T5-11B's encoder (bf16 / fp32).
    The instructions the policy was trained on come from the checkpoint's embeddings: no encoder needed."""
    dit, vae, t5 = 2 * rows[0]["parameters"], 2 * vae_parameters(), t5_11b_encoder_parameters()
    return {"without_encoder_gb": (dit + vae) / 1e9, "with_encoder_bf16_gb": (dit + vae + 2 * t5) / 1e9,
            "with_encoder_fp32_gb": (dit + vae + 4 * t5) / 1e9, "t5_encoder_parameters": t5}


def print_table(rows: list[dict]) -> None:
    n = rows[0]["parameters"]
    t = next(r["trainable"] for r in rows if r["method"].startswith("LoRA"))
    print(f"Cosmos-Predict2-2B DiT: {n:,} parameters; LoRA r16 (attention + MLP, patch_embed.proj + proj_out "
          f"trained fully): {t:,} trainable ({100 * t / n:.2f} %). One GPU, activation checkpointing, 224 x 224, "
          f"T5 text padded to 512 tokens. GB = 1e9 bytes.\n")
    head = ("| layout | method | weights | grads | AdamW | other (VAE, autocast copies) | fixed | activations / "
            "sample | total at batch 1 / 4 / 16 | largest micro-batch on 24 / 48 / 80 GB | train TFLOP / sample |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        tot = " / ".join(f"{r['total_gb'][b]:.1f}" for b in (1, 4, 16))
        fit = " / ".join(str(r["max_micro_batch"][c]) for c in CARDS_GB)
        print(f"| {r['layout']} | {r['method']} | {r['weights_gb']:.2f} | {r['grads_gb']:.2f} | "
              f"{r['optimizer_gb']:.2f} | {r['other_gb']:.2f} | {r['fixed_gb']:.2f} | "
              f"{r['activations_per_sample_gb']:.3f} | {tot} | {fit} | {r['train_tflops_per_sample']:.1f} |")
    sizes = checkpoint_sizes(rows)
    print(f"\nCheckpoint weights: full {sizes['full_weights_gb']:.1f} GB (fp32; {sizes['full_with_adamw_gb']:.1f} GB "
          f"with AdamW moments for resuming), LoRA {sizes['lora_weights_mb']:.0f} MB ({sizes['lora_with_adamw_mb']:.0f} "
          f"MB with its AdamW moments), merged export {sizes['merged_gb']:.1f} GB.")
    serve = serving_weights(rows)
    print(f"Serving the 2B in bf16 (weights): {serve['without_encoder_gb']:.1f} GB without the text encoder (the "
          f"checkpoint's instruction embeddings), {serve['with_encoder_bf16_gb']:.1f} GB with T5-11B's encoder "
          f"({serve['t5_encoder_parameters'] / 1e9:.2f} B parameters) in bf16, {serve['with_encoder_fp32_gb']:.1f} GB "
          f"with it in fp32; the sampler's activations and the CUDA context come on top.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = memory_rows()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checkpoints": checkpoint_sizes(rows),
                                               "serving": serving_weights(rows)}, indent=2))


if __name__ == "__main__":
    main()
