"""Every shell command in README.md runs, so the README cannot drift from the code (after litgpt's test_readme).

Each fenced ``bash`` block is split into commands (backslash continuations joined, ``#`` comments dropped,
``&&`` chains split). A ``cosmos-policy`` command is run as a subprocess of the installed console script:

- ``layout`` for real (it is cheap and prints the table / JSON the README shows);
- everything else as a dry run with ``--print_config`` appended: jsonargparse and LightningCLI parse and
  type-check every option the README passes (unknown option, bad choice, wrong type -> exit != 0) and, for
  ``fit`` / ``test``, load the recipe and data YAMLs, without training or touching the data.

Every path under one of the repository's shipped folders (``embodiments/``, ``recipes/``, ``datamodules/``,
``samples/``, ``assets/``) that a command names must exist, and an embodiment it names must load
(``cosmos-policy layout``). Commands that install software or start long-lived tools are skipped, each with
its reason in :data:`SKIPPED`; any other program is an error, so a new kind of command needs a decision here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .fixtures.markdown_blocks import bash_commands as readme_commands

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHIPPED_FOLDERS = ("embodiments/", "recipes/", "datamodules/", "samples/", "assets/")

#: Programs the test does not run, and why.
SKIPPED = {
    "pip": "installs packages (the environment running this test already has them)",
    "tensorboard": "a long-running web server; the log directory it shows is written by the fit command above",
    "python": "`python -m pytest` is this test suite itself",
}


COMMANDS = readme_commands(README.read_text())
CLI_COMMANDS = [c for c in COMMANDS if c[0] == "cosmos-policy"]


def _cosmos_policy() -> list[str]:
    exe = shutil.which("cosmos-policy", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    assert exe, "the cosmos-policy console script is not installed (pip install -e .)"
    return [exe]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(_cosmos_policy() + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_readme_has_commands():
    """The parser finds the README's commands (an empty list would make every other test vacuous)."""
    programs = {c[0] for c in COMMANDS}
    assert len(CLI_COMMANDS) >= 10, CLI_COMMANDS
    assert {"layout", "convert", "fit", "test", "evaluate", "serve", "import-checkpoint"} <= {c[1] for c in CLI_COMMANDS}
    unknown = programs - {"cosmos-policy"} - set(SKIPPED)
    assert not unknown, f"README runs programs this test does not know how to check: {sorted(unknown)}"


def test_readme_parser_handles_continuations_comments_and_chains():
    text = ("```bash\nA=1 cosmos-policy fit --x 'a # b' \\\n    --y 2   # comment\npip install z && B=2 python -m q\n```\n"
            "```python\nnot = 'a command'\n```\n")
    assert readme_commands(text) == [["cosmos-policy", "fit", "--x", "a # b", "--y", "2"],
                                     ["pip", "install", "z"], ["python", "-m", "q"]]


@pytest.mark.parametrize("argv", CLI_COMMANDS, ids=[" ".join(c[1:3]) for c in CLI_COMMANDS])
def test_readme_command(argv: list[str]):
    args = argv[1:]
    for token in args:
        if token.startswith(SHIPPED_FOLDERS):
            assert (REPO / token).exists(), f"README names {token}, which is not in the repository"
    for i, token in enumerate(args[:-1]):
        if token == "--embodiment":
            done = _run(["layout", args[i + 1]])
            assert done.returncode == 0, f"embodiment {args[i + 1]} does not load:\n{done.stderr}"
    if args[0] == "layout":
        done = _run(args)
        assert done.returncode == 0, done.stderr
        assert "latent" in done.stdout
        return
    done = _run(args + ["--print_config"])
    assert done.returncode == 0, f"`{shlex.join(argv)} --print_config` failed:\n{done.stderr[-3000:]}"
    # --print_config echoes the parsed options: the README's values really reached the parser
    options = {a[2:].split("=")[0].replace("-", "_") for a in args if a.startswith("--")} - {"config", "data"}
    for name in options:
        assert re.search(rf"^\s*{name}:", done.stdout, flags=re.M), f"--{name} missing from the parsed config"
