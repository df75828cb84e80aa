"""The server's session store: bounded in count and memory, least recently used idle
sessions make room, busy ones never do; idle ones expire; IDs are tied to a token."""

from __future__ import annotations

import time

import numpy as np
import pytest
from doubles import ThresholdPredictor

from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.propagation import plan_order
from RobustMedSAMLib.inference.session import CROP_SESSIONS, SegmentationSession
from RobustMedSAMLib.server.sessions import (
    Job,
    ServerFullError,
    ServerSession,
    SessionGoneError,
    SessionStore,
    owner_of,
    reserved_bytes,
)

ALICE, BOB = owner_of("alice-token"), owner_of("bob-token")


def segmentation(cache_bytes: int = 1000, slices: int = 4) -> SegmentationSession:
    volume = Volume(np.zeros((slices, 10, 10), np.int16), np.eye(4))
    return SegmentationSession(volume, ThresholdPredictor(80.0), cache_bytes=cache_bytes)


def test_least_recently_used_idle_session_makes_room():
    store = SessionStore(max_sessions=2, max_bytes=10**9, idle_seconds=60)
    first, second = store.add(ALICE, segmentation()), store.add(ALICE, segmentation())
    store.get(first.id, ALICE)  # first is now the most recently used
    third = store.add(BOB, segmentation())
    assert len(store) == 2 and store.get(third.id, BOB) is third
    with pytest.raises(SessionGoneError, match="make room for a newer session") as gone:
        store.get(second.id, ALICE)
    assert gone.value.expired
    with pytest.raises(SessionGoneError, match="no session") as other:
        store.get(first.id, BOB)  # Alice's session does not exist for Bob
    assert not other.value.expired


def test_busy_sessions_are_never_evicted():
    store = SessionStore(max_sessions=1, max_bytes=10**9, idle_seconds=60)
    busy = store.add(ALICE, segmentation())
    busy.job = Job("propagate")
    with pytest.raises(ServerFullError, match="server is full"):
        store.add(ALICE, segmentation())
    assert store.get(busy.id, ALICE) is busy


def test_memory_budget_counts_voxels_mask_embedding_cache_and_crops():
    one = reserved_bytes(segmentation())
    assert one == 4 * 10 * 10 * 2 + 4 * 10 * 10 + 1000 + CROP_SESSIONS * 10 * 10 * 4
    store = SessionStore(max_sessions=10, max_bytes=2 * one, idle_seconds=60)
    ids = [store.add(ALICE, segmentation()).id for _ in range(3)]
    assert len(store) == 2 and ids[0] not in store._sessions


@pytest.mark.parametrize("cache_slices", [0, 2])
def test_reserved_bytes_hold_the_crops_newest_slices_too(cache_slices):
    """Each kept crop holds its newest encoded slice beyond ``cache_bytes``, and a
    session its newest even when ``cache_bytes`` holds none: the reservation is what
    the session can hold at most, so that the store's ``max_bytes`` is a bound."""
    per_slice = 10 * 10 * 4  # the double's features: the slice, float32
    seg = segmentation(cache_bytes=max(1, cache_slices * per_slice))
    for index in range(seg.n_slices):
        seg.encoded(index)
    for start in range(CROP_SESSIONS):  # crops of whole slices, as large as they come
        crop = seg.crop((slice(start, 4), slice(0, 10), slice(0, 10)))
        crop.encoded(0)
    assert len(seg.crop_sessions()) == CROP_SESSIONS
    assert seg.cached_bytes() == max(cache_slices, 1) * per_slice + CROP_SESSIONS * per_slice
    voxels_and_mask = 4 * 10 * 10 * 2 + 4 * 10 * 10
    assert seg.cached_bytes() <= reserved_bytes(seg) - voxels_and_mask


def test_idle_sessions_expire_and_their_job_is_cancelled():
    store = SessionStore(max_sessions=4, max_bytes=10**9, idle_seconds=0.2)
    session = store.add(ALICE, segmentation())
    session.job = Job("propagate")
    session.waiting = 1  # a long-poll in progress: the client is there
    time.sleep(0.3)
    assert store.expire_idle() == 0
    session.waiting = 0
    assert store.expire_idle() == 1 and session.job.cancel.is_set()
    with pytest.raises(SessionGoneError, match="expired after 0.2 s"):
        store.get(session.id, ALICE)


def test_session_ids_are_long_and_random():
    store = SessionStore(max_sessions=100, max_bytes=10**9, idle_seconds=60)
    ids = {store.add(ALICE, segmentation()).id for _ in range(50)}
    assert len(ids) == 50 and min(len(i) for i in ids) >= 32


@pytest.mark.parametrize("cache_slices", [20, 3])
def test_encode_ahead_follows_propagation_order_as_far_as_the_cache_holds(cache_slices):
    slice_bytes = 10 * 10 * 4  # the double's float32 features of a 10 x 10 slice
    session = ServerSession("id", ALICE, segmentation(cache_slices * slice_bytes, slices=12))
    expected = ([5] + plan_order([5], 12))[:cache_slices]
    session.encode_ahead([5])
    deadline = time.monotonic() + 10
    while len(session.segmentation.stats.encoded) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # it must stop there
    assert session.segmentation.stats.encoded == expected
