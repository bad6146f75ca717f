"""Training callbacks usable from YAML recipes."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_size(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (the length of its ``objective`` vector)."""
    return int(batch["objective"].shape[0])


class SampleThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting samples of our batch dicts: logs samples/s, batches/s
    and, where the device's peak FLOP/s is known (e.g. H100), MFU from the module's
    ``flops_per_batch`` estimate. YAML-friendly: no callable argument."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=batch_size, window_size=window_size)
