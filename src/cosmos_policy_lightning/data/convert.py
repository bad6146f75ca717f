"""``cosmos-policy convert``: demonstrations and rollouts (HDF5 / Zarr / LeRobot) -> WebDataset shards,
statistics, manifest and cached text embeddings (docs/method.md §1, §4; output schema in ``data/schema.py``).

Flow::

    reader.list_episodes()            cheap listing (sources/)
      -> split by episode             --val_fraction / --val_episodes, seeded
      -> per episode, in workers      read + check + resize/JPEG once + samples -> .work/<id>.spill
      -> per group of episodes        interleave spills -> <split>-NNNNNN.tar (tmp name, then rename)
      -> at the end                   stats.json, text_embeddings/, manifest.json (status complete):
                                      conversion_outputs.py, one function each

The source formats (``--format``) are those of ``sources/registry.py``; this module names only the default.

Resumability. The split, the order of episodes within a split and the grouping of episodes into
shards are deterministic (seeded, and a shard closes when its episodes' encoded size reaches
``--shard_size_mb``, which does not depend on timing). An episode is finished when its record
``.work/<id>.json`` exists (written last, atomically); a shard is finished when it has its final
name and is listed in ``manifest.json``. A conversion killed at any moment and run again with the
same options skips finished episodes and shards, redoes the rest, and ends with the same shards:
nothing duplicated, nothing truncated.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..atomic import WRITE_PROBE_PREFIX, ensure_writable_dir, write_json_atomic
from ..embodiment import Embodiment
from ..errors import DataError
from ..locking import LOCK_NAME, folder_lock
from . import schema as S
from .conversion_outputs import (cache_text_embeddings, check_text_encoder, manifest_summary, split_results,
                                 summary_line, write_statistics)
from .episode_samples import EncodeSettings, init_worker, process_episode, run_job
from .shards import shard_name, write_shard
from .sources import describe_formats, open_source, reader_class
from .sources.base import EpisodeRef
from .sources.labels import LabelOptions

WORK_DIR = ".work"
#: Status of a part's manifest once its episodes are encoded (``--part``); the merge writes the shards.
PART_COMPLETE = "part_complete"
#: The default latent-cache folder inside a dataset (``data/latent_cache.py``): derived data, deleted by
#: ``--overwrite``.
LATENTS_DIR = "latents"
MANIFEST_VERSION = 1
#: A shard never interleaves more episodes than this (one open spill file per episode while writing).
MAX_EPISODES_PER_SHARD = 256
MB = 1_000_000


def convert(
    source: str,
    *,
    output: str,
    embodiment: str,
    format: str = "robomimic",
    camera_keys: dict[str, str] | None = None,
    proprio_keys: list[str] | None = None,
    action_key: str | None = None,
    all_success: bool = False,
    success_sidecar: str | None = None,
    success_regex: str | None = None,
    instruction: str | None = None,
    instruction_from: Literal["auto", "attribute", "filename", "sidecar", "default"] = "auto",
    val_fraction: float = 0.05,
    val_episodes: list[str] | None = None,
    seed: int = 0,
    shard_size_mb: float = 500.0,
    workers: int = 1,
    skip_bad: bool = False,
    text_encoder: str = "minilm",
    swap_rb: bool = False,
    float_image_max: float = 1.0,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
    revision: str | None = None,
    tolerance_s: float = 1e-4,
    step_stride: int = 1,
    part: int = 0,
    num_parts: int = 1,
    merge: bool = False,
) -> dict[str, Any]:
    """Convert HDF5 / Zarr / LeRobot demonstrations (failed episodes included) into WebDataset shards.

    Every step t of every episode becomes one sample (s, a, s', V(s')): the images of every camera at
    t and at t' = min(t+K, T-1) (resized to the embodiment's image_size, JPEG quality 95), proprio at
    both, the action chunk actions[t:t+K] padded by repeating the last action, and the value at t'
    (2 R gamma^(T-1-t') - 1 with R the success score, -1 for failures). The output directory gets
    train-NNNNNN.tar / validation-NNNNNN.tar, stats.json, manifest.json and text_embeddings/.
    A killed conversion resumes when run again with the same options.

    Args:
        source: input file, directory (searched recursively) or glob pattern (quote it); for lerobot, a
            dataset folder (holding meta/info.json) or a Hugging Face Hub dataset id (lerobot/pusht or
            hf://datasets/lerobot/pusht), fetched into the Hugging Face cache.
        output: output directory (created; must be empty or hold a conversion by this command).
        embodiment: embodiment YAML (e.g. embodiments/libero.yaml); its keys.<format> name the source keys.
        format: source layout, one of the registered formats: {formats}.
        camera_keys: override the YAML's camera keys, camera name -> source key, e.g.
            '{wrist: eye_in_hand_rgb, agentview: agentview_rgb}'.
        proprio_keys: override the YAML's proprio keys (concatenated in order), e.g. '[joint_states, gripper_states]'.
        action_key: override the YAML's action key.
        all_success: label every episode a success (score 1), ignoring attributes and rewards.
        success_sidecar: JSON or CSV file mapping episode (id, group name, file name or stem) to success
            and/or score (and optionally instruction).
        success_regex: regex searched in '<file>' or '<file>:<group>'; match = success, else failure; a
            named group (?P<score>...) gives a fractional score.
        instruction: default task instruction (used when no sidecar entry or attribute gives one).
        instruction_from: where instructions come from: auto (sidecar, attribute, --instruction, file
            name, in that order), attribute, filename, sidecar or default (--instruction).
        val_fraction: fraction of episodes held out for validation (seeded choice; at least one when > 0).
        val_episodes: explicit validation episodes (ids or group / file names); overrides val_fraction.
        seed: seed of the split, of the episode order and of the interleaving inside shards.
        shard_size_mb: target shard size in MB (a shard closes once its episodes reach it).
        workers: parallel worker processes, one episode each at a time (1 = in this process).
        skip_bad: skip (and count in the manifest) episodes with bad data instead of stopping.
        text_encoder: instruction encoder for the embedding cache: minilm, t5:<hub id or path>, or none
            (no cache).
        swap_rb: source frames are BGR (e.g. ALOHA frames JPEG-encoded by OpenCV): swap red and blue.
        float_image_max: the value of white in floating-point image arrays: 1.0, or 255 for sources that
            store 0..255 as float (Diffusion Policy's Push-T Zarr). Float frames outside [0, this] are refused.
        jpeg_quality: JPEG quality of the stored images (the reference uses 95).
        overwrite: delete a previous conversion in output (with different settings) and start over.
        progress: show a progress bar.
        revision: lerobot from the Hub: branch, tag or commit of the dataset (default: main).
        tolerance_s: lerobot: largest gap in seconds between a row's timestamp and the presentation time
            of its video frame (LeRobot's default 1e-4).
        step_stride: make a sample of every ``step_stride``-th step of each episode (t = 0, s, 2s, ...)
            instead of every step; chunks, future frames and values still come from the full-rate episode
            and the statistics from all steps. For long episodes (ALOHA: 400 steps, three cameras) it
            divides conversion, latent-cache time and size by about ``s`` without dropping episodes.
        part: with ``num_parts`` > 1, convert only part ``part`` (0-based) of the episodes: episode ``k`` of
            the source's (deterministic) list belongs to part ``k % num_parts``. The split and the shard order
            are decided from the whole list, so every part agrees. The part's encoded episodes go to
            ``<output>/part-<part>-of-<num_parts>/``; run the parts on any machines that see ``output``
            (a shared filesystem), then ``--merge true``.
        num_parts: number of parts the conversion is split into (1: the whole conversion here).
        merge: with ``num_parts`` > 1 and the parts' options: gather every finished part, write the shards,
            statistics, text embeddings and manifest, byte for byte those of a one-machine conversion
            (statistics are computed from all training episodes, not averaged), and remove the part folders.

    Returns:
        the final manifest (also written to output/manifest.json); for a part, the part's manifest.

    Raises:
        DataError: bad input; the message is one line naming the file, episode and key.
    """
    reader_cls = reader_class(format)  # the registry's one-line error for an unknown name
    emb = Embodiment.from_yaml(embodiment)
    _check_options(val_fraction, shard_size_mb, workers, jpeg_quality)
    _check_parts(part, num_parts, merge)
    if isinstance(step_stride, bool) or not isinstance(step_stride, int) or step_stride < 1:
        raise DataError(f"--step_stride: expected an integer >= 1, got {step_stride!r}")
    if not 0.0 < float_image_max < float("inf"):
        raise DataError(f"--float_image_max: expected a positive number (1 or 255), got {float_image_max}")
    check_text_encoder(text_encoder)  # now, not after every shard is written
    labels = LabelOptions(all_success, success_sidecar, success_regex, instruction, instruction_from)
    reader = open_source(format, source, emb, labels, camera_keys, proprio_keys, action_key,
                         revision=revision, tolerance_s=tolerance_s)
    refs = reader.list_episodes()
    if not refs:
        raise DataError(f"{source}: no episodes found")
    ids = [r.episode_id for r in refs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{source}: episode id {dup!r} occurs twice")
    outcomes = episode_outcomes(reader, refs) if val_fraction > 0 and not val_episodes and len(refs) >= 2 else None
    val_ids = choose_validation(refs, val_fraction, val_episodes, seed, outcomes)
    orders = split_orders(ids, val_ids, seed)

    settings = {
        "format": format, "paths": [str(p) for p in reader.paths], "keys": reader.keys.to_dict(),
        "labels": labels.to_dict(), "image_size": list(emb.image_size), "chunk_size": emb.action.chunk_size,
        "gamma": emb.value.gamma, "jpeg_quality": jpeg_quality, "swap_rb": swap_rb, "seed": seed,
        "val_fraction": val_fraction, "validation_episodes": sorted(orders["validation"]),
        "shard_size_mb": shard_size_mb,
    }
    if float_image_max != 1.0:  # only when set, so the settings hash of existing conversions is unchanged
        settings["float_image_max"] = float_image_max
    if step_stride != 1:  # only when set, so the settings hash of existing conversions is unchanged
        settings["step_stride"] = step_stride
    if "tolerance_s" in reader_cls.options:  # only then, so the settings (and resumption) of other formats
        settings["tolerance_s"] = tolerance_s  # are unchanged
    out = ensure_writable_dir(output, "--output")  # a file, read-only: refused before any episode is read
    settings_hash = _settings_hash(settings, emb, orders)

    def refuse_other_writer() -> None:
        # Another process converts into this folder: wait for it unless its manifest (written right after
        # it took the lock) shows other settings; once it is done, the usual checks below apply.
        try:
            running = json.loads((out / S.MANIFEST).read_text())
        except (OSError, ValueError):
            running = {}
        if overwrite or running.get("settings_hash", settings_hash) != settings_hash:
            if running.get("status") == "complete":
                # A finished dataset's lock is held by a latent-cache build (it locks the dataset's folder
                # first, data/latent_cache.py) or, for a moment, by a run that finds nothing to do.
                raise DataError(f"{out}: another process is reading this dataset to build its latent cache (or "
                                f"checking it); {'--overwrite' if overwrite else 'converting again'} now would "
                                f"mix old and new data; wait for it or choose another --output")
            diff = next((k for k in settings if running.get("settings", {}).get(k) != settings[k]),
                        "embodiment or episode list")
            raise DataError(f"{out}: another process is converting into this folder with other settings "
                            f"(first difference: {diff}{', or --overwrite' if overwrite else ''}); wait for it "
                            f"or choose another --output")

    def encoding(job: _Conversion) -> EncodeSettings:
        return EncodeSettings(str(job.work), tuple(emb.image_size), emb.action.chunk_size, emb.value.gamma,
                              jpeg_quality, swap_rb, skip_bad, float_image_max, step_stride)

    by_id = {r.episode_id: r for r in refs}
    if num_parts > 1 and not merge:
        # A part encodes its episodes into its own folder (own lock); shards are written by the merge.
        part_dir = ensure_writable_dir(out / part_dir_name(part, num_parts), "--output")
        mine = {eid for k, eid in enumerate(ids) if k % num_parts == part}
        with folder_lock(part_dir, "conversion", refuse_other_writer):
            job = _Conversion(part_dir, emb, embodiment, source, settings, orders, overwrite)
            job.run(reader, by_id, encoding(job), workers, progress, only=mine)
            job.manifest.update(status=PART_COMPLETE, part={"index": part, "of": num_parts,
                                                             "episodes": sorted(mine)})
            job._save_manifest()
            _log(f"{part_dir}: part {part} of {num_parts} converted ({len(mine)} episodes); merge with "
                 f"--num_parts {num_parts} --merge true once every part is done")
            return job.manifest

    # One writer per folder (locking.py): a second run with the same options waits, then reuses the result.
    with folder_lock(out, "conversion", refuse_other_writer):
        job = _Conversion(out, emb, embodiment, source, settings, orders, overwrite)
        if job.complete:
            _log(f"{output}: already converted ({job.manifest['counts']['train']['samples']} train samples); "
                 f"nothing to do")
            return job.manifest
        if merge:
            gather_parts(out, job.work, num_parts, settings_hash)
            job.records = job._load_records()
        job.run(reader, by_id, encoding(job), workers, progress)
        manifest = job.finish(text_encoder)
        for i in range(num_parts if merge else 0):
            shutil.rmtree(out / part_dir_name(i, num_parts), ignore_errors=True)
        return manifest


# The --format help lists the registered formats (cosmos-policy convert --help reads this docstring).
if convert.__doc__:  # None under python -OO
    convert.__doc__ = convert.__doc__.replace("{formats}", describe_formats())


def _settings_hash(settings: dict[str, Any], emb: Embodiment, orders: dict[str, list[str]]) -> str:
    """Identity of a conversion's output: equal hashes write identical shards (resume / reuse)."""
    return _hash({"settings": settings, "embodiment": emb.to_dict(), "orders": orders})


def _check_options(val_fraction: float, shard_size_mb: float, workers: int, jpeg_quality: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction: expected a number in [0, 1), got {val_fraction}")
    if not shard_size_mb > 0:
        raise DataError(f"--shard_size_mb: expected a positive number, got {shard_size_mb}")
    if workers < 1:
        raise DataError(f"--workers: expected at least 1, got {workers}")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg_quality: expected 1..100, got {jpeg_quality}")


def _check_parts(part: int, num_parts: int, merge: bool) -> None:
    for name, v in (("--part", part), ("--num_parts", num_parts)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise DataError(f"{name}: expected an integer, got {v!r}")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise DataError(f"--part / --num_parts: expected 0 <= part < num_parts, got part {part} of {num_parts}")
    if merge and num_parts < 2:
        raise DataError("--merge: give the --num_parts the parts were converted with (>= 2)")


def part_dir_name(part: int, num_parts: int) -> str:
    """Folder (inside ``--output``) of part ``part`` of ``num_parts``: ``part-<i>-of-<n>``."""
    return f"part-{part}-of-{num_parts}"


def gather_parts(out: Path, work: Path, num_parts: int, settings_hash: str) -> None:
    """Move the encoded episodes of every finished part into the merge's work directory.

    Idempotent: a merge killed while moving finds the moved files in ``work`` and the rest in the parts.

    Raises:
        DataError: a part folder missing, unfinished or converted with other options (one line naming it).
    """
    work.mkdir(parents=True, exist_ok=True)
    for i in range(num_parts):
        folder = out / part_dir_name(i, num_parts)
        try:
            manifest = json.loads((folder / S.MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("status") not in (PART_COMPLETE, "merged"):
            raise DataError(f"{folder}: part {i} of {num_parts} is not finished; run the same convert command "
                            f"with --part {i} --num_parts {num_parts} first")
        if manifest.get("settings_hash") != settings_hash:
            raise DataError(f"{folder}: part {i} was converted with other options or another episode list than "
                            f"this merge; merge with the options of the parts")
        for path in sorted((folder / WORK_DIR).glob("*")):
            if not path.name.startswith("."):  # half-written temporary files of a killed part
                shutil.move(str(path), str(work / path.name))
        manifest["status"] = "merged"
        write_json_atomic(folder / S.MANIFEST, manifest)


def episode_outcomes(reader, refs: list[EpisodeRef]) -> dict[str, bool | None]:
    """Each episode's success label (None where the episode cannot be read: it is reported, or skipped
    with ``--skip_bad``, when converted), for the stratified split. Reads every episode's labels and
    low-dimensional arrays once (images stay lazy)."""
    out: dict[str, bool | None] = {}
    for ref in refs:
        try:
            with reader.open(ref) as episode:
                out[ref.episode_id] = bool(episode.success)
        except DataError:
            out[ref.episode_id] = None
    return out


def choose_validation(refs: list[EpisodeRef], fraction: float, names: list[str] | None, seed: int,
                      outcomes: dict[str, bool | None] | None = None) -> set[str]:
    """Ids of the validation episodes.

    ``names`` (ids or any alias: group name, file name, stem) win over ``fraction``; otherwise
    ``round(fraction * N)`` episodes (at least 1 when ``fraction > 0`` and N >= 2, never all) are
    drawn with ``seed``, stratified by outcome when ``outcomes`` (episode id -> success, None =
    unknown) holds more than one class: each class gives ``round(fraction * n_class)`` episodes (largest
    remainders, summing to the total), at least one of every class with two or more episodes, so held-out
    metrics that need both outcomes (the value AUROC) are defined. A class too small to hold out (one
    episode, which training keeps) is reported on stderr. With one class the draw is the unstratified one.

    Raises:
        DataError: a name matches no episode, or every episode would be held out.
    """
    if names:
        by_alias: dict[str, str] = {}
        for r in refs:
            for a in r.aliases:
                by_alias.setdefault(a, r.episode_id)
        unknown = [n for n in names if n not in by_alias]
        if unknown:
            raise DataError(f"--val_episodes: no episode named {unknown[0]!r} (ids look like {refs[0].episode_id!r})")
        chosen = {by_alias[n] for n in names}
        if len(chosen) >= len(refs):
            raise DataError("--val_episodes: every episode is held out; keep at least one for training")
        return chosen
    n = len(refs)
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    ids = sorted(r.episode_id for r in refs)
    rng = np.random.default_rng(seed)
    classes = sorted({outcomes.get(i) for i in ids}, key=lambda c: (c is None, c is False)) if outcomes else []
    if len(classes) <= 1 or not k:
        return {ids[i] for i in rng.choice(n, size=k, replace=False)} if k else set()
    members = {c: [i for i in ids if outcomes.get(i) == c and (outcomes.get(i) is None) == (c is None)]
               for c in classes}
    exact = {c: fraction * len(members[c]) for c in classes}
    take = {c: int(np.floor(exact[c])) for c in classes}
    for c in sorted(classes, key=lambda c: exact[c] - take[c], reverse=True)[:max(0, k - sum(take.values()))]:
        take[c] += 1
    names_of = {True: "successful", False: "failed", None: "unreadable"}
    for c in classes:
        if len(members[c]) >= 2:
            take[c] = min(max(take[c], 1), len(members[c]) - 1)
        elif c is not None:
            take[c] = 0
            _log(f"--val_fraction {fraction}: the only {names_of[c]} episode stays in training; no {names_of[c]} "
                 f"episode is held out (held-out metrics that need both outcomes, e.g. the value AUROC, are undefined)")
    while sum(take.values()) > k and max(take.values()) > 1:  # the minimum of one came from the largest class
        take[max(classes, key=lambda c: (take[c], len(members[c])))] -= 1
    chosen: set[str] = set()
    for c in classes:
        group = members[c]
        if take[c]:
            chosen |= {group[i] for i in rng.choice(len(group), size=take[c], replace=False)}
    return chosen


def split_orders(ids: list[str], val_ids: set[str], seed: int) -> dict[str, list[str]]:
    """Episodes of each split in shard order: a seeded permutation, so that consecutive shards (and
    each shard) mix tasks even when the source lists them task by task."""
    rng = np.random.default_rng([seed, 1])
    out = {}
    for split in S.SPLITS:
        members = [i for i in ids if (i in val_ids) == (split == "validation")]
        out[split] = [members[j] for j in rng.permutation(len(members))]
    return out


def _is_part_dir(path: Path) -> bool:
    parts = path.name.split("-")
    return path.is_dir() and len(parts) == 4 and parts[0] == "part" and parts[2] == "of"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class _Conversion:
    """State of one conversion in ``output``: manifest, finished episodes and shards, cursors."""

    def __init__(self, out: Path, emb: Embodiment, emb_file: str, source: str, settings: dict[str, Any],
                 orders: dict[str, list[str]], overwrite: bool):
        self.out, self.emb, self.orders, self.settings = out, emb, orders, settings
        self.work = out / WORK_DIR
        self.shard_bytes = settings["shard_size_mb"] * MB
        settings_hash = _settings_hash(settings, emb, orders)
        previous = self._previous_manifest(settings_hash, overwrite)
        self.complete = bool(previous and previous.get("status") == "complete")
        if previous:
            self.manifest = previous
            if self.complete:
                shutil.rmtree(self.work, ignore_errors=True)  # killed after completion, before cleanup
                self._check_shards()  # "nothing to do" only if the shards are still those it wrote
                return
        else:
            self.manifest = {
                "version": MANIFEST_VERSION, "status": "in_progress", "tool": "cosmos-policy convert",
                "source": {"argument": str(source), "format": settings["format"], "paths": settings["paths"]},
                "embodiment": emb.to_dict(), "embodiment_file": str(emb_file),
                "settings": settings, "settings_hash": settings_hash,
                "splits": orders, "shards": [],
            }
            self._save_manifest()
        self.work.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out.glob(".*.tmp"), *self.work.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)  # half-written files of a killed run
        self._check_shards()
        self.records = self._load_records()
        self.cursor = {split: 0 for split in S.SPLITS}
        for shard in self.manifest["shards"]:
            self.cursor[shard["split"]] = max(self.cursor[shard["split"]], shard["order_end"])
        self.shard_index = {split: sum(s["split"] == split for s in self.manifest["shards"]) for split in S.SPLITS}

    # ------------------------------------------------------------------ resume bookkeeping
    def _previous_manifest(self, settings_hash: str, overwrite: bool) -> dict[str, Any] | None:
        path = self.out / S.MANIFEST
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {}
            if old.get("settings_hash") == settings_hash and not overwrite:
                return old
            if not overwrite:
                diff = next((k for k in self.settings if old.get("settings", {}).get(k) != self.settings[k]),
                            "embodiment or episode list")
                raise DataError(f"{self.out}: holds a conversion with other settings (first difference: {diff}); "
                                f"pass --overwrite to replace it, or choose another --output")
            self._clear()
        elif self.out.exists() and any(p.name != LOCK_NAME and not p.name.startswith(WRITE_PROBE_PREFIX)
                                       and not _is_part_dir(p) for p in self.out.iterdir()):
            raise DataError(f"{self.out}: directory is not empty and holds no {S.MANIFEST}; choose an empty "
                            f"or new --output")
        return None

    def _clear(self) -> None:
        """Remove what a previous conversion wrote (only its own files)."""
        for split in S.SPLITS:
            for p in self.out.glob(f"{split}-*.tar"):
                p.unlink()
        for p in self.out.glob(".*.tmp"):
            p.unlink()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.out / S.TEXT_DIR, ignore_errors=True)
        # The latent cache encodes the old shards: it goes with them (a cache elsewhere is refused by its
        # content fingerprint).
        shutil.rmtree(self.out / LATENTS_DIR, ignore_errors=True)
        for name in (S.STATS, S.MANIFEST):
            (self.out / name).unlink(missing_ok=True)

    def _check_shards(self) -> None:
        for shard in self.manifest["shards"]:
            path = self.out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise DataError(f"{path}: shard listed in {S.MANIFEST} is missing or changed; pass --overwrite "
                                f"to convert again from scratch")

    def _load_records(self) -> dict[str, dict[str, Any]]:
        records = {}
        for path in self.work.glob("*.json"):
            try:
                rec = json.loads(path.read_text())
            except ValueError:
                continue  # cannot happen with atomic writes; redo the episode if it does
            records[rec["episode"]] = rec
        return records

    def _save_manifest(self) -> None:
        write_json_atomic(self.out / S.MANIFEST, self.manifest)

    def _needs_work(self, eid: str, in_shard: bool) -> bool:
        rec = self.records.get(eid)
        if rec is None:
            return True
        if "bad" in rec:
            return False
        if not (self.work / f"{eid}.npz").is_file():
            return True
        return not in_shard and not (self.work / f"{eid}.spill").is_file()

    # ------------------------------------------------------------------ the work
    def run(self, reader, refs: dict[str, EpisodeRef], encode: EncodeSettings, workers: int, progress: bool,
            only: set[str] | None = None) -> None:
        """Process every unfinished episode and write every unfinished shard; with ``only`` (a part), process
        just those episodes and write no shard (the merge does)."""
        bad = [r for r in self.records.values() if "bad" in r]
        if bad and not encode.skip_bad:
            raise DataError(bad[0]["bad"])
        jobs = []
        for split in S.SPLITS:
            for pos, eid in enumerate(self.orders[split]):
                if only is not None and eid not in only:
                    continue
                if self._needs_work(eid, pos < self.cursor[split]):
                    self.records.pop(eid, None)
                    jobs.append((refs[eid], split))
        total = len(only) if only is not None else sum(len(o) for o in self.orders.values())
        assemble = self._assemble if only is None else (lambda: None)
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=total - len(jobs), unit="episode", desc="convert", disable=not progress,
                   dynamic_ncols=True)
        started, frames, n_bad = time.perf_counter(), 0, len(bad)
        try:
            assemble()  # shards whose episodes all finished before a kill
            for rec in self._results(reader, jobs, encode, workers):
                self.records[rec["episode"]] = rec
                frames += rec.get("length", 0) * self.emb.num_cameras
                n_bad += "bad" in rec
                bar.update(1)
                bar.set_postfix(frames_per_s=f"{frames / max(time.perf_counter() - started, 1e-9):.0f}",
                                bad=n_bad)
                assemble()
        finally:
            bar.close()
            reader.close()
        assemble()

    def _results(self, reader, jobs, encode: EncodeSettings, workers: int):
        if workers <= 1 or len(jobs) <= 1:
            for ref, split in jobs:
                yield process_episode(reader, ref, split, encode)
            return
        reader.close()  # the workers open their own handles
        # spawn: no inherited HDF5 handles or threads, and workers never import torch. An executor, not a
        # Pool: a worker that dies (or fails to start) raises BrokenProcessPool instead of being respawned.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=init_worker,
                                 initargs=(reader, encode)) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    yield future.result()
            except BrokenProcessPool:
                raise DataError("a conversion worker process died (out of memory?); run again to resume, "
                                "or use fewer --workers") from None
            finally:
                for future in futures:
                    future.cancel()

    def _assemble(self) -> None:
        """Write every shard whose episodes are all finished (in split order, deterministic grouping)."""
        for split in S.SPLITS:
            order = self.orders[split]
            while True:
                group, size, pos = [], 0, self.cursor[split]
                while pos < len(order) and order[pos] in self.records:
                    rec = self.records[order[pos]]
                    pos += 1
                    if "bad" in rec:
                        continue
                    group.append(rec)
                    size += rec["tar_bytes"]
                    if size >= self.shard_bytes or len(group) >= MAX_EPISODES_PER_SHARD:
                        break
                full = size >= self.shard_bytes or len(group) >= MAX_EPISODES_PER_SHARD
                if pos == len(order) and not group:
                    self.cursor[split] = pos  # only bad episodes left
                    break
                if not group or not (full or pos == len(order)):
                    break
                self._write_shard(split, group, pos)

    def _write_shard(self, split: str, group: list[dict[str, Any]], order_end: int) -> None:
        index = self.shard_index[split]
        name = shard_name(split, index)
        spills = [self.work / f"{rec['episode']}.spill" for rec in group]
        counts = [rec["samples"] for rec in group]
        digest = hashlib.sha256()
        nbytes = write_shard(self.out / name, spills, counts, seed=int(_hash([self.settings["seed"], name]), 16),
                             hasher=digest)
        self.manifest["shards"].append({"name": name, "split": split, "samples": sum(counts), "bytes": nbytes,
                                        "sha256": digest.hexdigest(),
                                        "episodes": [rec["episode"] for rec in group], "order_end": order_end})
        self.manifest["finished_episodes"] = sum(len(s["episodes"]) for s in self.manifest["shards"])
        self._save_manifest()  # the shard is finished from here on; its spills may go
        for p in spills:
            p.unlink(missing_ok=True)
        self.cursor[split] = order_end
        self.shard_index[split] = index + 1

    # ------------------------------------------------------------------ statistics, text, manifest
    def finish(self, text_encoder: str) -> dict[str, Any]:
        """The last step, once every shard is written: check that training episodes are left, write
        stats.json and text_embeddings/, mark the manifest complete, remove the work directory
        (each output by its function in ``conversion_outputs.py``)."""
        good, bad = split_results(self.records, self.orders, self.out)
        fp = write_statistics(self.out / S.STATS, self.work, self.emb, good["train"])
        from .integrity import file_sha256

        stats_sha256 = file_sha256(self.out / S.STATS)  # checked by readers: statistics edited by hand are refused
        instructions = sorted({r["instruction"] for recs in good.values() for r in recs})
        identity = cache_text_embeddings(self.out / S.TEXT_DIR, instructions, text_encoder)
        # Shards in split order: with several workers a validation shard may be finished before the last
        # train shard; the final manifest must not depend on that timing.
        self.manifest["shards"].sort(key=lambda sh: (S.SPLITS.index(sh["split"]), sh["name"]))
        counts, episodes = manifest_summary(good, bad, self.manifest["shards"])
        self.manifest.update(status="complete", counts=counts, episodes=episodes, bad_episodes=bad,
                             instructions=instructions, stats_fingerprint=fp, stats_sha256=stats_sha256,
                             text_encoder=identity,
                             finished_episodes=len(episodes) + len(bad))
        self._save_manifest()
        shutil.rmtree(self.work, ignore_errors=True)
        _log(summary_line(self.out, counts))
        return self.manifest
