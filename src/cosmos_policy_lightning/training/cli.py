"""``cosmos-policy fit | validate | test | predict``: LightningCLI over the module and data module.

Recipes are ``class_path`` / ``init_args`` YAML (``recipes/*.yaml``). Sizes that depend on the
embodiment and the data never appear twice in a recipe: the model's embodiment, text-embedding width
and inference record (statistics, text encoder, ...) are read from the instantiated data module
(``apply_on="instantiate"``), which takes them from the dataset's manifest (or the embodiment YAML it
was given). The preparation stage (``training/prepare.py``) runs first: the conversion of
``data.convert_from`` before the classes are instantiated, the latent cache before the subcommand.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import CosmosDataModule
from ..checkpoints.checkpoint_file import check_checkpoint_file
from ..errors import CosmosPolicyError
from ..yaml_files import load_yaml_file
from ..model.module import CosmosPolicyModule
from .prepare import convert_if_missing, prepare_latent_cache


class CosmosPolicyCLI(LightningCLI):
    """LightningCLI with the data -> model links and the preparation stage."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.init_args.embodiment", compute_fn=_embodiment_dict,
                              apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.text_dim", compute_fn=lambda dm: dm.text_dim,
                              apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.inference_record",
                              compute_fn=lambda dm: dm.inference_record().to_dict(), apply_on="instantiate")
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

    def before_instantiate_classes(self) -> None:
        # The links read the dataset's manifest while the classes are instantiated: convert first.
        subcommand = self.config.get("subcommand")
        data = (self.config[subcommand] if subcommand else self.config).get("data")
        args = data.get("init_args") if data is not None and hasattr(data, "get") else None
        if args is not None and args.get("convert_from"):
            convert_if_missing(args.get("data_dir"), args.get("embodiment"), dict(args.get("convert_from")))

    def _prepare(self, subcommand: str) -> None:
        self._check_ckpt_path(subcommand)
        if isinstance(self.datamodule, CosmosDataModule):  # another data module brings its own batches
            prepare_latent_cache(self.datamodule, self.model.vae)

    def before_fit(self) -> None:
        self._prepare("fit")
        self._validate_across_epochs()
        from .callbacks import FinalCheckpoint

        if not any(isinstance(c, FinalCheckpoint) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(FinalCheckpoint())  # max_time / SIGTERM / Ctrl-C: last.ckpt resumes
        from .callbacks import InstructionEmbeddingsInCheckpoint

        if not any(isinstance(c, InstructionEmbeddingsInCheckpoint) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(InstructionEmbeddingsInCheckpoint())  # checkpoints deploy without T5

    def before_validate(self) -> None:
        self._prepare("validate")

    def before_test(self) -> None:
        self._prepare("test")

    def before_predict(self) -> None:
        self._prepare("predict")

    def _validate_across_epochs(self) -> None:
        """An integer ``val_check_interval`` counts training steps of the endless stream: the shard "epoch" of
        a small dataset is an artefact (``samples_per_epoch // batch_size`` batches), so an interval longer
        than it validates every N global steps (Lightning's ``check_val_every_n_epoch=None``) instead of
        Lightning's ValueError."""
        trainer, dm = self.trainer, self.datamodule
        interval = trainer.val_check_interval
        if not isinstance(interval, int) or isinstance(interval, bool) or trainer.check_val_every_n_epoch is None:
            return
        if not hasattr(dm, "train_batches_per_epoch"):
            return
        if interval > dm.train_batches_per_epoch(max(1, trainer.world_size)):
            trainer.check_val_every_n_epoch = None

    def _check_ckpt_path(self, subcommand: str) -> None:
        ckpt = getattr(self.config.get(subcommand), "ckpt_path", None)
        if ckpt == "last":
            ckpt = _last_checkpoint(self.trainer)
            if ckpt is None and subcommand != "fit":  # fit starts from scratch (a first run of a resumable job)
                dirs = sorted({str(c.dirpath) for c in self.trainer.checkpoint_callbacks
                               if getattr(c, "dirpath", None)})
                raise CosmosPolicyError(f"--ckpt_path last: no last checkpoint found (looked in "
                                        f"{', '.join(dirs) or 'no ModelCheckpoint directory'}); {subcommand} needs a "
                                        f"trained model: train first, or give --ckpt_path PATH")
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


def _embodiment_dict(dm) -> dict:
    return dm.embodiment.to_dict()


def check_config_files(argv: list[str]) -> list[Path]:
    """Read every YAML file of a LightningCLI command line strictly (``yaml_files.py``) before
    jsonargparse does: the ``--config`` files, option values that are YAML files (``--data
    datamodules/x.yaml``) and the YAML files they name (a recipe's ``data: ../datamodules/x.yaml``,
    relative to the naming file).

    Returns:
        the files checked.

    Raises:
        CosmosPolicyError: a file that is not UTF-8, not YAML, or has a key twice in one mapping (one line
            naming the file and line).
    """
    pending: list[Path] = []
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else (
            argv[i + 1] if arg.startswith("--") and i + 1 < len(argv) else None)
        if value and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            pending.append(Path(value))
    checked: list[Path] = []
    while pending:
        path = pending.pop()
        if path.resolve() in {c.resolve() for c in checked}:
            continue
        data = load_yaml_file(path)
        checked.append(path)
        stack = [data]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str) and node.endswith((".yaml", ".yml")):
                for candidate in (path.parent / node, Path(node)):
                    if candidate.is_file():
                        pending.append(candidate)
                        break
    return checked


def run_lightning_cli(argv: list[str]) -> CosmosPolicyCLI:
    """Run a LightningCLI subcommand with ``argv`` (e.g. ``["fit", "--config", "recipes/quickstart.yaml"]``).

    Raises:
        CosmosPolicyError: a YAML file of the command line is not UTF-8 or has a duplicate key
            (:func:`check_config_files`), before jsonargparse reads it.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_config_files(argv)
    return CosmosPolicyCLI(
        CosmosPolicyModule,
        CosmosDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
