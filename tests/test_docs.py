"""The code blocks of ``docs/*.md`` are checked as the README's are (``tests/test_readme.py``), so the docs
cannot drift from the code either.

``bash`` blocks (split by ``tests/fixtures/markdown_blocks.py``: continuations, comments, ``&&``, a trailing
``&``, one-line ``for`` loops):

- ``cosmos-policy layout`` runs for real; every other ``cosmos-policy`` command is parsed by the real CLI with
  ``--print_config`` (in this process: jsonargparse / LightningCLI type-check every option and load the
  recipe and data YAMLs, nothing trains or reads data), and every option it passes must reach the parsed
  config; ``torchrun ... -m cosmos_policy_lightning.cli ARGS`` is checked as ``cosmos-policy ARGS``;
- ``python tools/<tool>.py ARGS`` parses ARGS with the tool's own jsonargparse ``CLI`` (``--print_config``),
  or, for a tool with another parser, the tool must exist; ``python -m pytest PATHS``: the paths must exist;
- a shell script of the repository must exist, be executable and pass ``bash -n``;
- every path under a shipped folder, ``tools/`` or ``tests/`` that a command names must exist (placeholders
  are listed in :data:`PLACEHOLDERS`), and ``...`` (more options, left out) is dropped.

``python`` blocks must compile; their imports are run, and every attribute they read from an imported name
(``D.sample_sigma``, ``CosmosPolicy.from_checkpoint``) must exist. Names imported in an earlier block of the
same page count (the pages continue one example over several blocks). Nothing else runs: the blocks load
checkpoints and drive robots.

Programs that are not checked are listed in :data:`SKIPPED` with their reason; any other is an error.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .fixtures.markdown_blocks import bash_commands, python_blocks

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
CHECKED_FOLDERS = ("embodiments/", "recipes/", "datamodules/", "samples/", "assets/", "tools/", "tests/")

#: Programs the test does not run, and why.
SKIPPED = {
    "pip": "installs packages (the environment running this test already has them)",
    "curl": "asks a running `cosmos-policy serve` (started by the block's serve command)",
    "sbatch": "submits to a Slurm cluster; the script and the files it is given are checked",
}

#: Paths that stand for the reader's own file -> a shipped file of the same kind, parsed in its place.
PLACEHOLDERS = {
    "datamodules/my_robot.yaml": "datamodules/aloha.yaml",
}


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for doc in DOCS:
        for argv in bash_commands(doc.read_text()):
            out.append((doc.name, [PLACEHOLDERS.get(a, a) for a in argv if a != "..."]))
    return out


COMMANDS = _commands()


def _ids() -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for doc, argv in COMMANDS:
        base = f"{doc}:{' '.join(argv[:2])}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(f"{base}#{seen[base]}")
    return ids


def _check_paths(args: list[str]) -> None:
    for token in args:
        path = token.split("=", 1)[-1]
        if path.startswith(CHECKED_FOLDERS) and not any(c in path for c in "*<>{}$"):
            assert (REPO / path).exists(), f"the docs name {path}, which is not in the repository"


def _options_reached(args: list[str], printed: str) -> None:
    """Every ``--name`` of ``args`` appears in the printed config (the value really reached the parser)."""
    for name in {a[2:].split("=")[0].replace("-", "_").split("+")[0] for a in args if a.startswith("--")} - {
            "config", "data", "print_config"}:
        key = name.split(".")[-1]
        assert re.search(rf"^\s*{re.escape(key)}:", printed, flags=re.M), f"--{name} missing from the parsed config"


def _parse_cosmos_policy(args: list[str], capsys) -> None:
    from cosmos_policy_lightning.cli import main

    if args[0] == "layout":
        assert main(args) == 0
        assert "latent" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code in (0, None), f"`cosmos-policy {shlex.join(args)} --print_config` failed:\n" \
                                         f"{captured.err[-3000:]}"
    _options_reached(args, captured.out)


def _tool_cli_function(path: Path) -> str | None:
    """The name of the function a tool hands to jsonargparse's ``CLI`` (None: the tool parses otherwise)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CLI" and node.args \
                and isinstance(node.args[0], ast.Name):
            return node.args[0].id
    return None


def _parse_tool(path: Path, args: list[str], capsys) -> None:
    from jsonargparse import CLI

    assert path.is_file(), f"the docs run {path.relative_to(REPO)}, which is not in the repository"
    name = _tool_cli_function(path)
    if name is None:
        compile(path.read_text(), str(path), "exec")
        return
    spec = importlib.util.spec_from_file_location(f"_docs_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as info:
        CLI(getattr(module, name), args=[*args, "--print_config"], prog=path.name)
    captured = capsys.readouterr()
    assert info.value.code in (0, None), f"`python {path.name} {shlex.join(args)}` does not parse:\n{captured.err}"
    _options_reached(args, captured.out)


def test_docs_have_commands_and_blocks():
    """The parser finds the docs' commands and python blocks (an empty list would make the checks vacuous)."""
    assert len(COMMANDS) >= 50, COMMANDS
    subcommands = {argv[1] for _, argv in COMMANDS if argv[0] == "cosmos-policy"}
    assert {"convert", "fit", "test", "evaluate", "collect", "serve", "import-checkpoint", "export"} <= subcommands
    assert sum(len(python_blocks(d.read_text())) for d in DOCS) >= 10


def test_the_block_parser_handles_loops_and_background_commands():
    text = ("```bash\nfor p in a b; do cosmos-policy evaluate x --policy $p --out runs/$p; done\n"
            "cosmos-policy serve CKPT --port 1 &\n```\n")
    assert bash_commands(text) == [["cosmos-policy", "evaluate", "x", "--policy", "a", "--out", "runs/a"],
                                   ["cosmos-policy", "evaluate", "x", "--policy", "b", "--out", "runs/b"],
                                   ["cosmos-policy", "serve", "CKPT", "--port", "1"]]


@pytest.mark.parametrize(("doc", "argv"), COMMANDS, ids=_ids())
def test_docs_command(doc: str, argv: list[str], capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [argv[0]])  # the CLI parses the doc's arguments, not pytest's
    program, args = argv[0], argv[1:]
    _check_paths(args)
    if program in SKIPPED:
        return
    if program == "torchrun":
        assert "-m" in args and args[args.index("-m") + 1] == "cosmos_policy_lightning.cli", argv
        program, args = "cosmos-policy", args[args.index("-m") + 2:]
    if program == "cosmos-policy":
        _parse_cosmos_policy(args, capsys)
    elif program == "python" and args[:2] == ["-m", "pytest"]:
        tests = [a.split("::")[0] for a in args[2:] if not a.startswith("-")]
        assert tests and all((REPO / t).exists() for t in tests), f"{doc}: pytest paths missing: {tests}"
    elif program == "python" and args and args[0].startswith("tools/"):
        _parse_tool(REPO / args[0], args[1:], capsys)
    elif program.endswith(".sh"):
        script = REPO / program
        assert script.is_file() and os.access(script, os.X_OK), f"{doc}: {program} missing or not executable"
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, program
    else:
        pytest.fail(f"{doc} runs {program!r}, which this test does not know how to check (add it to SKIPPED "
                    f"with a reason, or a check)")


def _attribute_reads(tree: ast.AST) -> list[tuple[str, str, int]]:
    """``(name, attribute, line)`` for every ``name.attribute`` read in ``tree`` (outermost name only)."""
    return [(n.value.id, n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)]


def _run_imports(tree: ast.AST, namespace: dict, where: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = importlib.import_module(alias.name)
                namespace[alias.asname or alias.name.split(".")[0]] = (
                    module if alias.asname else importlib.import_module(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    value = getattr(module, alias.name)
                else:  # a submodule: ``from pkg.model import diffusion``
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                namespace[alias.asname or alias.name] = value


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d.read_text())], ids=lambda d: d.name)
def test_docs_python_blocks_compile_and_name_what_exists(doc: Path):
    namespace: dict = {}
    for i, block in enumerate(python_blocks(doc.read_text())):
        where = f"{doc.name} python block {i + 1}"
        tree = ast.parse(block, filename=where)
        compile(tree, where, "exec")
        _run_imports(tree, namespace, where)
        for name, attr, line in _attribute_reads(tree):
            if name in namespace and not isinstance(namespace[name], dict):
                assert hasattr(namespace[name], attr), f"{where}, line {line}: {name}.{attr} does not exist"


def test_the_python_check_sees_a_missing_attribute():
    namespace: dict = {}
    tree = ast.parse("from cosmos_policy_lightning.model import diffusion as D\nD.no_such_function(1)\n")
    _run_imports(tree, namespace, "probe")
    missing = [(n, a) for n, a, _ in _attribute_reads(tree) if not hasattr(namespace[n], a)]
    assert missing == [("D", "no_such_function")]
