"""Preparation before ``fit`` / ``validate`` / ``test`` / ``predict``: the stage above data and model.

Two things must exist before a data module can serve batches, and each needs a part the data
package does not own:

* the **shards**: a recipe's ``data.convert_from`` converts the source on first use
  (``data/convert.py``; the reader in ``data/datamodule.py`` never imports the converter);
* the **latent cache** (``data.latent_cache: true``): encoded once by the model's frozen VAE
  (``model/sequence.py`` ``PixelSequenceEncoder``), and refused when it was made with another VAE.

The CLI runs :func:`convert_if_missing` before it instantiates the classes (the CLI links read the
dataset's manifest) and :func:`prepare_latent_cache` before the subcommand, with the VAE the model has
already loaded. From Python, call :func:`prepare_dataset` and :func:`prepare_latent_cache` yourself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.datamodule import check_convert_from
from ..data.dataset_info import is_converted
from ..data.latent_cache import build_latent_cache, check_cache_matches_model, read_cache_manifest
from ..errors import DataError
from ..layout import SequenceLayout
from ..model.sequence import PixelSequenceEncoder
from ..model.vae import VideoVAE
from ..shipped import resolve_path
from ..storage import is_url


def convert_if_missing(data_dir: str | Path, embodiment: str | None, convert_from: dict[str, Any] | None) -> bool:
    """Run the conversion ``convert_from`` into ``data_dir`` unless a finished one is there (an
    unfinished one resumes; concurrent callers wait for one writer, ``locking.py``).

    Args:
        data_dir: the dataset directory (the conversion's ``output``).
        embodiment: the embodiment YAML the shards are made for.
        convert_from: keyword arguments of :func:`cosmos_policy_lightning.data.convert.convert` (at least
            ``source``), or None (nothing to do).

    Returns:
        True when a conversion ran.

    Raises:
        CosmosPolicyError: a failing conversion (its one-line error), or ``convert_from`` without
            ``source`` / embodiment.
    """
    if not convert_from:
        return False
    if is_converted(data_dir):
        return False
    if is_url(data_dir):
        raise DataError(f"{data_dir}: no finished conversion at this URL, and convert_from converts into local "
                        f"folders only; convert locally, then upload (cosmos-policy push-dataset)")
    check_convert_from(convert_from, embodiment)
    from ..data.convert import convert

    convert(**{**convert_from, "output": str(data_dir), "embodiment": str(embodiment)})
    return True


def prepare_dataset(datamodule) -> bool:
    """:func:`convert_if_missing` with a :class:`~cosmos_policy_lightning.data.datamodule.CosmosDataModule`'s
    ``data_dir``, ``embodiment`` and ``convert_from``. Returns True when a conversion ran."""
    return convert_if_missing(datamodule.data_dir, datamodule.embodiment_path, datamodule.convert_from)


def prepare_latent_cache(datamodule, vae: VideoVAE) -> Path | None:
    """Build the data module's latent cache with ``vae`` if it is missing or unfinished (resumable), then
    check that it was encoded by ``vae`` for the data module's layout.

    Args:
        datamodule: a :class:`~cosmos_policy_lightning.data.datamodule.CosmosDataModule`.
        vae: the model's :class:`~cosmos_policy_lightning.model.vae.VideoVAE`.

    Returns:
        the cache directory, or None when the data module does not use a latent cache.

    Raises:
        DataError: a cache of another VAE, layout or settings (one line naming the cache).
    """
    if not datamodule.latent_cache:
        return None
    info, encoder = datamodule.info, PixelSequenceEncoder(vae)
    finished = (read_cache_manifest(datamodule.cache_dir) or {}).get("status") == "complete"
    if not finished:
        build_latent_cache(info.data_dir, encoder, datamodule.cache_dir, augment=datamodule.augment,
                           augment_views=datamodule.latent_views, seed=datamodule.seed,
                           dtype=datamodule.latent_dtype, embodiment=datamodule.embodiment_path)
    # A finished cache of another VAE: named as such (the data module checks every other setting).
    check_cache_matches_model(datamodule.cache_manifest, datamodule.cache_dir, encoder.fingerprint,
                              SequenceLayout.from_embodiment(info.embodiment))
    return datamodule.cache_dir


def cache_latents(data_dir: Path, vae: str = "assets/tiny_wan_vae", output: Path | None = None,
                  augment: bool = True, augment_views: int = 4, seed: int = 0, dtype: str = "float16",
                  batch_size: int = 16, embodiment: Path | None = None, threads: int | None = None) -> None:
    """Encode a converted dataset's pixel sequences once with the frozen VAE, for fast training.

    Training then reads ``latents.npy`` instead of JPEGs and skips the VAE (set ``data.latent_cache:
    true`` in a recipe, which also runs this stage on first use). See ``docs/datamodule.md``.

    Args:
        data_dir: converted dataset directory (``cosmos-policy convert`` output).
        vae: the model's VAE: local directory or hub id (must be the recipe's ``model.vae``).
        output: cache directory (default ``DATA_DIR/latents``).
        augment: the data module augments images (paper §IV-A); view 0 is then the test-time centre crop.
        augment_views: random augmented views stored per training sample (plus view 0).
        seed: seed of the augmentation parameters.
        dtype: storage dtype, ``float16`` or ``float32``.
        batch_size: samples per VAE call.
        embodiment: embodiment YAML (default: the dataset manifest's).
        threads: torch threads for encoding (default: all cores).
    """
    encoder = PixelSequenceEncoder(VideoVAE(resolve_path(vae)))
    out = build_latent_cache(data_dir, encoder, output, augment, augment_views, seed, dtype, batch_size, embodiment,
                             threads=threads)
    print(f"latent cache: {out}")


__all__ = ["cache_latents", "convert_if_missing", "prepare_dataset", "prepare_latent_cache"]
