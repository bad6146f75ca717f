"""Random numbers of training noise that differ between ranks (paper §5: data-parallel training).

Lightning's ``seed_everything`` seeds every process with the same seed, so the global torch generator
draws the same numbers on every rank. If the noise level sigma and the noise itself came from it, all
64 GPUs of a LIBERO run would noise their (different) samples identically, and a global batch of 1920
would carry only 30 distinct noise draws. The reference seeds each process with a value derived from
the run's seed and the process rank; so does this module, for the training noise only.

The seed of a rank is mixed with numpy's ``SeedSequence`` (a hash, rather than ``seed + rank``, so that
rank 1 of a run with seed 0 does not replay rank 0 of a run with seed 1). The generator is created at
the first training step and also mixes in the optimizer step it was created at: a run resumed from a
checkpoint continues with fresh noise instead of replaying the noise of the first steps.

Held-out noise is the opposite case: validation and test losses should not depend on how many processes
share the held-out set, so each held-out sample draws its noise from a generator of its own, seeded from
the run's seed, its episode id and its step (:func:`sample_generator`). The same checkpoint then gives
the same validation loss on one process or on two nodes (``tests/training/test_multinode.py``).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

#: Lightning's ``seed_everything`` records the run's seed in this environment variable (also for
#: processes it spawns), which is where a rank finds it.
SEED_ENV = "PL_GLOBAL_SEED"


def run_seed() -> int:
    """The run's seed: ``PL_GLOBAL_SEED`` (set by ``seed_everything`` / the CLI's ``seed_everything``),
    else torch's initial seed of this process.

    Raises:
        ValueError: ``PL_GLOBAL_SEED`` is set but not an integer.
    """
    value = os.environ.get(SEED_ENV)
    if value is None or value == "":
        return int(torch.initial_seed())
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={value!r}: expected an integer seed") from None


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed for one global rank, derived from the run's seed, the rank and a step.

    Args:
        seed: the run's seed (any integer; negative values are taken modulo 2**64).
        rank: global rank of the process (>= 0).
        step: optimizer step the generator starts at (0 for a fresh run).

    Returns:
        an integer in [0, 2**63), different for different (seed, rank, step) with overwhelming probability.

    Raises:
        ValueError: negative rank or step.
    """
    if rank < 0 or step < 0:
        raise ValueError(f"rank_seed: expected rank >= 0 and step >= 0, got {rank}, {step}")
    words = np.random.SeedSequence([int(seed) % 2**64, int(rank), int(step)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def rank_generator(seed: int, rank: int, device: torch.device | str, step: int = 0) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`rank_seed` ``(seed, rank, step)``."""
    return torch.Generator(device=torch.device(device)).manual_seed(rank_seed(seed, rank, step))


def sample_generator(seed: int, episode: str, step: int, device: torch.device | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for one held-out sample: seeded from the run's seed, the episode id
    (its CRC-32) and the step, so the sample is noised the same way whichever rank or batch it lands in.

    Raises:
        ValueError: negative step.
    """
    if step < 0:
        raise ValueError(f"sample_generator: expected step >= 0, got {step}")
    words = np.random.SeedSequence([int(seed) % 2**64, zlib.crc32(str(episode).encode()), int(step), 1]
                                   ).generate_state(2, np.uint32)
    return torch.Generator(device=torch.device(device)).manual_seed((int(words[0]) << 31) ^ int(words[1]))
