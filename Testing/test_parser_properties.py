"""Property tests of the parsers that take user files: whatever the markups JSON, case
list CSV or config values, the answer is a valid result or a clean refusal (a
RobustMedSAMError), never another exception."""

from __future__ import annotations

import json
import math
import string
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from RobustMedSAMLib.errors import RobustMedSAMError
from RobustMedSAMLib.formats.markups import read_points, read_roi
from RobustMedSAMLib.inference.batch import OUT_SUFFIXES, read_cases
from RobustMedSAMLib.training.config import TrainingConfig

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FOLDER = Path(tempfile.mkdtemp(prefix="robustmedsam-properties-"))
# Floats without subnormals: CPU inference sets torch.set_flush_denormal(True) for the
# process, and Hypothesis refuses to draw subnormals under it (tests run in any order).
FLOATS = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    FLOATS,
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=20,
)
numbers = st.one_of(st.integers(-(10**6), 10**6), FLOATS)
positions = st.one_of(st.lists(numbers, min_size=0, max_size=4), json_values)
control_point = st.fixed_dictionaries(
    {"position": positions},
    optional={
        "positionStatus": st.sampled_from(["defined", "preview", "undefined"]) | json_values,
        "label": json_values,
    },
)
markup = st.fixed_dictionaries(
    {"type": st.sampled_from(["Fiducial", "ROI", "Line"]) | json_values},
    optional={
        "coordinateSystem": st.sampled_from(["LPS", "RAS", "XYZ"]) | json_values,
        "controlPoints": st.lists(control_point, max_size=3) | json_values,
        "center": positions,
        "size": positions,
        "orientation": st.lists(numbers, min_size=9, max_size=9) | json_values,
    },
)
documents = st.one_of(
    st.fixed_dictionaries({"markups": st.lists(markup, max_size=3)}),
    st.fixed_dictionaries({"markups": json_values}),
    json_values,
)


def write(name: str, text: str | bytes) -> Path:
    path = FOLDER / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


@SETTINGS
@given(documents)
def test_markups_give_finite_points_or_a_refusal(document):
    path = write("m.mrk.json", json.dumps(document))
    try:
        points = read_points(path)
    except RobustMedSAMError:
        pass
    else:
        assert points.ndim == 2 and points.shape[1] == 3 and len(points) >= 1
        assert np.isfinite(points).all()
    try:
        roi = read_roi(path)
    except RobustMedSAMError:
        pass
    else:
        assert np.isfinite(roi.corners_ras()).all() and (roi.size >= 0).all()


@SETTINGS
@given(st.binary(max_size=300))
def test_markups_of_any_bytes(raw):
    path = write("b.mrk.json", raw)
    for reader in (read_points, read_roi):
        try:
            reader(path)
        except RobustMedSAMError:
            pass


cells = st.text(alphabet=string.printable + "é\x00\u2028", max_size=12)
rows = st.lists(st.lists(cells, min_size=0, max_size=6), max_size=4)
headers = st.lists(
    st.sampled_from(["volume", "points", "negative", "box", "out", "image", ""]) | cells,
    min_size=0,
    max_size=6,
)


@SETTINGS
@given(headers, rows)
def test_case_lists_give_plain_output_names_or_a_refusal(header, body):
    lines = [",".join(header)] + [
        ",".join(json.dumps(c) if "," in c else c for c in r) for r in body
    ]
    path = write("cases.csv", "\n".join(lines))
    try:
        cases = read_cases(path)
    except RobustMedSAMError:
        return
    for case in cases:
        assert Path(case.out).name == case.out and not case.out.startswith(".")
        assert case.out.endswith(OUT_SUFFIXES)
        assert (FOLDER / case.out).resolve().parent == FOLDER.resolve()
        assert case.points is not None or case.box is not None


@SETTINGS
@given(st.binary(max_size=400))
def test_case_lists_of_any_bytes(raw):
    path = write("raw.csv", raw)
    try:
        read_cases(path)
    except RobustMedSAMError:
        pass


config_numbers = st.one_of(st.integers(-(10**9), 10**9), FLOATS)
train_values = st.fixed_dictionaries(
    {},
    optional={
        key: config_numbers | json_values
        for key in (
            "steps",
            "batch_size",
            "lr",
            "min_lr_fraction",
            "weight_decay",
            "warmup_steps",
            "grad_clip",
            "seed",
            "val_every",
            "checkpoint_every",
            "log_every",
            "mode",
            "optimizer",
            "device",
        )
    },  # fmt: skip
)
data_values = st.fixed_dictionaries(
    {},
    optional={
        "phantom_shape": st.lists(config_numbers, max_size=4) | json_values,
        "val_fraction": config_numbers,
        "val_samples": config_numbers,
        "paths": st.lists(json_values, max_size=2),
        "folder": json_values,
    },
)


@SETTINGS
@given(train_values, data_values, st.dictionaries(st.text(max_size=6), json_values, max_size=2))
def test_config_values_give_a_checked_config_or_a_refusal(train, data, extra):
    values = {"model": {"init": "random"}, "train": train, "data": data, **extra}
    try:
        config = TrainingConfig.from_dict(values)
    except RobustMedSAMError:
        return
    t = config.train
    for value in (t.lr, t.min_lr_fraction, t.weight_decay, t.grad_clip, config.data.val_fraction):
        assert math.isfinite(value)
    assert t.lr > 0 and t.weight_decay >= 0 and t.grad_clip >= 0 and 0 <= t.seed < 2**32
    assert min(t.steps, t.batch_size, t.val_every, t.checkpoint_every, t.log_every) >= 1
    assert len(config.data.phantom_shape) == 3 and min(config.data.phantom_shape) >= 1
    assert all(isinstance(p, str) for p in config.data.paths)
    assert TrainingConfig.from_dict(config.to_dict()) == config  # what it keeps reads back
