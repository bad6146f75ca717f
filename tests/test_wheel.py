"""The package works when installed from its wheel, outside the source checkout.

Builds the wheel from a copy of what the build reads (so nothing outside it can leak in), checks that it carries
the shipped files byte for byte (``setup.py`` copies ``embodiments/`` and ``assets/tiny_wan_vae/``), installs it
into a fresh virtual environment (``--system-site-packages`` for torch and the other dependencies, ``--no-deps``
and ``--no-index`` so nothing is downloaded), and runs it from a directory that is not the checkout:
``cosmos-policy layout metaworld`` by bare name, and the recipes' default VAE path ``assets/tiny_wan_vae``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cosmos_policy_lightning.shipped import PACKAGE_FOLDER, SHIPPED_FOLDERS

from .conftest import REPO

#: What the build reads: setup.py copies the shipped folders, pyproject names README.md as the readme.
BUILD_INPUTS = ("src", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", *SHIPPED_FOLDERS)


def _run(argv: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """``(venv python, a working directory outside the checkout)`` with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for rel in BUILD_INPUTS:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, source / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        else:
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, source / rel)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", "."],
         cwd=source)
    (wheel,) = (root / "dist").glob("cosmos_policy_lightning-*.whl")

    # the wheel carries every shipped file, unchanged
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for folder in SHIPPED_FOLDERS:
            files = [p for p in sorted((REPO / folder).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
            assert files, folder
            for f in files:
                member = f"cosmos_policy_lightning/{PACKAGE_FOLDER}/{f.relative_to(REPO).as_posix()}"
                assert member in names, f"{member} missing from {wheel.name}"
                assert zf.read(member) == f.read_bytes(), f"{member} differs from {f}"

    venv = root / "venv"
    # --without-pip: the outer pip (a system site-package) installs into the venv, faster than ensurepip
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    python, elsewhere = installed
    out = _run([python, "-c", "import cosmos_policy_lightning as c; print(c.__file__)"], cwd=elsewhere).stdout
    where = Path(out.strip())
    assert python.parent.parent in where.parents, f"imported {where}, not the venv's copy"
    assert REPO not in where.parents


def test_layout_of_a_shipped_embodiment_by_bare_name(installed):
    python, elsewhere = installed
    cli = python.parent / "cosmos-policy"
    table = _run([cli, "layout", "metaworld"], cwd=elsewhere).stdout
    assert "metaworld: 9 latent frames of 16x8x8" in table
    lay = json.loads(_run([cli, "layout", "pusht", "--json"], cwd=elsewhere).stdout)
    assert lay["num_latent_frames"] == 7
    done = subprocess.run([cli, "layout", "no_such_robot"], cwd=elsewhere, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "shipped embodiments, by bare name: aloha, aloha_sim, libero, metaworld" in done.stderr


def test_shipped_files_resolve_inside_the_installed_package(installed):
    python, elsewhere = installed
    code = (
        "import json\n"
        "from cosmos_policy_lightning.shipped import resolve_path\n"
        "from cosmos_policy_lightning.model.vae import VideoVAE\n"
        "from cosmos_policy_lightning.sim.metaworld import DEFAULT_EMBODIMENT\n"
        "from cosmos_policy_lightning.embodiment import Embodiment\n"
        "vae = resolve_path('assets/tiny_wan_vae')\n"
        "VideoVAE(vae)\n"
        "emb = Embodiment.from_yaml('embodiments/libero.yaml')\n"
        "print(json.dumps({'vae': vae, 'metaworld': str(DEFAULT_EMBODIMENT), 'libero': emb.name}))\n"
    )
    found = json.loads(_run([python, "-c", code], cwd=elsewhere).stdout.strip().splitlines()[-1])
    site = python.parent.parent
    for key in ("vae", "metaworld"):
        assert site in Path(found[key]).parents and f"cosmos_policy_lightning/{PACKAGE_FOLDER}/" in found[key], found
    assert found["libero"] == "libero"


def test_one_step_fit_from_the_installed_package(installed):
    """``cosmos-policy fit`` of the installed package, from outside the checkout: the model's default VAE
    (``assets/tiny_wan_vae``) comes from the wheel, a converted toy dataset from this test."""
    import yaml

    from .fixtures.shard_factory import TOY_EMBODIMENT, HashTextEncoder, standard_episodes, write_dataset

    python, elsewhere = installed
    run = elsewhere / "fit"
    write_dataset(run / "data", standard_episodes(2, 1, 1, 1, length=6), text_encoder=HashTextEncoder())
    (run / "toy.yaml").write_text(yaml.safe_dump(TOY_EMBODIMENT))
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 0, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(run / "out"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "out" / "checkpoints"), "save_last": True}}]},
        "model": {"class_path": "cosmos_policy_lightning.model.module.CosmosPolicyModule",
                  "init_args": {"transformer": "tiny", "warmup_steps": 1}},  # vae: the default, assets/tiny_wan_vae
        "data": {"class_path": "cosmos_policy_lightning.data.datamodule.CosmosDataModule",
                 "init_args": {"data_dir": str(run / "data"), "embodiment": str(run / "toy.yaml"), "convert_from": None,
                               "num_workers": 0, "batch_size": 4, "latent_cache": False}},
    }
    (run / "fit.yaml").write_text(yaml.safe_dump(config))
    _run([python.parent / "cosmos-policy", "fit", "--config", run / "fit.yaml"], cwd=elsewhere)
    assert (run / "out" / "checkpoints" / "last.ckpt").is_file()
