"""Files written so that a crash never leaves a half-written or clobbered one, and
the SHA-256 that identifies a file in run records and model checks.

No heavy imports: every writer in the library (volumes, segmentations, checkpoints,
records, reports) goes through ``atomic_output``; JSON through ``write_json``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from RobustMedSAMLib.errors import InputError, OutputError, RobustMedSAMError

#: errno values that mean "this place cannot take the file" (not a bug in the writer).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
#: Below this much free space a writer's failure (torch and SimpleITK raise RuntimeError
#: without an errno) is reported as a full disk.
FULL_DISK_BYTES = 1 << 20


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
    on error it is removed and ``path`` is left as it was. A place that cannot take the
    file (read-only or forbidden folder, full disk) raises OutputError naming ``path``.
    """
    path = Path(path)
    temporary = _temporary_beside(path)
    try:
        yield temporary
        os.chmod(temporary, default_file_mode())  # mkstemp makes 0600 files
        os.replace(temporary, path)
    except RobustMedSAMError:
        raise
    except Exception as error:
        refusal = write_refusal(error, path, temporary)
        if refusal is None:
            raise
        raise refusal from None
    finally:
        temporary.unlink(missing_ok=True)


def check_output_place(path: str | os.PathLike) -> Path:
    """Raise now, before long work, what ``atomic_output(path)`` would raise at its start:
    InputError for a missing folder or a folder in the file's place, OutputError for a
    folder that cannot take a file (read-only, forbidden). Returns ``path``."""
    path = Path(path)
    _temporary_beside(path).unlink()
    return path


def check_not_an_input(outputs: Iterable[object], inputs: dict[str, object]) -> None:
    """Raise InputError when one of ``outputs`` is one of ``inputs`` (``{"the ...": file
    or None}``) by any name (itself, a symbolic or hard link): writing it would replace
    that input."""
    known: dict[tuple[int, int], tuple[str, object]] = {}
    for what, given in inputs.items():
        key = _file_key(given)
        if key is not None:
            known.setdefault(key, (what, given))
    for path in outputs:
        found = known.get(_file_key(path))  # type: ignore[arg-type]
        if found is not None:
            what, given = found
            raise InputError(
                f"output {path} is {what} ({given}): writing it would replace {what}; "
                "give another output name"
            )


def _file_key(path: object) -> tuple[int, int] | None:
    """``(device, inode)`` of the file ``path`` names, None when there is none (yet)."""
    try:
        status = os.stat(path)  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError):
        return None
    return status.st_dev, status.st_ino


def _temporary_beside(path: Path) -> Path:
    """A new empty temporary file ``.NAME.*SUFFIX`` in ``path``'s folder (refusals as
    :func:`check_output_place` says)."""
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise InputError(f"output {path} is a folder: give a file name")
    try:
        handle, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=full_suffix(path), dir=path.parent
        )
    except OSError as error:
        raise OutputError(
            f"cannot write {path}: {error.strerror} (choose another folder)"
        ) from None
    os.close(handle)
    return Path(name)


def write_refusal(error: BaseException, path: Path, temporary: Path) -> OutputError | None:
    """An OutputError naming ``path`` when ``error`` means the place cannot take the file
    (full disk, read-only or forbidden folder); None for any other failure."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        other = error.filename and Path(error.filename) not in (path, temporary)
        target = error.filename if other else path
        return OutputError(f"cannot write {target}: {error.strerror}")
    if "os error 28" in str(error) or "No space left" in str(error):
        return OutputError(f"cannot write {path}: No space left on device")
    if not isinstance(error, (OSError, RuntimeError)):
        return None  # a writer's bug stays a bug, however full the disk
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None
    if free < FULL_DISK_BYTES:
        return OutputError(f"cannot write {path}: No space left on device")
    return None


def check_writable(folder: Path) -> None:
    """Raise OutputError unless a file can be created in ``folder`` (tried and removed)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to the output folder {folder}: {error.strerror}") from None


def make_folder(folder: Path, what: str = "the output folder") -> Path:
    """Create ``folder`` and its parents; one InputError naming it when the OS refuses."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot make {what} {folder}: {error.strerror}") from None
    return folder


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | os.PathLike, value: object, indent: int = 2) -> Path:
    """Write ``value`` as JSON (one trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent) + "\n")


CHUNK_BYTES = 1 << 20


def sha256_of(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()
