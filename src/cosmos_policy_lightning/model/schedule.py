"""Learning-rate schedule of the reference runs (paper §5; docs/model.md "Learning rate").

The reference trains with a two-cycle linear schedule (its ``LambdaLinearScheduler`` with
``cycle_lengths=[decay_steps, inf]``, ``f_start=[1e-6, 0.06]``, ``f_max=[1.0, 0.06]``,
``f_min=[0.3, 0.06]``). As a multiplier of the base learning rate, at optimizer step ``n`` (0-based):

* ``n < warmup_steps``: linear warm-up from ``start_factor`` (1e-6) towards 1;
* ``warmup_steps <= n <= decay_steps``: linear decay from 1 (at the end of the warm-up) to
  ``decay_factor`` (0.3, reached at ``decay_steps``);
* ``n > decay_steps``: ``final_factor`` (0.06), flat until the end of training. There is no ramp from
  0.3 to 0.06: the second cycle starts at 0.06 and stays there.

LIBERO / RoboCasa: warm-up 1K, 0.3x at 30K, then 0.06x (runs end at 40K / 45K); ALOHA: warm-up 2K,
0.3x at 20K, then 0.06x (50K); the ALOHA planning fine-tune: warm-up 1.5K, 0.3x at 15K.
"""

from __future__ import annotations

#: Multiplier at step 0 of the warm-up (the reference's ``f_start``).
START_FACTOR = 1e-6


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, total_steps: int | None = None,
                  decay_factor: float = 0.3, final_factor: float = 0.06,
                  start_factor: float = START_FACTOR) -> float:
    """Multiplier of the base learning rate at optimizer ``step`` (0-based), see the module docstring.

    Args:
        step: optimizer step n >= 0.
        warmup_steps: length of the linear warm-up (0: none).
        decay_steps: the step at which the linear decay reaches ``decay_factor``; afterwards the
            multiplier is ``final_factor``. Values below ``warmup_steps`` are raised to it.
        total_steps: accepted for compatibility, unused: the last segment is flat, so the length of
            the run does not change the schedule.
        decay_factor, final_factor, start_factor: the reference's 0.3, 0.06 and 1e-6.

    Returns:
        a float in ``[min(start_factor, final_factor), 1]``.
    """
    del total_steps
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(decay_steps, warmup_steps)
    if step <= decay_steps:
        if decay_steps == warmup_steps:
            return decay_factor
        return decay_factor + (1.0 - decay_factor) * (decay_steps - step) / (decay_steps - warmup_steps)
    return final_factor
