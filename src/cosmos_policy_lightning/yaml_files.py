"""Strict reading of the YAML files users write (embodiments, recipes, data-module configs).

PyYAML keeps the last of two equal keys in one mapping and ``Path.read_text`` raises a bare
``UnicodeDecodeError``; both reach users as silent wrong settings or tracebacks. :func:`load_yaml_file`
refuses them in one line naming the file and the line (``errors.CosmosPolicyError`` or the subclass the
caller asks for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import CosmosPolicyError


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str | Path, error: type[CosmosPolicyError] = CosmosPolicyError) -> Any:
    """Read a YAML file strictly: UTF-8 text, valid YAML, no key twice in one mapping.

    Args:
        path: the file.
        error: the exception class raised (e.g. ``EmbodimentError``).

    Returns:
        the parsed document (``yaml.safe_load`` semantics).

    Raises:
        ``error``: one line, ``<file>: not UTF-8 text (byte 0xe9 at offset N, line L)``, ``<file>: cannot read
            (...)``, ``<file>: not valid YAML (...)`` or ``<file>: line L: key 'k' appears twice in one mapping``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}, line {line}); "
                    f"save the file as UTF-8") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: not valid YAML ({first}{where})") from None
    except _DuplicateKey as dup:
        raise error(f"{path}: line {dup.line}: key {dup.key!r} appears twice in one mapping "
                    f"(YAML would silently keep the last value)") from None


__all__ = ["UniqueKeyLoader", "load_yaml_file"]
