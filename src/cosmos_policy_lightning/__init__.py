"""Cosmos Policy for any robot: a video diffusion model fine-tuned as policy, world model and value
function, with the robot described by one YAML file.

Data flows one way: ``embodiment`` (YAML) -> ``layout`` (latent-frame slots) -> ``data.convert``
(shards) -> ``data.datamodule`` (batches) -> ``model.module`` (latents, injection, masks, loss).
"""

from .embodiment import Embodiment, EmbodimentError, load_embodiment
from .errors import CosmosPolicyError, DataError
from .layout import OBJECTIVES, SequenceLayout, Slot

__version__ = "0.1.0"

__all__ = ["Embodiment", "EmbodimentError", "load_embodiment", "CosmosPolicyError", "DataError",
           "OBJECTIVES", "SequenceLayout", "Slot", "__version__"]
