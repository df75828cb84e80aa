"""The shipped ``robustmedsam-lite``: loads strictly with its SHA-256, refuses a wrong or
damaged file in one line (exit 2), segments the sample phantom's liver from a box and
from a click.

Bounds. Box: the product's target for clean images is "not more than 0.01 below
LiteMedSAM" (issue 17), so the bound is LiteMedSAM's Dice on the same slice and box
minus 0.01. Point: LiteMedSAM, trained with boxes only, answers a click with a part or a
spill (Dice 0.00-0.15 on real scans, docs/models.md); a click that "works" gives a mask
that is mostly the clicked organ, so Dice > 0.5 (more overlap than disagreement) and
above LiteMedSAM's from the same click.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from RobustMedSAMLib import cli
from RobustMedSAMLib.errors import CheckpointError
from RobustMedSAMLib.formats.atomic import sha256_of
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import read_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.model.config import LITE_ROBUST
from RobustMedSAMLib.weights import registry

SAMPLES = Path(__file__).resolve().parents[2] / "Resources" / "samples"
SHIPPED = registry.SHIPPED_MODELS_DIR / registry.MODELS["robustmedsam-lite"].filename


@pytest.fixture(scope="module")
def models():
    return load_named_model("robustmedsam-lite", device="cpu"), load_named_model(
        "litemedsam", device="cpu"
    )


@pytest.fixture(scope="module")
def liver():
    volume = read_volume(SAMPLES / "abdomen_phantom.nrrd")
    truth = read_segmentation(SAMPLES / "liver_truth.seg.nrrd")[0] > 0
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    return volume.array[k], truth[k]


def _dice(mask: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))


def test_the_shipped_decoder_loads_strictly_with_its_sha256(models):
    robust, _ = models
    source = registry.MODELS["robustmedsam-lite"]
    assert robust.checkpoints["decoder"] == SHIPPED
    assert sha256_of(SHIPPED) == source.sha256 and SHIPPED.stat().st_size == source.size_bytes
    assert robust.model.robust and robust.model.config == LITE_ROBUST
    assert robust.preprocessing == "litemedsam"


NOT_MET = (
    "the shipped model keeps LiteMedSAM's boxes but did not learn clicks (held-out point "
    "Dice 0.07, LiteMedSAM 0.07; liver click 0.00 for both; docs/fine-tuning.md): drop "
    "the mark when a model that meets it ships"
)


def test_it_segments_the_liver_from_a_box(models, liver):
    image, truth = liver
    rows, cols = np.nonzero(truth)
    box = np.array([cols.min() - 2, rows.min() - 2, cols.max() + 2, rows.max() + 2], float)
    scores = []
    for loaded in models:
        predictor = loaded.predictor()
        predictor.set_image(image, window=(-160.0, 240.0))
        scores.append(_dice(predictor.predict(SlicePrompt(box=box)).mask, truth))
    assert scores[0] >= scores[1] - 0.01, scores


def _click_scores(models, liver) -> list[float]:
    image, truth = liver
    rows, cols = np.nonzero(truth)
    inside = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    point = np.array([[cols[inside], rows[inside]]], float)
    scores = []
    for loaded in models:
        predictor = loaded.predictor()
        predictor.set_image(image, window=(-160.0, 240.0))
        prompt = SlicePrompt(points=point, labels=np.array([1]))
        scores.append(_dice(predictor.predict(prompt).mask, truth))
    return scores


@pytest.mark.xfail(strict=True, reason=NOT_MET)
def test_a_click_in_the_liver_gives_more_of_it_than_litemedsam(models, liver):
    scores = _click_scores(models, liver)
    assert scores[0] > scores[1], scores


@pytest.mark.xfail(strict=True, reason=NOT_MET)
def test_a_click_in_the_liver_gives_the_liver(models, liver):
    scores = _click_scores(models, liver)
    assert scores[0] > 0.5 and scores[0] > scores[1], scores


def test_a_damaged_shipped_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    damaged = tmp_path / SHIPPED.name
    data = bytearray(SHIPPED.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="damaged or was replaced.*restore it"):
        load_named_model("robustmedsam-lite", device="cpu")


@pytest.mark.parametrize("kind", ["corrupt", "wrong"])
def test_a_corrupt_or_wrong_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, kind):
    if kind == "corrupt":
        bad = tmp_path / "decoder.safetensors"
        bad.write_bytes(SHIPPED.read_bytes()[: SHIPPED.stat().st_size // 2])
        words = "not a readable safetensors file"
    else:  # LiteMedSAM's own checkpoint: no robust decoder
        bad = tmp_path / "lite_medsam.pth"
        shutil.copy(registry.resolve_checkpoint("litemedsam"), bad)
        words = "expected RobustSAM's robust mask decoder"
    out = tmp_path / "liver.seg.nrrd"
    argv = ["segment", str(SAMPLES / "abdomen_phantom.nrrd"), "--box",
            str(SAMPLES / "liver_box.mrk.json"), "--model", "robustmedsam-lite",
            "--checkpoint", str(bad), "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and str(bad) in err
    assert not out.exists()


def test_cli_records_both_files_with_their_sha256(tmp_path):
    out = tmp_path / "liver.seg.nrrd"
    argv = ["segment", str(SAMPLES / "abdomen_phantom.nrrd"), "--box",
            str(SAMPLES / "liver_box.mrk.json"), "--model", "robustmedsam-lite",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads(out.with_name(out.name + ".json").read_text())
    files = record["model"]["files"]
    assert record["model"]["name"] == "robustmedsam-lite"
    assert files["decoder"]["sha256"] == registry.MODELS["robustmedsam-lite"].sha256
    assert files["checkpoint"]["sha256"] == registry.MODELS["litemedsam"].sha256
    assert (read_segmentation(out)[0] > 0).any()
