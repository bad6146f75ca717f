"""Where training batches come from: the converted pixel shards, or the VAE latent cache built from them.

Both are tar shards listed in a manifest, with the same sample keys, so the data module's pipeline is the
same for both (``data/datamodule.py``); what differs is collected here, as two implementations of one
interface chosen once per data module (:func:`training_source`):

=====================  ====================================  ==============================================
                       :class:`PixelShards`                  :class:`LatentCache`
=====================  ====================================  ==============================================
shards                 ``<data_dir>/<split>-*.tar``          ``<cache_dir>/<split>-*.tar`` (same names)
decoder                :class:`~.stages.SampleDecoder`       :class:`~.stages.LatentSampleDecoder`
members every sample   meta, proprio, actions, both image    ``latents`` + the pass-through members
must hold              sets of every camera
sizes and checksums    the dataset manifest                  the cache manifest
a damaged shard says   convert again                         rebuild the cache (the command)
=====================  ====================================  ==============================================

The cache's fingerprint (layout, image size, views, dtype, the dataset's content) is checked by the data
module before a :class:`LatentCache` is made (``DataModule.cache_manifest``).
"""

from __future__ import annotations

from pathlib import Path

from ..storage import location
from . import schema as S
from .dataset_info import DatasetInfo
from .integrity import CONVERT_AGAIN, CheckedTarSamples, check_shard_sizes
from .latent_cache import LATENTS, PASSTHROUGH, rebuild_hint
from .stages import LatentSampleDecoder, SampleDecoder, StreamPosition


class PixelShards:
    """Training data read from the converted shards: JPEG images decoded (and augmented) every epoch.

    Args:
        info: the converted dataset's metadata (``data/dataset_info.py``).
    """

    def __init__(self, info: DatasetInfo):
        self.info = info

    @property
    def manifest_path(self) -> Path:
        """The manifest whose sizes and checksums the shards are checked against."""
        return self.info.data_dir / S.MANIFEST

    @property
    def fix(self) -> str:
        """What a message about a damaged shard tells the user to do."""
        return CONVERT_AGAIN

    def shards(self, split: str) -> list[str]:
        """Paths of the split's shards, in manifest order."""
        return list(self.info.splits[split].shards)

    def decoder_class(self) -> type[SampleDecoder]:
        return SampleDecoder

    def decoder_options(self) -> dict:
        return {}

    def required_members(self) -> tuple[str, ...]:
        return (S.META, S.PROPRIO, S.FUTURE_PROPRIO, S.ACTIONS,
                *(S.image_member(c, f) for c in self.info.embodiment.camera_names for f in (False, True)))

    def digests(self, split: str) -> dict[str, str | None]:
        """Shard file name -> SHA-256 recorded at conversion."""
        s = self.info.splits[split]
        return {Path(p).name: d for p, d in zip(s.shards, s.sha256)}

    def sizes(self) -> list[tuple[Path | str, int | None]]:
        """``(path, recorded bytes)`` of every shard of every split (None: not recorded)."""
        return [(p, b) for split in S.SPLITS
                for p, b in zip(self.info.splits[split].shards,
                                self.info.splits[split].bytes or (None,) * len(self.info.splits[split].shards))]

    # ------------------------------------------------------------------ shared by both sources
    def decoder(self, embodiment_args: tuple, seed: int, rank: int = 0,
                position: StreamPosition | None = None) -> SampleDecoder:
        """The stage that turns a raw sample into the batch contract (``data/stages.py``).

        Args:
            embodiment_args: ``(embodiment, normalizers, text_dir, max_text_tokens, mode)`` of the decoder.
            seed, rank, position: the augmentation stream's seed, global rank and resumable position.
        """
        return self.decoder_class()(*embodiment_args, seed=seed, rank=rank, position=position,
                                    **self.decoder_options())

    def reader(self, split: str, check_sha256: bool) -> CheckedTarSamples:
        """Tar -> samples, with the manifest's sample counts, the required members and (with
        ``check_sha256``) the checksums checked while reading (``data/integrity.py``)."""
        s = self.info.splits[split]
        counts = {Path(p).name: n for p, n in zip(s.shards, s.samples)}
        return CheckedTarSamples(counts, self.required_members(), self.digests(split) if check_sha256 else None,
                                 self.manifest_path, self.fix)

    def check_files(self) -> None:
        """Every shard that will be read has the size its manifest recorded (one ``stat`` each).

        Raises:
            DataError: a missing or resized shard, naming the fix.
        """
        check_shard_sizes(self.sizes(), self.manifest_path, self.fix)


class LatentCache(PixelShards):
    """Training data read from the latent cache (``data/latent_cache.py``): VAE latents encoded once.

    Args:
        info: the converted dataset's metadata.
        cache_dir: the cache's folder, or its URL (``storage.py``).
        manifest: the cache's manifest, already checked against the data module's settings.
        vae: the VAE named in the rebuild command of error messages.
    """

    def __init__(self, info: DatasetInfo, cache_dir: Path, manifest: dict, vae: str | None):
        super().__init__(info)
        self.cache_dir, self.manifest, self.vae = location(cache_dir), manifest, vae
        self._entries = {e.get("name"): e for e in manifest.get("shards", []) if isinstance(e, dict)}

    @property
    def manifest_path(self) -> Path:
        return self.cache_dir / S.MANIFEST

    @property
    def fix(self) -> str:
        return rebuild_hint(self.info.data_dir, self.cache_dir, self.vae)

    def shards(self, split: str) -> list[str]:
        return [str(self.cache_dir / Path(p).name) for p in self.info.splits[split].shards]

    def decoder_class(self) -> type[SampleDecoder]:
        return LatentSampleDecoder

    def decoder_options(self) -> dict:
        return {"layout_frames": self.manifest["frames"],
                "num_latent_frames": self.manifest["fingerprint"]["layout"]["num_latent_frames"]}

    def required_members(self) -> tuple[str, ...]:
        return (LATENTS, *PASSTHROUGH)

    def digests(self, split: str) -> dict[str, str | None]:
        return {name: e.get("sha256") for name, e in self._entries.items()}

    def sizes(self) -> list[tuple[Path | str, int | None]]:
        return [(self.cache_dir / Path(p).name, (self._entries.get(Path(p).name) or {}).get("bytes"))
                for split in S.SPLITS for p in self.info.splits[split].shards]


def training_source(info: DatasetInfo, cache_manifest: dict | None, cache_dir: Path,
                    vae: str | None) -> PixelShards:
    """The data module's one choice: the latent cache when it has a (checked) cache manifest, else the
    pixel shards."""
    if cache_manifest is None:
        return PixelShards(info)
    return LatentCache(info, cache_dir, cache_manifest, vae)


__all__ = ["LatentCache", "PixelShards", "training_source"]
