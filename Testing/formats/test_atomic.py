"""``atomic_output``: a write that fails leaves the target as it was and no temporary;
a place that cannot take the file is an OutputError naming the target. These run on any
machine (the failures are raised by hand); Testing/commands/test_cli_refusals.py has the
real read-only folder and full disk."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest

from RobustMedSAMLib.errors import InputError, OutputError
from RobustMedSAMLib.formats import atomic
from RobustMedSAMLib.formats.atomic import atomic_output


def failing_write(error: BaseException):
    def write(path):
        path.write_bytes(b"half a fi")
        raise error

    return write


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["ENOSPC", "EROFS", "safetensors"],
)
def test_a_place_that_takes_no_file_is_an_output_error(tmp_path, error):
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"before")
    with pytest.raises(OutputError, match=f"cannot write {target}"):
        with atomic_output(target) as temporary:
            failing_write(error)(temporary)
    assert target.read_bytes() == b"before" and sorted(tmp_path.iterdir()) == [target]


def test_a_writer_without_errno_on_a_full_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 20, 1 << 20, 4096))
    target = tmp_path / "state.pt"
    with pytest.raises(OutputError, match="No space left on device"):
        with atomic_output(target) as temporary:
            failing_write(RuntimeError("[enforce fail at inline_container.cc:672]"))(temporary)
    assert list(tmp_path.iterdir()) == []


def test_other_failures_stay_what_they_are(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 20, 1 << 20, 0))
    with pytest.raises(ValueError, match="a bug"):
        with atomic_output(tmp_path / "x.json") as temporary:
            failing_write(ValueError("a bug"))(temporary)
    assert list(tmp_path.iterdir()) == []
    assert atomic.write_refusal(RuntimeError("other"), tmp_path / "x", tmp_path / "y") is not None


def test_a_folder_as_target_and_a_missing_folder(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        with atomic_output(tmp_path / "out.json"):
            pass
    with pytest.raises(InputError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "out.json"):
            pass
