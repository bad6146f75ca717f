"""Learning-rate schedule of the reference runs (SPEC §5).

Piecewise linear multiplier of the base learning rate:

* ``0 -> warmup_steps``: linear warm-up from 0 to 1;
* ``warmup_steps -> decay_steps``: linear decay from 1 to ``decay_factor`` (0.3);
* ``decay_steps -> total_steps``: linear decay from ``decay_factor`` to ``final_factor`` (0.06), then flat.

LIBERO / RoboCasa: warm-up 1K, 0.3x at 30K, 0.06x at the end (40K / 45K); ALOHA: 2K, 0.3x at 20K.
"""

from __future__ import annotations


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, total_steps: int,
                  decay_factor: float = 0.3, final_factor: float = 0.06) -> float:
    """Multiplier in [0, 1] of the base learning rate at optimizer ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(decay_steps, warmup_steps)
    if step < decay_steps:
        frac = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return 1.0 + (decay_factor - 1.0) * frac
    total_steps = max(total_steps, decay_steps)
    if step < total_steps:
        frac = (step - decay_steps) / max(1, total_steps - decay_steps)
        return decay_factor + (final_factor - decay_factor) * frac
    return final_factor
