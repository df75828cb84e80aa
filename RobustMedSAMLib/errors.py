"""One exception family for the whole library; each message says what to do."""

from __future__ import annotations


class RobustMedSAMError(Exception):
    """Base of every error the library raises on purpose."""


class InputError(RobustMedSAMError, ValueError):
    """A volume, prompt, option or data file the user gave is unusable."""


class OutputError(InputError):
    """An output cannot be written where the user asked (read-only folder, full disk)."""


class CheckpointError(RobustMedSAMError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class ModelOutOfMemoryError(RobustMedSAMError, MemoryError):
    """The device ran out of memory; the message suggests a smaller setting."""


class CancelledError(RobustMedSAMError):
    """Long work was cancelled by the user; nothing partial was written."""


class ServerError(RobustMedSAMError):
    """The inference server refused a request, or stopped answering."""
