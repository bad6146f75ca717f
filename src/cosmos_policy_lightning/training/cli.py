"""``cosmos-policy fit | validate | test | predict``: LightningCLI over the module and data module.

Recipes are ``class_path`` / ``init_args`` YAML (``recipes/*.yaml``). Sizes that depend on the
embodiment and the data never appear twice in a recipe: ``data.init_args.embodiment`` is linked to
``model.init_args.embodiment`` when the command line is parsed, and the text-embedding width is read
from the instantiated data module (``apply_on="instantiate"``).
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import CosmosDataModule
from ..model.module import CosmosPolicyModule


class CosmosPolicyCLI(LightningCLI):
    """LightningCLI with the embodiment / text-width links."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.embodiment", "model.init_args.embodiment")
        parser.link_arguments("data", "model.init_args.text_dim", compute_fn=lambda dm: dm.text_dim,
                              apply_on="instantiate")


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
