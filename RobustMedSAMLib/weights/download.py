"""Verified checkpoint downloads and a fast streaming SHA-256.

``download`` streams a checkpoint to a temporary file in the destination folder,
hashing it on the way, and moves it into place with ``os.replace`` only when the
SHA-256 matches the published one: an interrupted or corrupt transfer leaves
nothing behind (and an older file of the same name untouched).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from RobustMedSAMLib import __version__
from RobustMedSAMLib.errors import CancelledError, CheckpointError
from RobustMedSAMLib.progress import Progress
from RobustMedSAMLib.weights.registry import ModelSource, default_models_dir, how_to_get

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def _tqdm_progress(desc: str) -> tuple[Progress, Callable[[], None]]:
    """A (done, total) callback drawing a tqdm bar on stderr, and its closer."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)

    def update(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": f"robustmedsam/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise CheckpointError(
            f"could not download {url}: HTTP {error.code} {error.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise CheckpointError(f"could not reach {url}: {reason}; check the network") from error


def _stream(
    response: http.client.HTTPResponse,
    out,
    progress: Progress,
    cancel: Callable[[], bool] | None,
) -> tuple[int, str]:
    """Copy the body to ``out``; return (bytes, hex SHA-256). Checks Content-Length."""
    header = response.headers.get("Content-Length")
    total = int(header) if header and header.isdigit() else 0
    digest = hashlib.sha256()
    done = 0
    progress(0, total)
    while chunk := response.read(CHUNK_BYTES):
        if cancel is not None and cancel():
            raise CancelledError("download cancelled; nothing was kept")
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        progress(done, total)
    if total and done != total:
        raise CheckpointError(
            f"download interrupted: received {done} of {total} bytes; nothing was kept, try again"
        )
    return done, digest.hexdigest()


def _fetch_to(
    source: ModelSource,
    temp: Path,
    progress: Progress,
    cancel: Callable[[], bool] | None,
    timeout: float,
) -> tuple[int, str]:
    with _open(source.url, timeout) as response, open(temp, "xb") as out:
        try:
            done, digest = _stream(response, out, progress, cancel)
        except (http.client.HTTPException, OSError) as error:
            raise CheckpointError(
                f"download of {source.url} interrupted ({error}); nothing was kept, try again"
            ) from error
        out.flush()
        os.fsync(out.fileno())
    return done, digest


def download(
    source: ModelSource,
    dest_dir: str | Path | None = None,
    progress: Progress | None = None,
    allow_unverified: bool = False,
    cancel: Callable[[], bool] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``source`` to ``dest_dir / source.filename`` and verify its SHA-256.

    ``dest_dir`` defaults to ``$ROBUSTMEDSAM_MODELS`` or the user cache folder.
    ``progress(done_bytes, total_bytes)`` (total 0 when unknown) replaces the tqdm
    bar; ``cancel()`` returning True stops with CancelledError. A source without a
    published SHA-256 is refused unless ``allow_unverified`` (its computed hash is
    logged so it can be recorded). Raises CheckpointError on a network error, an
    interrupted transfer or a hash mismatch (both hashes given); nothing partial
    is left in ``dest_dir`` then.
    """
    if source.url is None:
        raise CheckpointError(f"model {source.name!r} has no download URL: {how_to_get(source)}")
    if source.sha256 is None and not allow_unverified:
        raise CheckpointError(
            f"unverified: no published SHA-256 for {source.name!r} ({source.url}); "
            "rerun with --allow-unverified (allow_unverified=True) to download it anyway"
        )
    dest = Path(dest_dir).expanduser() if dest_dir is not None else default_models_dir()
    dest.mkdir(parents=True, exist_ok=True)
    close: Callable[[], None] | None = None
    if progress is None:
        progress, close = _tqdm_progress(source.filename)
    # Same folder as the target so os.replace is atomic; "xb" keeps the umask's mode.
    temp = dest / f".{source.filename}.{secrets.token_hex(6)}.part"
    try:
        log.info("downloading %s from %s", source.name, source.url)
        done, digest = _fetch_to(source, temp, progress, cancel, timeout)
        _check_digest(source, digest, done)
        target = dest / source.filename
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        if close is not None:
            close()
    return target


def _check_digest(source: ModelSource, digest: str, size: int) -> None:
    if source.sha256 is None:
        log.warning(
            "unverified: no published SHA-256 for %s; computed SHA-256 %s (%d bytes), "
            "record it to check this file later",
            source.name,
            digest,
            size,
        )
    elif digest != source.sha256.lower():
        raise CheckpointError(
            f"SHA-256 mismatch for {source.filename} from {source.url}: expected "
            f"{source.sha256}, got {digest}; the file was deleted, try again"
        )
