"""The wire format: volumes and mask patches survive the trip; bad bodies are one clear
InputError, and a small body cannot inflate past the size its header declares."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.server.protocol import (
    VolumeHeader,
    apply_patch,
    changed_extent,
    decode_patch,
    encode_patch,
    pack_volume,
    unpack_volume,
)


def header(shape=(3, 4, 5), dtype="int16") -> VolumeHeader:
    return VolumeHeader(shape, dtype, np.eye(4).tolist(), "axial", (0.0, 100.0), "demo", "ct")


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
def test_volume_round_trip(dtype):
    array = (np.arange(60).reshape(3, 4, 5) * 3).astype(dtype)
    got_header, got = unpack_volume(pack_volume(array, header(dtype=dtype)), 10**6)
    np.testing.assert_array_equal(got, array)
    assert got.dtype == array.dtype and got_header.window == [0.0, 100.0]
    assert got_header.shape == (3, 4, 5) and got_header.name == "ct"


def frame(meta: dict, payload: bytes) -> bytes:
    meta = {"ijk_to_ras": np.eye(4).tolist(), **meta}
    text = json.dumps(meta).encode()
    return struct.pack(">I", len(text)) + text + payload


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x00\x00", "malformed volume upload"),
        (frame({"shape": [2, 2], "dtype": "int16"}, b""), "3 positive sizes"),
        (frame({"shape": [1, 1, 1], "dtype": "complex64"}, b""), "dtype"),
        (frame({"shape": [1, 1, 1], "dtype": "int16", "x": 1}, b""), "x"),
        (frame({"shape": [2, 2, 2], "dtype": "uint8"}, b"raw"), "not zlib"),
        (frame({"shape": [1, 1, 1], "dtype": "uint8", "ijk_to_ras": [[1]]}, b""), "4x4"),
        (frame({"shape": [1, 1, 1], "dtype": "uint8", "axis": [0]}, b""), "axis"),
        (frame({"shape": [1, 1, 1], "dtype": "uint8", "window": [5, 1]}, b""), "low < high"),
        (
            frame({"shape": [2, 2, 2], "dtype": "uint8"}, zlib.compress(bytes(7))),
            "7 bytes where 8 were expected",
        ),
    ],
)
def test_malformed_volume_bodies(body, message):
    with pytest.raises(InputError, match=message):
        unpack_volume(body, 10**6)


@pytest.mark.parametrize(
    "shape",
    [
        [2**21, 2**21, 2**22],  # 2**64 voxels: 0 in int64
        [2**21, 2**21, 2**21 + 1],  # wraps to a negative count
        [2**63, 1, 1],
        [2**64, 1, 1],  # beyond int64
        [2.5, 2, 2],  # was read as 2
        "222",  # was read as [2, 2, 2]
        [True, 2, 2],
        [float("inf"), 1, 1],  # JSON Infinity: OverflowError
    ],
)
def test_a_shape_that_is_not_three_whole_sizes_or_too_large_is_refused(shape):
    """Before: a 500 (ValueError or OverflowError from the int64 voxel count or an
    infinite size); a fractional or text shape was cut to whole numbers."""
    body = frame({"shape": shape, "dtype": "uint8"}, zlib.compress(bytes(8)))
    with pytest.raises(InputError, match="3 positive sizes|exceeds this server's limit"):
        unpack_volume(body, 10**6)


def test_a_header_nested_too_deeply_is_refused():
    """Before: a RecursionError, a 500 from the server."""
    meta = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InputError, match="nested too deeply"):
        unpack_volume(struct.pack(">I", len(meta)) + meta, 10**6)


@pytest.mark.parametrize(
    "voxels, message",
    [
        (zlib.compress(bytes(8)) + zlib.compress(bytes(8)), "11 bytes after the end"),
        (zlib.compress(bytes(8)) + b"garbage", "7 bytes after the end"),
        (zlib.compress(bytes(8))[:-4], "cut short"),  # the checksum missing
    ],
    ids=["two-streams", "garbage-after", "no-checksum"],
)
def test_voxels_beyond_or_short_of_one_zlib_stream_are_refused(voxels, message):
    """Before: accepted, the bytes after the first stream (a second volume's worth)
    ignored, and a stream without its checksum taken as whole."""
    body = frame({"shape": [2, 2, 2], "dtype": "uint8"}, voxels)
    with pytest.raises(InputError, match=message):
        unpack_volume(body, 10**6)


def test_a_zip_bomb_stops_at_the_declared_size():
    bomb = zlib.compress(bytes(50 * 2**20))  # 50 MB of zeros in ~50 kB
    body = frame({"shape": [1, 8, 8], "dtype": "uint8"}, bomb)
    with pytest.raises(InputError, match="wrong shape/dtype"):
        unpack_volume(body, 10**6)
    too_many = frame({"shape": [1000, 1000, 1000], "dtype": "uint8"}, bomb)
    with pytest.raises(InputError, match="exceeds this server's limit"):
        unpack_volume(too_many, 10**6)


def test_patch_carries_only_the_changed_extent():
    rng = np.random.default_rng(1)
    old = rng.random((6, 30, 40)) > 0.5
    new = old.copy()
    new[2:4, 5:9, 10:31] = ~new[2:4, 5:9, 10:31]
    extent = changed_extent(old, new)
    assert extent == (slice(2, 4), slice(5, 9), slice(10, 31))
    patch = encode_patch(new, extent)
    assert patch["offset"] == [2, 5, 10] and patch["shape"] == [2, 4, 21]
    mirror = old.copy()
    apply_patch(mirror, patch)
    np.testing.assert_array_equal(mirror, new)
    assert changed_extent(new, new) is None


def test_patch_that_does_not_fit_is_refused():
    patch = encode_patch(np.ones((2, 3, 3), bool), (slice(0, 2), slice(0, 3), slice(0, 3)))
    with pytest.raises(InputError, match="does not fit"):
        decode_patch({**patch, "offset": [5, 0, 0]}, (6, 3, 3))
    with pytest.raises(InputError, match="malformed mask patch"):
        decode_patch({"offset": [0, 0, 0], "shape": [1, 1, 1], "bits": "@@"}, (2, 2, 2))
    with pytest.raises(InputError, match="mask bits"):
        decode_patch({**patch, "shape": [2, 3, 30]}, (6, 3, 30))


def test_server_option_defaults_are_the_library_defaults():
    """A client that sends no options gets what the CLI and the Python API get."""
    from RobustMedSAMLib.inference.propagation import PropagationOptions
    from RobustMedSAMLib.inference.segment_volume import SegmentOptions
    from RobustMedSAMLib.server.bodies import Options, SegmentRequest

    assert Options().propagation() == PropagationOptions()
    assert Options().zoom == SegmentOptions().zoom
    sent = SegmentRequest().options  # what a segment body without options means
    assert sent.propagation() == PropagationOptions()
    assert sent.seed_box_growth == SegmentOptions().seed_box_growth
