"""Choosing the torch device and precision."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.names import DEVICES


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for, but this PyTorch has no Apple MPS support")
    return torch.device(name)


def prepare_device(device: torch.device) -> torch.device:
    """Set up ``device`` for model work and return it. On the CPU, subnormal floats are
    flushed to zero: LiteMedSAM's activations reach them, and without flushing its encoder
    ran 3.7x and its decoder 7.8x slower (2 cores); results change below float tolerance."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None on another C library or system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory(device: torch.device) -> None:
    """After a CPU encoder call, hand the heap memory its activations freed back to the
    system (glibc ``malloc_trim``; nothing elsewhere). glibc keeps freed blocks in the
    arena of the thread that used them, so each encode, most on the encode-ahead thread,
    left 10-30 MB more resident (the 512 x 512 x 300 CT of ``bench_memory.py`` grew from
    1.5 to 1.9 GB while propagating; docs/evidence.md). Values are untouched."""
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


def check_half(device: str, half: bool) -> None:
    """InputError when ``half`` comes with a device named outright that has no half
    precision here (``cpu``, ``mps``): the user asked for two things that exclude each
    other. ``auto`` may still find a CUDA GPU; where it does not, :func:`load_named_model`
    runs float32 and warns."""
    if half and device in ("cpu", "mps"):
        raise InputError(
            f"--half runs the image encoder in half precision on a CUDA GPU only, not "
            f"--device {device}: drop --half (or use --device cuda)"
        )


def precision_name(device: torch.device, half: bool) -> str:
    """The image encoder's precision on ``device``: ``bfloat16``, ``float16`` or ``float32``."""
    dtype = autocast_dtype(device, half)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def autocast_dtype(device: torch.device, half: bool) -> torch.dtype | None:
    """The reduced precision used for the image encoder with ``half=True``: bfloat16 on
    CUDA GPUs that support it, else float16 on CUDA; None (full precision) elsewhere."""
    if not half or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
