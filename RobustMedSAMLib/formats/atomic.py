"""Writing files so that a crash never leaves a half-written or clobbered one.

No heavy imports: every writer in the library (volumes, segmentations, checkpoints,
records, reports) goes through ``atomic_output``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from RobustMedSAMLib.errors import InputError


def full_suffix(path: str | os.PathLike) -> str:
    """The extension SimpleITK and Slicer go by: ``.nii.gz``, ``.seg.nrrd``, ``.mrk.json``, ..."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".seg.nrrd", ".mrk.json"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def default_file_mode() -> int:
    """The permissions a newly created file gets under the current umask (e.g. 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Give a temporary path beside ``path`` (same extension) to write to.

    On success the temporary file replaces ``path`` (with the umask's usual permissions);
    on error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    handle, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=full_suffix(path), dir=path.parent
    )
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, default_file_mode())  # mkstemp makes 0600 files
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
