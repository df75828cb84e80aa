"""The wire format of the inference server, shared by server and client. Numpy + stdlib
only (the client must not import torch).

Frames: volumes and masks are KJI arrays (slice, row, column) as in the library; a
volume travels with its 4x4 IJK-to-RAS matrix. A *patch* is the changed extent of a
3D mask: ``offset`` ``[k, j, i]`` and ``shape`` ``[dk, dj, di]`` of the box, and the
mask inside it as C-order bits (``numpy.packbits``), zlib-compressed, base64 text.

Volume upload (``POST /v1/sessions``), body ``application/x-robustmedsam-volume``:
4-byte big-endian length N, N bytes of UTF-8 JSON header (``VolumeHeader`` fields),
then the voxels as C-order raw bytes of ``dtype``, zlib-compressed.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import CancelledError, InputError, ModelOutOfMemoryError, ServerError

PROTOCOL_VERSION = 1
VOLUME_MEDIA_TYPE = "application/x-robustmedsam-volume"
VOXEL_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
_LENGTH = struct.Struct(">I")


@dataclass
class VolumeHeader:
    """What the server needs besides the voxels. shape: ``(K, J, I)``; ijk_to_ras: 4x4
    nested lists; axis: slice axis name or 0/1/2; window: ``(low, high)`` or None
    (the server picks one from the intensities, as in-process); model: the model the
    client expects (None: whatever the server serves)."""

    shape: tuple[int, int, int]
    dtype: str
    ijk_to_ras: list[list[float]]
    axis: str | int = "axial"
    window: tuple[float, float] | None = None
    model: str | None = None
    name: str = "volume"


def _check_fields(header: VolumeHeader) -> None:
    """ValueError naming the first header field of the wrong type or shape."""
    matrix = np.asarray(header.ijk_to_ras, dtype=float)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError("ijk_to_ras is not a finite 4x4 matrix")
    if not isinstance(header.axis, str | int) or isinstance(header.axis, bool):
        raise ValueError(f"axis {header.axis!r} is not a name or 0, 1, 2")
    if header.window is not None:
        window = np.asarray(header.window, dtype=float)
        if window.shape != (2,) or not window[0] < window[1]:
            raise ValueError(f"window {header.window!r} is not [low, high] with low < high")
    if header.model is not None and not isinstance(header.model, str):
        raise ValueError(f"model {header.model!r} is not a name")
    header.name = str(header.name)[:200]


def _shape(sizes: Any) -> tuple[int, int, int]:
    """``(K, J, I)``: 3 positive whole numbers (JSON integers); ValueError otherwise."""
    if not _whole_triple(sizes) or min(sizes) < 1:
        raise ValueError(f"shape {sizes!r} is not 3 positive sizes (K, J, I), whole numbers")
    return tuple(sizes)


def pack_volume(array: np.ndarray, header: VolumeHeader, level: int = 1) -> bytes:
    """The upload body for a ``(K, J, I)`` array (see the module docstring)."""
    return b"".join(volume_body_parts(array, header, level))


def volume_body_parts(
    array: np.ndarray, header: VolumeHeader, level: int = 1, slab_bytes: int = 4 * 2**20
) -> Iterator[bytes]:
    """The upload body of a ``(K, J, I)`` array in pieces: the header, then the voxels
    compressed a slab of about ``slab_bytes`` raw bytes at a time (C order, one zlib
    stream), so a caller on a GUI thread can spread the work over many short steps."""
    if array.dtype.name not in VOXEL_DTYPES:
        raise InputError(f"voxel type {array.dtype} cannot be sent: use one of {VOXEL_DTYPES}")
    meta = json.dumps({**header.__dict__, "shape": list(array.shape), "dtype": array.dtype.name})
    meta_bytes = meta.encode()
    yield _LENGTH.pack(len(meta_bytes)) + meta_bytes
    compressor = zlib.compressobj(level)
    per_slice = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(1, slab_bytes // per_slice)
    for k in range(0, array.shape[0], step):
        yield compressor.compress(np.ascontiguousarray(array[k : k + step]).tobytes())
    yield compressor.flush()


def unpack_volume(body: bytes, max_voxels: int) -> tuple[VolumeHeader, np.ndarray]:
    """Header and ``(K, J, I)`` voxels of an upload body. InputError (one line) for a
    malformed body, a wrong byte count, or more than ``max_voxels`` voxels (checked
    before decompressing, so a small body cannot expand without bound)."""
    try:
        (length,) = _LENGTH.unpack_from(body)
        fields = json.loads(body[_LENGTH.size : _LENGTH.size + length])
        header = VolumeHeader(**fields)
        shape = _shape(header.shape)
        if header.dtype not in VOXEL_DTYPES:
            raise ValueError(f"dtype {header.dtype!r} is not one of {VOXEL_DTYPES}")
        _check_fields(header)
    except RecursionError:
        raise InputError("malformed volume upload: the header is nested too deeply") from None
    except (struct.error, ValueError, TypeError, UnicodeDecodeError) as error:
        raise InputError(f"malformed volume upload: {error}") from None
    count = math.prod(shape)  # Python ints: no int64 overflow
    if count > max_voxels:
        raise InputError(f"volume of {count} voxels exceeds this server's limit of {max_voxels}")
    expected = count * np.dtype(header.dtype).itemsize
    data = _inflate(body[_LENGTH.size + length :], expected, "volume voxels")
    array = np.frombuffer(data, dtype=header.dtype).reshape(shape)
    header.shape = shape
    return header, array


def encode_patch(mask: np.ndarray, extent: tuple[slice, ...]) -> dict[str, Any]:
    """The patch carrying ``mask[extent]`` (``mask`` a ``(K, J, I)`` bool array)."""
    block = np.ascontiguousarray(mask[extent], dtype=bool)
    bits = zlib.compress(np.packbits(block, axis=None).tobytes(), 1)
    return {
        "offset": [int(s.start) for s in extent],
        "shape": list(block.shape),
        "bits": base64.b64encode(bits).decode("ascii"),
    }


def decode_patch(patch: dict[str, Any], volume_shape: Sequence[int]) -> tuple[tuple, np.ndarray]:
    """``(extent, block)``: where a patch goes in a ``volume_shape`` mask and its bool
    block. InputError when it does not fit the volume or the bits are wrong."""
    try:
        offset, shape = patch["offset"], patch["shape"]
        bits = base64.b64decode(patch["bits"], validate=True)
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"malformed mask patch: {error}") from None
    if not (_whole_triple(offset) and _whole_triple(shape)) or min(shape + offset) < 0:
        raise InputError("a mask patch needs 3 non-negative whole offsets and sizes (K, J, I)")
    if any(o + s > n for o, s, n in zip(offset, shape, volume_shape, strict=True)):
        raise InputError(f"mask patch {offset}+{shape} does not fit a {list(volume_shape)} volume")
    count = int(np.prod(shape))
    packed = np.frombuffer(_inflate(bits, (count + 7) // 8, "mask bits"), np.uint8)
    block = np.unpackbits(packed, count=count).astype(bool).reshape(shape)
    extent = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    return extent, block


def _whole_triple(values: Any) -> bool:
    """Whether ``values`` is a list of 3 integers (not floats, text or booleans)."""
    return isinstance(values, list) and len(values) == 3 and all(type(v) is int for v in values)


def apply_patch(mask: np.ndarray, patch: dict[str, Any] | None) -> None:
    """Write a patch into ``mask`` ``(K, J, I)`` in place (None: nothing changed)."""
    if patch is None:
        return
    extent, block = decode_patch(patch, mask.shape)
    mask[extent] = block


def changed_extent(old: np.ndarray, new: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every voxel where two same-shape masks differ (None if
    they are equal)."""
    diff = old != new
    extent = []
    for axis in range(diff.ndim):
        hit = np.flatnonzero(diff.any(axis=tuple(a for a in range(diff.ndim) if a != axis)))
        if hit.size == 0:
            return None
        extent.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(extent)


def _inflate(data: bytes, expected: int, what: str) -> bytes:
    """Decompress at most ``expected`` bytes; InputError unless exactly that many come,
    as one complete zlib stream with nothing after it."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, expected + 1)
    except zlib.error as error:
        raise InputError(f"{what} are not zlib data: {error}") from None
    if len(out) != expected or inflater.unconsumed_tail:
        got = f"more than {expected}" if len(out) > expected else str(len(out))
        raise InputError(f"{what}: {got} bytes where {expected} were expected (wrong shape/dtype)")
    if not inflater.eof:
        raise InputError(f"{what}: the zlib stream is cut short (no end and checksum)")
    if inflater.unused_data:
        extra = len(inflater.unused_data)
        raise InputError(f"{what}: {extra} bytes after the end of the zlib stream: send one stream")
    return out


# --- answers and request bodies, shared by the blocking and the event-driven client ---


def points_body(points) -> list[list[float]] | None:
    """``Nx3`` points as JSON lists (None when there are none)."""
    if points is None or len(points) == 0:
        return None
    return np.asarray(points, float).reshape(-1, 3).tolist()


def box_body(box) -> dict[str, Any] | None:
    """A RAS Roi (``center_ras``, ``size``, ``axes_ras``) or a ready dict."""
    if box is None or isinstance(box, dict):
        return box
    return {
        "center": np.asarray(box.center_ras, float).tolist(),
        "size": np.asarray(box.size, float).tolist(),
        "axes": np.asarray(box.axes_ras, float).tolist(),
    }


def parse_answer(status: int, payload: bytes, what: str, url: str) -> dict[str, Any]:
    """The JSON answer of a 2xx response; else raises :func:`error_for` its error."""
    if status == 204:
        return {}
    try:
        body = json.loads(payload) if payload else {}
    except ValueError:
        body = {"detail": payload[:200].decode(errors="replace")}
    if 200 <= status < 300:
        return body
    detail = body.get("detail", f"HTTP {status}") if isinstance(body, dict) else str(body)
    kind = body.get("error", "") if isinstance(body, dict) else ""
    raise error_for(kind, f"server {url} refused {what} (HTTP {status}): {detail}", status)


def error_for(kind: str, detail: str, status: int = 0) -> Exception:
    """The library exception for a protocol error ``kind`` (or HTTP ``status``)."""
    if kind == "out_of_memory":
        return ModelOutOfMemoryError(detail)
    if kind == "cancelled":
        return CancelledError(detail)
    if kind in ("input", "malformed", "too_large") or status in (400, 413, 422):
        return InputError(detail)
    return ServerError(detail)


class OpenedSession:
    """A client's view of a server session, from the answer that opened it: its ID, the
    volume's ``(K, J, I)`` shape, axis, slice count, window and model; ``mask`` mirrors
    the server's current mask (zeros until answers' patches are applied); ``path`` is
    the session's URL path."""

    def __init__(self, opened: dict[str, Any]) -> None:
        self.id: str = opened["session"]
        self.shape = tuple(opened["shape"])
        self.axis: int = opened["axis"]
        self.n_slices: int = opened["n_slices"]
        self.window = tuple(opened["window"])
        self.model: str = opened["model"]
        self.mask = np.zeros(self.shape, dtype=bool)
        self.path = f"/v1/sessions/{self.id}"
