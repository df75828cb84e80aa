"""Propagation with a slice step (``PropagationOptions.slice_step``, ``--slice-step``):
the model is asked on every N-th slice from the seed outward, the slices between are
interpolated, and the encoder never sees a skipped slice. A ``--server`` run with it:
Testing/server/test_stop_options.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_propagation import OracleThresholdSegmenter, central_seed, dice, object_range

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.propagation import (
    PropagationOptions,
    fill_between,
    plan_order,
    propagate,
)


@pytest.fixture(scope="module")
def ball() -> phantoms.Phantom:
    return phantoms.sphere()  # 64^3, radius 20: slices 12..51


def test_step_one_asks_every_slice_and_fills_none(ball) -> None:
    segmenter = OracleThresholdSegmenter(ball.image)
    seeds = central_seed(ball.mask)
    result = propagate(segmenter, seeds, PropagationOptions(slice_step=1))
    first, last = object_range(result.mask)
    assert result.filled == []
    assert sorted(segmenter.requested) == [z for z in range(first - 1, last + 2) if z not in seeds]
    assert [r.index for r in result.records] == list(range(first, last + 1))


def ideal_step(truth: np.ndarray, seed: int, step: int) -> np.ndarray:
    """The truth on the slices a stride from ``seed`` reaches inside it and on its end
    slices (where a rejected jump leads), the slices between filled by ``fill_between``:
    what a perfect model would give at this step."""
    first, last = object_range(truth)
    strided = [z for z in range(seed % step, truth.shape[0], step) if first <= z <= last]
    asked = sorted({first, *strided, last})
    ideal = np.zeros_like(truth)
    ideal[asked] = truth[asked]
    for low, high in zip(asked, asked[1:], strict=False):
        fill_between(ideal, low, high)
    return ideal


@pytest.mark.parametrize("step", [2, 3])
def test_a_step_covers_the_ball_within_the_stride_s_own_cost(ball, step: int) -> None:
    """The same extent and stops as step 1 (a jump past the end is rejected, the skipped
    slices are asked one by one); Dice of step N >= Dice of step 1 minus what the stride
    costs a perfect model (the truth's own slices, interpolated); the per-slice errors of
    the model and of the interpolation add (to first order) on the slices filled."""
    seeds = central_seed(ball.mask)
    (seed,) = seeds
    every = propagate(OracleThresholdSegmenter(ball.image), seeds)
    segmenter = OracleThresholdSegmenter(ball.image)
    result = propagate(segmenter, seeds, PropagationOptions(slice_step=step))
    assert object_range(result.mask) == object_range(every.mask)
    assert [(s.last_index, s.reason) for s in result.stops] == [
        (s.last_index, s.reason) for s in every.stops
    ]
    low, high = object_range(result.mask)
    assert result.mask[low : high + 1].any(axis=(1, 2)).all()  # no hole
    assert set(result.filled).isdisjoint(segmenter.requested)
    assert result.filled and set(result.filled) | set(segmenter.requested) >= set(
        range(low, high + 1)
    ) - set(seeds)
    # per direction: distance / step jumps, the one past the end, step - 1 asked one by one
    span = len(every.requested) - 2  # step 1: every slice but the seed, + a rejected one each way
    assert len(segmenter.requested) <= span / step + 2 * step
    cost = 1.0 - dice(ideal_step(ball.mask, seed, step), ball.mask)
    assert 0 < cost < 0.05
    assert dice(result.mask, ball.mask) >= dice(every.mask, ball.mask) - cost


def test_fill_between_passes_a_disc_into_a_smaller_one() -> None:
    """Two concentric discs: the slices between are discs of radii in between."""
    y, x = np.mgrid[:64, :64]
    radius = np.hypot(x - 32, y - 32)
    volume = np.zeros((5, 64, 64), bool)
    volume[0], volume[4] = radius <= 20, radius <= 12
    assert fill_between(volume, 0, 4) == [1, 2, 3]
    for index, expected in zip((1, 2, 3), (18, 16, 14), strict=True):
        area = volume[index].sum()
        assert np.pi * (expected - 1) ** 2 < area < np.pi * (expected + 1) ** 2


def test_fronts_stop_before_the_bounds_and_another_seed_never_past(ball) -> None:
    """A jump ends on the last free slice before the bounds or a taken slice."""
    seeds = {25: ball.mask[25], 38: ball.mask[38]}
    order = plan_order(seeds, 64, bounds=(20, 45), step=3)
    assert order[:4] == [22, 28, 35, 41]
    assert sorted(order) == [20, 22, 28, 31, 32, 35, 41, 44, 45]
    result = propagate(OracleThresholdSegmenter(ball.image), seeds, PropagationOptions(
        bounds=(20, 45), slice_step=3))  # fmt: skip
    assert result.requested == order
    assert result.filled == [21, 23, 24, 26, 27, 29, 30, 33, 34, 36, 37, 39, 40, 42, 43]
    assert result.mask[20:46].any(axis=(1, 2)).all() and not result.mask[46:].any()


@pytest.mark.parametrize("step", [0, -1, 1.5, True, "2"])
def test_bad_slice_steps_are_input_errors(ball, step) -> None:
    segmenter = OracleThresholdSegmenter(ball.image)
    with pytest.raises(InputError, match="slice_step"):
        propagate(segmenter, central_seed(ball.mask), PropagationOptions(slice_step=step))
    assert segmenter.requested == []


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two"])
def test_cli_refuses_a_bad_slice_step(tmp_path, capsys, value: str) -> None:
    from volumes import centre_ras

    from RobustMedSAMLib.cli import main
    from RobustMedSAMLib.formats.markups import write_points
    from RobustMedSAMLib.formats.volume import Volume, write_volume

    phantom = phantoms.sphere((8, 32, 32), radius=6.0)
    volume = Volume(phantom.image, np.eye(4), "ball", "CT")
    path = write_volume(volume, tmp_path / "ct.nrrd")
    points = write_points(tmp_path / "p.mrk.json", centre_ras(volume, phantom.mask))
    before = sorted(tmp_path.iterdir())
    code = main(["segment", str(path), "--points", str(points), "--out",
                 str(tmp_path / "o.seg.nrrd"), "--propagate", f"--slice-step={value}"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"--slice-step {value}:" in lines[0] and "whole number" in lines[0]
    assert sorted(tmp_path.iterdir()) == before  # nothing written


@pytest.fixture(scope="module")
def lite_runs() -> dict[tuple[int, int], tuple]:
    """robustmedsam-lite from a box on the middle slice of a 24-slice ball, propagated
    with slice steps 1 and 2, encode-ahead 0 and 2: ``(step, ahead) -> (result, record,
    session)``."""
    from volumes import centre_ras

    from RobustMedSAMLib.formats.volume import Volume
    from RobustMedSAMLib.inference.batch import SegmentSettings, make_segmenter
    from RobustMedSAMLib.inference.segment_volume import VolumePrompts

    phantom = phantoms.sphere((24, 48, 48), radius=10.0, texture="ct")
    volume = Volume(phantom.image, np.eye(4), "ball", "CT")
    prompts = VolumePrompts(positive=centre_ras(volume, phantom.mask)[None])
    runs = {}
    for step, ahead in ((1, 0), (2, 0), (2, 2)):
        settings = SegmentSettings(
            model="robustmedsam-lite", device="cpu", propagate=True, slice_step=step,
            encode_ahead=ahead,
        )  # fmt: skip
        runs[step, ahead] = make_segmenter(settings, "cpu").segment(
            volume, prompts, Path("ball.nrrd")
        )
    runs["truth"] = phantom.mask
    return runs


def test_the_encoder_runs_only_on_the_slices_asked(lite_runs) -> None:
    """Encode-ahead follows the stride: a skipped slice is never encoded."""
    for ahead in (0, 2):
        result, record, session = lite_runs[2, ahead]
        decisions = record["decisions"]
        encoded = session.stats.encoded
        assert len(encoded) == len(set(encoded))
        assert decisions["filled"] and set(decisions["filled"]).isdisjoint(encoded)
        asked = set(result.prompted) | set(decisions["asked"])
        if ahead == 0:
            assert set(encoded) == asked
        else:  # ahead of a front that then stops: one of its planned asks, never another
            planned = plan_order(result.prompted, 24, step=2)
            assert asked <= set(encoded) <= asked | set(planned)
    every = lite_runs[1, 0][2].stats.encoder_calls
    assert lite_runs[2, 0][2].stats.encoder_calls <= every // 2 + 2


def test_the_run_record_says_the_step_and_the_slices_asked_and_filled(lite_runs) -> None:
    result, record, _ = lite_runs[2, 0]
    decisions = record["decisions"]
    assert record["options"]["propagation"]["slice_step"] == 2
    assert decisions["slice_step"] == 2
    sources = {s["index"]: s["source"] for s in record["slices"]}
    assert sorted(i for i, s in sources.items() if s == "filled") == decisions["filled"]
    assert {i for i, s in sources.items() if s == "propagated"} <= set(decisions["asked"])
    low, high = decisions["covered"]
    assert set(range(low, high + 1)) == set(sources)  # asked or filled, no hole
    plain = lite_runs[1, 0][1]["decisions"]
    assert plain["slice_step"] == 1 and plain["filled"] == []
    truth = lite_runs["truth"]
    cost = 1.0 - dice(ideal_step(truth, result.prompted[0], 2), truth)  # as for the oracle
    assert dice(result.mask, truth) >= dice(lite_runs[1, 0][0].mask, truth) - cost


def test_a_jump_onto_a_slice_outside_the_roi_asks_the_slices_it_skipped(ball) -> None:
    """The 3D region ends inside the stride (a tilted ROI's last slices): the front comes
    back and asks the slices before it one by one, ending where step 1 ends, not short."""
    allowed = np.ones(ball.mask.shape, bool)
    allowed[44:] = False  # the ball runs to slice 51; the region stops at 43
    seeds = {32: ball.mask[32]}
    every = propagate(OracleThresholdSegmenter(ball.image), seeds, allowed=allowed)
    result = propagate(OracleThresholdSegmenter(ball.image), seeds,
                       PropagationOptions(slice_step=4), allowed=allowed)  # fmt: skip
    up = [(s.last_index, s.reason) for s in result.stops if s.direction == 1]
    assert up == [(s.last_index, s.reason) for s in every.stops if s.direction == 1]
    assert up == [(43, "roi")]
    assert result.mask[41:44].any(axis=(1, 2)).all() and not result.mask[44:].any()


class DiscSegmenter:
    """Answers slice ``index`` with ``masks[index]`` whatever the prompt (score 0.9)."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks, self.n_slices = masks, len(masks)

    def segment_slice(self, index: int, prompt) -> SimpleNamespace:
        logits = np.where(self.masks[index], 8.0, -8.0).astype(np.float32)
        return SimpleNamespace(mask=self.masks[index], score=0.9, low_res_logits=logits)


def test_filled_lists_an_interpolated_slice_left_empty() -> None:
    """Two kept masks that do not meet (overlap rule off) interpolate to nothing between:
    that slice is still listed, so a caller writing ``filled`` (the server's propagate)
    clears it rather than keeping what an earlier run left there."""
    y, x = np.mgrid[:32, :32]
    masks = np.stack([np.hypot(x - cx, y - 16) <= 4 for cx in (8, 16, 24)])
    options = PropagationOptions(slice_step=2, iou_threshold=0.0, projection="box")
    result = propagate(DiscSegmenter(masks), {0: masks[0]}, options)
    assert result.requested == [2] and result.mask[2].any()
    assert result.filled == [1] and not result.mask[1].any()
