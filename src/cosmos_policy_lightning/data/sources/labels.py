"""Success labels, fractional scores and instructions of episodes (docs/method.md §4).

Success, first rule that applies:

1. ``--all_success``: every episode succeeded (score 1);
2. ``--success_sidecar``: a JSON or CSV file mapping episode -> success / score (an episode missing
   from it is an error);
3. ``--success_regex``: a regex searched in ``<path>`` or ``<path>:<group>``; a match is a success, no
   match a failure; a named group ``score`` gives a fractional score;
4. attributes ``success`` (and optional ``success_score``) of the episode group / file (the rollout
   layout of the reference, per-episode arrays ``meta/success`` in Zarr);
5. per-step ``rewards`` (success if the last reward is positive) or else ``dones`` (last done set);
6. otherwise a one-line error suggesting the options above.

When only a score is known, success means ``score >= 1``; when only success is known the score is
1 or 0. The score drives the value curve (``data/returns.py``), success picks policy samples.

Instruction (``--instruction_from``): ``auto`` = sidecar column ``instruction``, else an attribute
(``task_description``, ``language_instruction``, ``instruction``, LIBERO's ``problem_info``), else
``--instruction``, else the file name; ``attribute`` / ``sidecar`` / ``filename`` / ``default`` force
one source and fail when it is missing.

Sidecar formats. JSON: ``{"<episode>": true | 0.5 | {"success": .., "score": .., "instruction": ..}}``
or a list of objects with an ``episode`` field. CSV: a header with ``episode`` and any of ``success``,
``score``, ``instruction``. ``<episode>`` may be the episode id, the group name (``demo_3``), the
file name or stem, or the path.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError

INSTRUCTION_ATTRS = ("task_description", "language_instruction", "instruction", "task")
INSTRUCTION_MODES = ("auto", "attribute", "filename", "sidecar", "default")
_TRUE = {"1", "true", "yes", "y", "t", "success", "succeeded"}
_FALSE = {"0", "false", "no", "n", "f", "failure", "failed", ""}


@dataclass(frozen=True)
class LabelOptions:
    """Labelling options of a conversion (see the module docstring for the rules)."""

    all_success: bool = False
    success_sidecar: str | None = None
    success_regex: str | None = None
    instruction: str | None = None
    instruction_from: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _scalar(value: Any) -> Any:
    """HDF5 / Zarr attribute value as a plain Python scalar (bytes decoded, 0-d arrays unwrapped)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def parse_success(value: Any, where: str) -> bool:
    """Bool from bool / number / text (``true``, ``1``, ``yes``, ``failed`` ...)."""
    value = _scalar(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value > 0)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{where}: cannot read success from {value!r} (expected true/false/1/0)")


def parse_score(value: Any, where: str) -> float:
    """Score in [0, 1]."""
    value = _scalar(value)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: success score {value!r} is not a number") from None
    if not (0.0 <= score <= 1.0):
        raise DataError(f"{where}: success score must be in [0, 1], got {score}")
    return score


def combine(success: Any, score: Any, where: str) -> tuple[bool, float]:
    """``(success, score)`` from either or both (see module docstring).

    Raises:
        DataError: neither given, unreadable values, or contradictory ones (success with score 0,
            failure with score 1).
    """
    if success is None and score is None:
        raise DataError(f"{where}: neither success nor score given")
    s = parse_score(score, where) if score is not None else None
    if success is None:
        return bool(s >= 1.0), float(s)
    ok = parse_success(success, where)
    # Contradictions would train silently wrong: a "success" of score 0 has value -1 at every step (a
    # failure's curve) yet feeds policy samples; a failure of score 1 is a success by definition.
    if s is not None and ok and s <= 0.0:
        raise DataError(f"{where}: success is true but the success score is {s:g}; a success needs a score in "
                        f"(0, 1] (fix the label, or drop the score to use 1)")
    if s is not None and not ok and s >= 1.0:
        raise DataError(f"{where}: success is false but the success score is {s:g} (a score of 1 means success); "
                        f"fix the label")
    return ok, float(s) if s is not None else (1.0 if ok else 0.0)


def filename_instruction(path: str | Path, per_episode_file: bool) -> str:
    """Task text from a file name: ``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5`` -> ``turn on the
    stove``. For one-episode-per-file layouts the parent directory names the task."""
    p = Path(path)
    name = p.parent.name if per_episode_file else p.name
    for suffix in (".zip", ".zarr", ".hdf5", ".h5", ".he5"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    tokens = [t for t in re.split(r"[_\-\s]+", name) if t]
    while tokens and re.fullmatch(r"[A-Z0-9]+", tokens[0]) and len(tokens) > 1:  # scene prefixes
        tokens.pop(0)
    if tokens and tokens[-1].lower() == "demo":
        tokens.pop()
    return " ".join(tokens).lower()


class Labeler:
    """Applies :class:`LabelOptions` to episodes; loads the sidecar once.

    Raises:
        DataError: unreadable sidecar, bad regex, unknown ``instruction_from``.
    """

    def __init__(self, options: LabelOptions):
        self.options = options
        if options.instruction_from not in INSTRUCTION_MODES:
            raise DataError(f"--instruction_from: expected one of {', '.join(INSTRUCTION_MODES)}, "
                            f"got {options.instruction_from!r}")
        self.sidecar: dict[str, dict[str, Any]] = {}
        if options.success_sidecar:
            self.sidecar = load_sidecar(options.success_sidecar)
        self.regex = None
        if options.success_regex:
            try:
                self.regex = re.compile(options.success_regex)
            except re.error as err:
                raise DataError(f"--success_regex: invalid regular expression ({err})") from None
        if options.instruction_from == "sidecar" and not self.sidecar:
            raise DataError("--instruction_from sidecar needs --success_sidecar with an instruction column")

    def label(self, episode, ref, attrs: Sequence[Mapping[str, Any]], rewards: Any = None, dones: Any = None,
              per_episode_file: bool = False):
        """Set ``success``, ``score`` and ``instruction`` of an Episode read through ``ref`` (an
        ``EpisodeRef``: ``source``, ``path``, ``aliases``); returns the episode."""
        episode.success, episode.score = self.success(ref.source, ref.aliases, attrs, rewards, dones)
        episode.instruction = self.instruction(ref.path, ref.aliases, attrs, per_episode_file)
        return episode

    def _sidecar_entry(self, aliases: Sequence[str]) -> dict[str, Any] | None:
        for alias in aliases:
            if alias in self.sidecar:
                return self.sidecar[alias]
        return None

    def success(self, source: str, aliases: Sequence[str], attrs: Sequence[Mapping[str, Any]],
                rewards: Any = None, dones: Any = None) -> tuple[bool, float]:
        """``(success, score)`` of one episode.

        Args:
            source: ``<path>`` or ``<path>:<group>`` (matched by the regex, named in messages).
            aliases: names of the episode (id first).
            attrs: attribute mappings to search, most specific first.
            rewards, dones: per-step arrays or None.
        """
        o = self.options
        where = f"{source}: episode {aliases[0]}"
        if o.all_success:
            return True, 1.0
        if o.success_sidecar:
            entry = self._sidecar_entry(aliases)
            if entry is None or ("success" not in entry and "score" not in entry):
                raise DataError(f"{o.success_sidecar}: no success entry for episode {aliases[0]} "
                                f"(tried {', '.join(dict.fromkeys(aliases))})")
            return combine(entry.get("success"), entry.get("score"), f"{o.success_sidecar}: {aliases[0]}")
        if self.regex is not None:
            m = self.regex.search(source)
            if not m:
                return False, 0.0
            score = m.groupdict().get("score")
            return (True, 1.0) if score is None else combine(None, score, f"{where}: --success_regex")
        for mapping in attrs:
            if "success" in mapping or "success_score" in mapping:
                return combine(mapping.get("success"), mapping.get("success_score"), f"{where}: attribute success")
        for steps in (rewards, dones):  # rewards first: a done flag may only mean a time limit
            if steps is not None and len(steps):
                last = float(np.asarray(steps, dtype=np.float64).reshape(len(steps), -1)[-1].max())
                return (True, 1.0) if last > 0 else (False, 0.0)
        raise DataError(f"{where}: no success label (no success attribute, rewards or dones); pass "
                        f"--all_success, --success_sidecar or --success_regex")

    def instruction(self, source_path: str, aliases: Sequence[str], attrs: Sequence[Mapping[str, Any]],
                    per_episode_file: bool) -> str:
        """Instruction text of one episode (see module docstring for the order)."""
        o = self.options
        mode = o.instruction_from
        where = f"{source_path}: episode {aliases[0]}"
        if mode in ("auto", "sidecar"):
            entry = self._sidecar_entry(aliases)
            if entry and entry.get("instruction"):
                return str(entry["instruction"])
            if mode == "sidecar":
                raise DataError(f"{o.success_sidecar}: no instruction for episode {aliases[0]}")
        if mode in ("auto", "attribute"):
            text = attribute_instruction(attrs)
            if text:
                return text
            if mode == "attribute":
                raise DataError(f"{where}: no instruction attribute ({', '.join(INSTRUCTION_ATTRS)}, problem_info)")
        if mode in ("auto", "default") and o.instruction:
            return o.instruction
        if mode == "default":
            raise DataError("--instruction_from default needs --instruction")
        return filename_instruction(source_path, per_episode_file)


def attribute_instruction(attrs: Sequence[Mapping[str, Any]]) -> str | None:
    """First instruction-like attribute in ``attrs`` (LIBERO keeps it in ``problem_info`` JSON)."""
    for mapping in attrs:
        for name in INSTRUCTION_ATTRS:
            if name in mapping:
                text = _scalar(mapping[name])
                if isinstance(text, str) and text.strip():
                    return text.strip()
        if "problem_info" in mapping:
            try:
                info = json.loads(_scalar(mapping["problem_info"]))
                text = info.get("language_instruction")
            except (TypeError, ValueError, AttributeError):
                text = None
            if isinstance(text, str) and text.strip():
                return text.strip()
    return None


def load_sidecar(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a JSON or CSV sidecar into ``{episode name: {"success"?, "score"?, "instruction"?}}``.

    Raises:
        DataError: missing file, unparsable content, no ``episode`` column / field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sidecar file not found")
    out: dict[str, dict[str, Any]] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            col = next((c for c in ("episode", "episode_id", "file", "name") if c in fields), None)
            if col is None:
                raise DataError(f"{path}: CSV sidecar needs an 'episode' column, got {', '.join(fields) or 'none'}")
            for row in reader:
                row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
                entry = {k: row[k] for k in ("success", "score", "instruction") if row.get(k) not in (None, "")}
                out[str(row[col])] = entry
        return out
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, Mapping) or "episode" not in item:
                raise DataError(f"{path}: item {i}: expected an object with an 'episode' field")
            out[str(item["episode"])] = {k: item[k] for k in ("success", "score", "instruction") if k in item}
    elif isinstance(data, Mapping):
        for name, value in data.items():
            if isinstance(value, Mapping):
                out[str(name)] = {k: value[k] for k in ("success", "score", "instruction") if k in value}
            elif isinstance(value, bool) or isinstance(value, str):
                out[str(name)] = {"success": value}
            elif isinstance(value, (int, float)):
                out[str(name)] = {"score": value}
            else:
                raise DataError(f"{path}: entry {name!r}: expected true/false, a score or an object")
    else:
        raise DataError(f"{path}: expected a JSON object or list")
    return out
