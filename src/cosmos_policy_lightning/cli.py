"""The ``cosmos-policy`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (``training/cli.py``); the tools
``layout``, ``convert``, ``collect SIMULATOR`` and ``evaluate SIMULATOR`` are plain functions whose
signatures and docstrings jsonargparse turns into options and ``--help``. Each subcommand imports only
its own module, so ``cosmos-policy layout`` starts without loading torch models.

Errors in user input (:class:`~cosmos_policy_lightning.errors.CosmosPolicyError`, missing files) are
printed as one line ``error: ...`` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from .errors import user_message

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# subcommand words -> (module, function, one-line summary)
TOOLS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("layout",): ("cosmos_policy_lightning.cli", "layout",
                  "print the latent-frame layout of an embodiment YAML"),
    ("convert",): ("cosmos_policy_lightning.data.convert", "convert",
                   "convert HDF5 / Zarr / LeRobot demonstrations into WebDataset shards + statistics"),
    ("cache-latents",): ("cosmos_policy_lightning.training.prepare", "cache_latents",
                         "encode a converted dataset once with the frozen VAE (fast training from latents)"),
    ("push-dataset",): ("cosmos_policy_lightning.data.publish", "push_dataset",
                        "upload a converted dataset (+ latent cache) to a Hub dataset repo or an fsspec URL"),
    ("verify",): ("cosmos_policy_lightning.data.integrity", "verify_dataset",
                  "check a converted dataset's shards (size, sample count, SHA-256) against its manifest"),
    ("collect",): ("cosmos_policy_lightning.sim.collect", "collect",
                   "expert demonstrations with failures from a simulator: collect SIMULATOR (metaworld) --tasks ..."),
    ("evaluate",): ("cosmos_policy_lightning.sim.evaluate", "evaluate",
                    "closed-loop evaluation in a simulator: evaluate SIMULATOR (metaworld) --checkpoint ..."),
    ("serve",): ("cosmos_policy_lightning.inference.server", "serve", "serve a checkpoint to robots (openpi websocket)"),
    ("import-checkpoint",): ("cosmos_policy_lightning.checkpoints.importer", "import_checkpoint",
                             "turn a released reference .pt (local or <org>/<repo>/<file>.pt) into a .ckpt"),
    ("export",): ("cosmos_policy_lightning.checkpoints.export", "export",
                  "a LoRA checkpoint as a merged plain checkpoint (--merge, default) or a peft adapter folder"),
    ("push-to-hub",): ("cosmos_policy_lightning.checkpoints.policy_folder", "push_to_hub",
                       "write a checkpoint as a Hub model folder and upload it (or --local_dir only)"),
}


def layout(embodiment: Path, json_output: bool = False) -> None:
    """Print the latent-frame layout derived from an embodiment (docs/method.md §1, §2).

    Args:
        embodiment: path of the embodiment YAML (e.g. ``embodiments/aloha.yaml``).
        json_output: print JSON (``--json`` also works) instead of a table.
    """
    from .embodiment import Embodiment
    from .layout import OBJECTIVES, SequenceLayout

    lay = SequenceLayout.from_embodiment(Embodiment.from_yaml(embodiment))
    if json_output:
        print(json.dumps(lay.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    c, h, w = lay.latent_frame_shape
    table = Table(title=f"{lay.embodiment}: {lay.num_latent_frames} latent frames of {c}x{h}x{w}, "
                        f"{lay.num_pixel_frames} pixel frames",
                  caption="C = clean conditioning frame, T = noised target with loss, . = noised, no loss")
    for col in ("slot", "latent", "pixel frames"):
        table.add_column(col, justify="left" if col == "slot" else "right")
    for obj in OBJECTIVES:
        table.add_column(obj, justify="center")
    cond = {o: lay.conditioning_mask(o) for o in OBJECTIVES}
    loss = {o: lay.loss_mask(o) for o in OBJECTIVES}
    for s in lay.slots:
        first, last = s.pixel_frames
        marks = ["C" if cond[o][s.latent_index] else ("T" if loss[o][s.latent_index] else ".") for o in OBJECTIVES]
        table.add_row(s.name, str(s.latent_index), f"{first}" if first == last else f"{first}-{last}", *marks)
    Console(width=140).print(table)


def _underscore_option(arg: str) -> str:
    """``--noise-std=0.3`` -> ``--noise_std=0.3``: jsonargparse names options after the Python
    parameters (underscores); accept the dashed spelling that users type too."""
    if not arg.startswith("--") or len(arg) == 2:
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def _positional_options(fn, args: list[str]) -> list[str]:
    """Accept ``--<name> VALUE`` (or ``--<name>=VALUE``) for a required positional parameter too, e.g.
    ``cosmos-policy serve --checkpoint CKPT`` as well as ``cosmos-policy serve CKPT``: jsonargparse
    makes parameters without a default positional only."""
    import inspect

    required = [p.name for p in inspect.signature(fn).parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    out, moved = list(args), []
    for name in required:
        flag = f"--{name}"
        for i, arg in enumerate(out):
            if arg == flag and i + 1 < len(out):
                moved.append(out[i + 1])
                del out[i:i + 2]
                break
            if arg.startswith(flag + "="):
                moved.append(arg.split("=", 1)[1])
                del out[i]
                break
    return moved + out if moved and len(moved) == len(required) else args


def _usage() -> str:
    lines = ["usage: cosmos-policy SUBCOMMAND [options]   (cosmos-policy SUBCOMMAND --help for its options)", "",
             "training (LightningCLI):"]
    lines += [f"  {name:<20} {what}" for name, what in (
        ("fit", "train policy, world model and value jointly (--config recipes/<name>.yaml)"),
        ("validate", "run the validation loop on a checkpoint"),
        ("test", "test metrics on held-out episodes (sampled action error, value AUROC, ...)"),
        ("predict", "sample action chunks, futures and values on a held-out shard"))]
    lines += ["", "tools:"]
    lines += [f"  {' '.join(words):<20} {summary}" for words, (_, _, summary) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cosmos-policy`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Waiting OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads
    # slowed the latent-cache build 5-10x (tools/benchmark_cache.py). Read by OpenMP when torch loads, which
    # the subcommands below do; a value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    try:
        if argv[0] in LIGHTNING_SUBCOMMANDS:
            from .training.cli import run_lightning_cli

            run_lightning_cli(argv)
            return 0
        for words, (module, func, _) in TOOLS.items():
            if tuple(argv[: len(words)]) == words:
                from jsonargparse import CLI

                rest = [_underscore_option("--json_output=true" if a == "--json" else a) for a in argv[len(words):]]
                fn = getattr(importlib.import_module(module), func)
                rest = _positional_options(fn, _bare_flags(fn, rest))
                CLI(fn, args=rest, prog=f"cosmos-policy {' '.join(words)}")
                return 0
        print(f"error: unknown subcommand {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`cosmos-policy layout --json | head`): stop quietly, like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except Exception as err:
        # LightningCLI / jsonargparse wrap our one-line errors in their own; find ours (errors.user_message).
        message = user_message(err)
        if message is None:
            raise  # a bug: keep the traceback
        print(f"error: {message}", file=sys.stderr)
        return 2


def _bare_flags(fn, args: list[str]) -> list[str]:
    """``--all_success`` alone means ``--all_success=true`` for a boolean parameter of ``fn``
    (jsonargparse wants a value); ``--all_success false`` keeps its value."""
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved: leave the arguments alone
        return args
    flags = {name for name in inspect.signature(fn).parameters
             if hints.get(name) in (bool, typing.Optional[bool])}
    literals = {"true", "false", "yes", "no", "on", "off", "1", "0", "null", "none"}
    out = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--") and "=" not in arg and arg[2:] in flags and (
                following is None or following.lower() not in literals):
            arg = f"{arg}=true"
        out.append(arg)
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
