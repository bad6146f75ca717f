"""Latency per action chunk of :class:`CosmosPolicy` and of best-of-N planning (docs/method.md §3, §5).

Measures, for one observation (camera frames at the model size, proprio, an instruction whose
embedding is cached after the first call):

- the direct policy (parallel decoding, no image decoding) with 1, 5 and 10 denoising steps;
- planning with N = 8 proposals x 3 futures x 5 values (all candidates batched on one device), with
  5 steps per stage (the reference's setting) and with a 1-step value stage;
- the round trip through ``cosmos-policy serve`` (``inference/server.py``, a real websocket server on
  127.0.0.1 in this process, clients on threads) against in-process calls doing the same work: with
  1 client (vs one in-process call) and 4 simultaneous clients (vs one in-process call on a batch of
  4 observations, what the server batches them into at best), with the server's default batching
  window. ``overhead`` = median round trip - median in-process time; ``transport`` = median of
  (round trip - the server's queue and inference time): msgpack, websocket and thread hand-offs alone.

Each figure is the median (and mean) over ``--repeats`` calls after one warm-up call; synchronised
on CUDA. Weights are randomly initialised (latency does not depend on their values); the text
encoder is replaced by random embeddings of the real width and token count (MiniLM: 384 x 12 tokens;
T5-11B: 1024 x 512 tokens, as the 2B recipes pad), because encoding happens once per instruction.

Setups:

- ``tiny``: the tiny DiT on the Meta-World embodiment (2 cameras, 64x64), the repository's tiny VAE
  (``assets/tiny_wan_vae`` when present, else a random one with the same shape), float32 on CPU;
- ``2b``: Cosmos-Predict2-2B (random init) with the Wan2.1 VAE architecture (random init) on the LIBERO
  layout (2 cameras, 224x224, 9 latent frames), bfloat16 on CUDA (targets on one H100: <= 0.30 s per
  chunk at 5 steps, <= 2.5 s for planning N = 8 with 3 x 5 ensembles).

Usage::

    OMP_NUM_THREADS=1 python tools/benchmark_inference.py                 # tiny on CPU, + 2b if CUDA
    python tools/benchmark_inference.py --setups '[2b]' --device cuda --repeats 5
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cosmos_policy_lightning.embodiment import Embodiment  # noqa: E402
from cosmos_policy_lightning.inference.planning import Planner  # noqa: E402
from cosmos_policy_lightning.inference_record import InferenceRecord  # noqa: E402
from cosmos_policy_lightning.inference.policy import CosmosPolicy  # noqa: E402
from cosmos_policy_lightning.model.dit import VideoDiT  # noqa: E402
from cosmos_policy_lightning.model.module import CosmosPolicyModule  # noqa: E402
from cosmos_policy_lightning.normalization import DatasetStats, Stats  # noqa: E402

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.0] * 16, latents_std=[1.0] * 16)

SETUPS = {
    "tiny": dict(transformer="tiny", embodiment="metaworld", text_dim=384, text_tokens=12, dtype="float32"),
    "2b": dict(transformer="cosmos-predict2-2b", embodiment="libero", text_dim=1024, text_tokens=512,
               dtype="bfloat16"),
}


class RandomTextEncoder:
    """Stand-in for MiniLM / T5 with their output width and token count (encoding is cached per
    instruction, so its cost is not part of a chunk's latency)."""

    def __init__(self, dim: int, tokens: int):
        self.identity, self.dim, self.tokens = f"benchmark:random-{dim}", dim, tokens

    def encode(self, texts):
        rng = np.random.default_rng(0)
        return [rng.standard_normal((self.tokens, self.dim)).astype(np.float32) for _ in texts]


def synthetic_stats(emb: Embodiment) -> DatasetStats:
    rng = np.random.default_rng(0)
    stats = {"action": Stats.compute(rng.uniform(-1, 1, (256, emb.action.dim))),
             "proprio": Stats.compute(rng.uniform(-1, 1, (256, emb.proprio.dim)))}
    return DatasetStats("benchmark", stats, stats)


def build_policy(setup: str, device: str) -> CosmosPolicy:
    cfg = SETUPS[setup]
    emb = Embodiment.from_yaml(REPO / "embodiments" / f"{cfg['embodiment']}.yaml")
    dtype = getattr(torch, cfg["dtype"]) if device.startswith("cuda") else torch.float32
    if setup == "tiny":
        vae = str(REPO / "assets" / "tiny_wan_vae") if (REPO / "assets" / "tiny_wan_vae").is_dir() else TINY_VAE
    else:
        vae = {}  # AutoencoderKLWan's defaults are the Wan2.1 architecture (random weights)
    module = CosmosPolicyModule(embodiment=emb.to_dict(), text_dim=cfg["text_dim"], transformer=cfg["transformer"],
                                vae=vae, image_log_every_n_steps=0)
    # Build the DiT directly on the device in its dtype: a 2B float32 init on the CPU takes minutes.
    module.dit = VideoDiT(cfg["transformer"], text_embed_dim=cfg["text_dim"], device=device,
                          torch_dtype=None if dtype == torch.float32 else dtype)
    module.record = InferenceRecord(emb, synthetic_stats(emb))
    return CosmosPolicy(module, device=device, dtype=dtype,
                        text_encoder=RandomTextEncoder(cfg["text_dim"], cfg["text_tokens"]))


def observation(emb: Embodiment) -> dict:
    rng = np.random.default_rng(0)
    return {"images": {c: rng.integers(0, 256, (*emb.image_size, 3), dtype=np.uint8) for c in emb.camera_names},
            "proprio": rng.uniform(-1, 1, emb.proprio.dim), "instruction": "put the bowl on the plate"}


def timed(fn, repeats: int, device: str) -> dict:
    def once(i):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(i)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once(-1)  # warm-up: allocator, kernels, text embedding cache
    times = [once(i) for i in range(repeats)]
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "repeats": repeats}


def server_rows(policy: CosmosPolicy, obs: dict, label: str, device: str, repeats: int,
                clients: tuple[int, ...] = (1, 4)) -> list[dict]:
    """Round trip through a local policy server vs the same work in-process (5 denoising steps)."""
    import threading

    from cosmos_policy_lightning.client import PolicyClient
    from cosmos_policy_lightning.inference.server import PolicyServer
    from cosmos_policy_lightning.inference.service import PolicyService

    rows = []
    server = PolicyServer(PolicyService(policy, num_steps=5), port=0, max_batch_size=max(clients))
    with server.running_in_thread() as url:
        for c in clients:
            local = timed(lambda i, c=c: policy.predict([obs] * c, num_steps=5, seed=[i] * c, decode_images=False),
                          repeats, device)
            samples: list[tuple[float, dict]] = []  # (round trip, reply) of every timed request
            barrier = threading.Barrier(c)

            def robot(k: int, c=c) -> None:
                with PolicyClient(url) as client:
                    client.infer({**obs, "seed": 0})  # warm-up
                    barrier.wait()
                    for i in range(repeats):
                        t = time.perf_counter()
                        reply = client.infer({**obs, "seed": i})
                        samples.append((time.perf_counter() - t, reply))

            threads = [threading.Thread(target=robot, args=(k,)) for k in range(c)]
            wall = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - wall
            flat = [x for x, _ in samples]
            replies = [r for _, r in samples]
            rt = statistics.median(flat)
            transport = statistics.median(x - (r["server_timing"]["queue_ms"] + r["server_timing"]["infer_ms"]) / 1000
                                          for x, r in samples)
            rows.append({"setup": label, "what": f"server round trip, {c} client{'s' * (c > 1)}",
                         "median_s": rt, "mean_s": statistics.fmean(flat), "repeats": len(flat),
                         "in_process_s": local["median_s"], "overhead_ms": (rt - local["median_s"]) * 1000,
                         "transport_ms": transport * 1000,
                         "server_infer_ms": statistics.median(r["server_timing"]["infer_ms"] for r in replies),
                         "mean_batch": statistics.fmean(r["server_timing"]["batch_size"] for r in replies),
                         "chunks_per_s": len(flat) / wall, "in_process_chunks_per_s": c / local["median_s"]})
    return rows


def run(setups: list[str] | None = None, device: str | None = None, repeats: int = 3,
        steps: list[int] = [1, 5, 10], output: Path | None = None, planning: bool = True, server: bool = True,
        server_repeats: int = 20) -> list[dict]:
    """Measure and print the latency table.

    Args:
        setups: ``tiny`` and / or ``2b``; default: tiny, plus 2b when CUDA is available.
        device: torch device; default cuda for 2b and cpu for tiny.
        repeats: timed calls per figure (after one warm-up call).
        steps: denoising steps of the direct-policy rows.
        output: optional JSON file for the rows.
        planning: measure the planning rows.
        server: also measure the round trip through ``cosmos-policy serve`` (1 and 4 clients).
        server_repeats: requests per client for the server rows.
    """
    torch.set_grad_enabled(False)
    setups = setups or (["tiny", "2b"] if torch.cuda.is_available() else ["tiny"])
    rows = []
    for setup in setups:
        dev = device or ("cuda" if setup == "2b" else "cpu")
        policy = build_policy(setup, dev)
        obs = observation(policy.embodiment)
        label = f"{setup} ({policy.embodiment.name}, {dev}, {str(policy.dtype).replace('torch.', '')})"
        for n in steps:
            r = timed(lambda i, n=n: policy.predict(obs, num_steps=n, seed=i, decode_images=False), repeats, dev)
            rows.append({"setup": label, "what": f"policy, {n} step{'s' * (n > 1)}", **r})
        for value_steps in (5, 1) if planning else ():
            planner = Planner(policy, num_proposals=8, num_futures=3, num_values=5, policy_steps=5,
                              world_model_steps=5, value_steps=value_steps)
            r = timed(lambda i: planner.plan(obs, seed=i), repeats, dev)
            rows.append({"setup": label, "what": f"planning N=8, 3x5 (steps 5/5/{value_steps})", **r})
        if dev.startswith("cuda"):
            rows[-1]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if server:
            rows += server_rows(policy, obs, label, dev, server_repeats)
        del policy
    from rich.console import Console
    from rich.table import Table

    table = Table(title="latency per action chunk (one observation)")
    for col in ("setup", "what", "median", "mean"):
        table.add_column(col, justify="left" if col in ("setup", "what") else "right")
    for r in rows:
        if "overhead_ms" not in r:
            table.add_row(r["setup"], r["what"], f"{r['median_s']:.3f} s", f"{r['mean_s']:.3f} s")
    Console(width=140).print(table)
    served = [r for r in rows if "overhead_ms" in r]
    if served:
        table = Table(title="policy server (websocket, msgpack) vs in-process, 5 steps, per request")
        for col in ("setup", "clients", "round trip", "in-process", "overhead", "transport", "mean batch",
                    "chunks/s server", "chunks/s in-process"):
            table.add_column(col, justify="left" if col == "setup" else "right")
        for r in served:
            table.add_row(r["setup"], r["what"].split(", ")[1], f"{r['median_s'] * 1000:.1f} ms",
                          f"{r['in_process_s'] * 1000:.1f} ms", f"{r['overhead_ms']:+.1f} ms",
                          f"{r['transport_ms']:.1f} ms", f"{r['mean_batch']:.2f}",
                          f"{r['chunks_per_s']:.1f}", f"{r['in_process_chunks_per_s']:.1f}")
        Console(width=160).print(table)
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(run)
