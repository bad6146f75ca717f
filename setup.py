"""Build step that pyproject.toml cannot express: copy the shipped files into the wheel.

The top-level ``embodiments/`` and ``assets/tiny_wan_vae/`` stay the only copy in git; ``build_py`` copies them
into ``cosmos_policy_lightning/_shipped/`` of the build, where ``cosmos_policy_lightning.shipped`` finds them
with importlib.resources once installed. Editable installs skip the copy and read the top-level folders.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED_FOLDERS = ("embodiments", "assets/tiny_wan_vae", "assets/tiny_aloha_vae")  # = cosmos_policy_lightning.shipped.SHIPPED_FOLDERS
PACKAGE_FOLDER = Path("cosmos_policy_lightning") / "_shipped"


class BuildPyWithShippedFiles(build_py):
    """``build_py``, then the shipped folders copied under ``cosmos_policy_lightning/_shipped/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the top-level folders of the checkout
        for folder in SHIPPED_FOLDERS:
            source = ROOT / folder
            files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            if not files:
                raise FileNotFoundError(f"{source}: nothing to ship (a shipped folder is missing)")
            for f in files:
                target = Path(self.build_lib) / PACKAGE_FOLDER / folder / f.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
