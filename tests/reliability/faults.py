"""Real faults for the reliability tests: read-only folders, a full disk, a killed process, and the
check that an error reached the user as one line.

Read-only and full file systems are real: as an ordinary user a read-only folder is ``chmod 0555``;
as root (which ignores permissions) the command runs in its own user + mount namespace
(``unshare -rm``) where the folder is bind-mounted read-only (``EROFS``) or a small ``tmpfs`` is
mounted to fill up (``ENOSPC``). Where neither works the test is skipped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def one_line_error(stderr: str, *fragments: str) -> str:
    """Assert that ``stderr`` holds no traceback and exactly one ``error: ...`` line containing every
    fragment; return that line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


AS_ROOT = os.geteuid() == 0
NAMESPACES = _namespaces_work() if AS_ROOT else False


def cli_command(args: list[str]) -> list[str]:
    """``cosmos-policy ARGS`` as a command line of this interpreter."""
    return [sys.executable, "-m", "cosmos_policy_lightning.cli", *map(str, args)]


def run_with_faults(command: list[str], read_only: tuple[Path, ...] = (), full_disk: dict[Path, int] | None = None,
                    timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` with ``read_only`` folders that cannot be written and ``full_disk`` folders
    (path -> capacity in KiB) that fill up; skips the calling test where the machine cannot do that."""
    full_disk = dict(full_disk or {})
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for p in [*read_only, *full_disk]:
        Path(p).mkdir(parents=True, exist_ok=True)
    if not AS_ROOT:
        if full_disk:
            pytest.skip("a full disk needs a mount namespace (run as root with unshare)")
        for p in read_only:
            os.chmod(p, 0o555)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        finally:
            for p in read_only:
                os.chmod(p, 0o755)
    if not NAMESPACES:
        pytest.skip("root without user/mount namespaces: cannot make a folder read-only or a disk full")
    mounts = [f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
              f"mount -o remount,bind,ro {shlex.quote(str(p))}" for p in read_only]
    mounts += [f"mount -t tmpfs -o size={int(kib)}k tmpfs {shlex.quote(str(p))}" for p, kib in full_disk.items()]
    script = " && ".join(mounts + ['exec "$@"'])
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
