"""Files shipped with the package: the embodiment YAMLs and the tiny Wan2.1 VAEs (Meta-World, ALOHA simulation).

The repository's top-level folders ``embodiments/`` and ``assets/tiny_wan_vae/`` are the source of truth. A
built wheel carries copies of them inside the package, under ``cosmos_policy_lightning/_shipped/`` (``setup.py``
copies them at build time), found here through :mod:`importlib.resources`; a source checkout or an editable
install has no such copy and reads the top-level folders. So ``pip install .`` works outside the checkout, and
nothing is duplicated in git.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePosixPath
from typing import Any

#: The folders copied into the wheel, relative to the repository root (setup.py reads this list too).
SHIPPED_FOLDERS = ("embodiments", "assets/tiny_wan_vae", "assets/tiny_aloha_vae")
#: Where the copies live inside the installed package.
PACKAGE_FOLDER = "_shipped"
#: Root of a source checkout (``src/cosmos_policy_lightning/shipped.py`` -> the repository); only used when it
#: really is one (it holds ``pyproject.toml``).
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def shipped_path(relative: str | Path) -> Path | None:
    """Where a shipped file or folder is on this machine, or None when it is not shipped.

    Args:
        relative: a path relative to the repository root, e.g. ``"assets/tiny_wan_vae"`` or
            ``"embodiments/metaworld.yaml"``; must lie in one of :data:`SHIPPED_FOLDERS`.

    Returns:
        the copy inside the installed package if there is one, else the file in the source checkout, else None.
    """
    rel = PurePosixPath(Path(relative).as_posix())
    if rel.is_absolute() or ".." in rel.parts or not any(
            rel == PurePosixPath(f) or PurePosixPath(f) in rel.parents for f in SHIPPED_FOLDERS):
        return None
    packaged = importlib.resources.files(__package__).joinpath(PACKAGE_FOLDER, *rel.parts)
    if packaged.is_file() or packaged.is_dir():
        return Path(str(packaged))  # an installed wheel is unpacked on disk, so this is a real path
    return checkout_path(rel)


def checkout_path(relative: str | Path) -> Path | None:
    """``relative`` inside the source checkout this package runs from, if it is one (it holds
    ``pyproject.toml``) and the path exists there; else None (an installed wheel has no checkout)."""
    path = CHECKOUT_ROOT / relative
    return path if (CHECKOUT_ROOT / "pyproject.toml").is_file() and path.exists() else None


def resolve_path(source: Any) -> Any:
    """A relative path that does not exist from the working directory is looked up among the shipped files
    (``assets/tiny_wan_vae``, ``embodiments/...``: inside the installed package, or the source checkout,
    :func:`shipped_path`), then in the source checkout (:func:`checkout_path`), so recipes and checkpoints
    naming ``assets/...`` work from any directory and from a wheel install.

    Returns:
        the found path as a ``str``; ``source`` itself when it exists, is absolute, is found nowhere, or is
        not a string (Hub ids and dicts pass through).
    """
    if isinstance(source, str) and not Path(source).is_absolute() and not Path(source).exists():
        found = shipped_path(source) or checkout_path(source)
        if found is not None:
            return str(found)
    return source


def shipped_embodiments() -> dict[str, Path]:
    """Name -> YAML path of every shipped embodiment (``metaworld`` -> ``.../embodiments/metaworld.yaml``)."""
    folder = shipped_path("embodiments")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder is not None else {}


def embodiment_path(name: str) -> Path | None:
    """The shipped YAML of the embodiment called ``name`` (a bare name such as ``metaworld``), or None."""
    if not name or "/" in name or "\\" in name or name.endswith((".yaml", ".yml")):
        return None
    return shipped_embodiments().get(name)
