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
from ..errors import CosmosPolicyError
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

    # A truncated or corrupt --ckpt_path is refused in one line before anything runs (LightningCLI reads
    # the checkpoint's hyperparameters right after parsing), instead of torch's "PytorchStreamReader
    # failed reading zip archive" deep inside; "last" is resolved and checked before the subcommand runs.
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and os.path.isfile(ckpt):
            check_checkpoint_file(ckpt)

    def before_fit(self) -> None:
        self._check_ckpt_path("fit")

    def before_validate(self) -> None:
        self._check_ckpt_path("validate")

    def before_test(self) -> None:
        self._check_ckpt_path("test")

    def before_predict(self) -> None:
        self._check_ckpt_path("predict")

    def _check_ckpt_path(self, subcommand: str) -> None:
        ckpt = getattr(self.config.get(subcommand), "ckpt_path", None)
        if ckpt == "last":
            ckpt = _last_checkpoint(self.trainer)
        if ckpt and ckpt not in ("best", "hpc", "registry") and "://" not in str(ckpt):
            check_checkpoint_file(ckpt)


def _last_checkpoint(trainer) -> str | None:
    """What ``ckpt_path="last"`` resolves to (as Lightning does: the newest of the ModelCheckpoint
    callbacks' last checkpoints), or None."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    candidates: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            try:
                candidates |= {str(c) for c in callback._find_last_checkpoints(trainer)}
            except Exception:  # a Lightning internal that changed: leave the resolution to Lightning
                return None
    existing = [c for c in candidates if os.path.exists(c)]
    return max(existing, key=os.path.getmtime) if existing else None


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a checkpoint file that cannot be a whole ``torch.save`` archive, cheaply: a truncated
    ``.ckpt`` (a full disk, a copy or a job killed while saving) lacks the zip central directory at its
    end, or has members that reach past its end. Reads only the archive's directory; a distributed
    (sharded) checkpoint folder is left to its loader.

    Raises:
        CosmosPolicyError: one line naming the file and what is wrong.
    """
    import zipfile
    from pathlib import Path

    path = Path(path)
    if path.is_dir() or not path.exists():
        return  # sharded checkpoint folder, or missing: Lightning names a missing file itself
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename} reaches past the end of the file")
    except zipfile.BadZipFile as err:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80" and str(err) == "File is not a zip file":
                return  # a legacy (pre-zip) torch.save file: nothing cheap to check
        raise CosmosPolicyError(f"{path}: not a readable checkpoint ({err}; {size} bytes): truncated or corrupt "
                                f"-- use another checkpoint (e.g. an earlier one) or start without --ckpt_path") from None


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
