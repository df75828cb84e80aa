"""Places an output cannot go: a read-only folder and a full disk (test support).

As root, permissions do not stop a write, so a read-only folder is a read-only tmpfs;
a full disk is a 1 MiB tmpfs. Both need ``mount`` (root with CAP_SYS_ADMIN): where it
is refused the fixture skips, except the read-only folder, which as a normal user is a
folder without write permission.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(folder: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    # lazy: a writer that failed may hold a file open until garbage collection
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@pytest.fixture
def readonly_dir(tmp_path) -> Iterator[Path]:
    """An empty folder no file can be written to."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount(folder, "size=64k,ro"):
        pytest.skip("running as root without mount: no read-only folder to test with")
    yield folder
    _unmount(folder)


@pytest.fixture
def full_dir(tmp_path) -> Iterator[Path]:
    """An empty folder on a 1 MiB file system (fills up on the first real output)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if not _mount(folder, "size=1m"):
        pytest.skip("needs root and mount for a 1 MiB tmpfs (a full disk)")
    yield folder
    _unmount(folder)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill ``folder``'s file system up to ``leave`` bytes."""
    free = os.statvfs(folder)
    size = max(0, free.f_bavail * free.f_frsize - leave)
    (folder / "filler").write_bytes(b"\0" * size)


def listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (relative), hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
