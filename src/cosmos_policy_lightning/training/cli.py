"""``cosmos-policy fit | validate | test | predict``: LightningCLI over the module and data module.

Recipes are ``class_path`` / ``init_args`` YAML (``recipes/*.yaml``). Sizes that depend on the
embodiment and the data never appear twice in a recipe: the model's embodiment and text-embedding
width are read from the instantiated data module (``apply_on="instantiate"``), which takes them from
the dataset's manifest (or the embodiment YAML it was given).
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import CosmosDataModule
from ..model.module import CosmosPolicyModule


class CosmosPolicyCLI(LightningCLI):
    """LightningCLI with the embodiment / text-width links."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.init_args.embodiment", compute_fn=_embodiment_dict,
                              apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.text_dim", compute_fn=lambda dm: dm.text_dim,
                              apply_on="instantiate")
        # The latent cache is encoded by the model's VAE: one setting, never written twice.
        parser.link_arguments("model.init_args.vae", "data.init_args.vae", apply_on="parse")


def _embodiment_dict(dm) -> dict:
    return dm.embodiment.to_dict()


def run_lightning_cli(argv: list[str]) -> CosmosPolicyCLI:
    """Run a LightningCLI subcommand with ``argv`` (e.g. ``["fit", "--config", "recipes/quickstart.yaml"]``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return CosmosPolicyCLI(
        CosmosPolicyModule,
        CosmosDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
