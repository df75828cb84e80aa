"""Every bad input of docs/refusals.md, on the command line: one line on stderr naming
the input, exit status 2, nothing written, the inputs untouched."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from refusal_places import fill, full_dir, listing, readonly_dir  # noqa: F401 - fixtures
from volumes import centre_ras, oblique

from RobustMedSAMLib.cli import COMMANDS, main
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi, write_points, write_roi
from RobustMedSAMLib.formats.segmentation import read_segmentation, write_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume, write_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.slicing import anatomical_axes, ijk_box_roi
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.weights.checkpoint import save_state_dict


@pytest.fixture
def case(tmp_path, tiny_checkpoints) -> dict[str, Path]:
    """A small volume, a point list and a tiny robust checkpoint in ``tmp_path/in``."""
    folder = tmp_path / "in"
    folder.mkdir()
    phantom = sphere((8, 32, 32), spacing=(1.0, 1.0, 2.0), radius=7.0)
    volume = oblique(phantom)
    return {
        "volume": write_volume(volume, folder / "ct.nrrd"),
        "points": write_points(folder / "p.mrk.json", centre_ras(volume, phantom.mask)),
        "checkpoint": tiny_checkpoints["robust"],
    }


def segment(case: dict, out: Path, *extra: str, points: Path | None = None) -> int:
    return main(
        ["segment", str(case["volume"]), "--points", str(points or case["points"]),
         "--out", str(out), "--model", "robustsam", "--checkpoint", str(case["checkpoint"]),
         "--device", "cpu", *extra]
    )  # fmt: skip


PROGRESS = re.compile(r"^\w+: .*(\d+\w*|\?\w+)/s\]$")  # a tqdm progress bar's line


def refused(code: int, capsys, *words: str) -> str:
    """Assert the contract's message part: exit 2 and one stderr line with ``words``."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not PROGRESS.match(line)]
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("robustmedsam ") and ": error: " in err[0]
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- segment -----------------------------------------------------------------------------


def test_out_is_a_folder(tmp_path, case, capsys):
    out = tmp_path / "out.seg.nrrd"
    out.mkdir()
    refused(segment(case, out), capsys, str(out), "folder")
    assert listing(out) == [] and not (tmp_path / "out.seg.nrrd.json").exists()


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked")


@pytest.mark.parametrize("name", ["out.png", "out.mhd", "out.seg.nrrd"])
def test_output_refused_before_the_model_loads(tmp_path, case, capsys, monkeypatch, name):
    folder = name == "out.seg.nrrd"
    if folder:
        (tmp_path / name).mkdir()  # a folder in the file's place
    monkeypatch.setattr("RobustMedSAMLib.inference.batch.make_segmenter", no_model)
    refused(segment(case, tmp_path / name), capsys, name)
    written = {p.name for p in tmp_path.iterdir()} - {"in", name if folder else ""}
    assert written == set() and (not folder or listing(tmp_path / name) == [])


MARKUPS = {
    "controlPoints an int": {"type": "Fiducial", "controlPoints": 3},
    "controlPoints a string": {"type": "Fiducial", "controlPoints": "abc"},
    "controlPoints a dict": {"type": "Fiducial", "controlPoints": {"position": [0, 0, 0]}},
    "coordinateSystem a list": {
        "type": "Fiducial",
        "coordinateSystem": ["LPS"],
        "controlPoints": [{"position": [0, 0, 0]}],
    },
    "position too large": {"type": "Fiducial", "controlPoints": [{"position": [10**400, 0, 0]}]},
}


@pytest.mark.parametrize("markup", list(MARKUPS.values()), ids=list(MARKUPS))
def test_malformed_markups(tmp_path, case, capsys, markup):
    text = json.dumps({"markups": [markup]})
    if "10000000000" in text:
        text = text.replace(str(10**400), "1" + "0" * 400)
    bad = case["points"].with_name("bad.mrk.json")
    bad.write_text(text)
    out = tmp_path / "out.seg.nrrd"
    refused(segment(case, out, points=bad), capsys, str(bad))
    assert not out.exists() and bad.read_text() == text


@pytest.mark.parametrize(
    "orientation",
    [[0] * 9, [100, 0, 0, 0, 100, 0, 0, 0, 100], [1, 0, 0, 1, 0, 0, 0, 0, 1]],
    ids=["zero", "scaled", "two axes parallel"],
)
def test_roi_orientation_that_is_not_a_rotation_is_refused(tmp_path, case, capsys, orientation):
    # scaled or parallel axes gave a box of another size or shape (exit 0); zero axes were
    # told "no width or no height on the axial slices"
    volume = read_volume(case["volume"])
    box = write_roi(
        case["points"].with_name("box.mrk.json"), ijk_box_roi(volume, (8, 8, 2), (24, 24, 6))
    )
    document = json.loads(box.read_text())
    document["markups"][0]["orientation"] = orientation
    box.write_text(json.dumps(document))
    out = tmp_path / "o.seg.nrrd"
    code = main(["segment", str(case["volume"]), "--box", str(box), "--out", str(out),
                 "--model", "robustsam", "--checkpoint", str(case["checkpoint"])])  # fmt: skip
    refused(code, capsys, str(box), "orientation", "not a rotation")
    assert not out.exists()


def test_markups_nested_very_deeply(tmp_path, case, capsys):
    bad = case["points"].with_name("deep.mrk.json")
    bad.write_text('{"markups": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(segment(case, tmp_path / "o.seg.nrrd", points=bad), capsys, str(bad), "nested")


def test_readonly_output_folder(case, capsys, readonly_dir, monkeypatch):  # noqa: F811
    out = readonly_dir / "out.seg.nrrd"
    monkeypatch.setattr("RobustMedSAMLib.inference.batch.make_segmenter", no_model)
    refused(segment(case, out), capsys, "cannot write", str(out))
    assert listing(readonly_dir) == []


def test_full_disk(case, capsys, full_dir):  # noqa: F811
    fill(full_dir)
    before = listing(full_dir)
    refused(segment(case, full_dir / "out.seg.nrrd"), capsys, "cannot write", "No space")
    assert listing(full_dir) == before


def test_record_that_cannot_be_written_leaves_no_segmentation(tmp_path, case, capsys):
    out = tmp_path / "out.seg.nrrd"
    (tmp_path / "out.seg.nrrd.json").mkdir()  # the record's name is taken by a folder
    refused(segment(case, out), capsys, "out.seg.nrrd.json")
    assert listing(tmp_path / "out.seg.nrrd.json") == [] and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_inputs_untouched_by_a_refusal(tmp_path, case, capsys):
    before = snapshot(case["volume"].parent)
    out = tmp_path / "o.seg.nrrd"
    out.mkdir()
    refused(segment(case, out), capsys)
    assert snapshot(case["volume"].parent) == before


def record_with_roi(tmp_path, case, roi: dict) -> Path:
    out = tmp_path / "first.seg.nrrd"
    assert segment(case, out) == 0
    record_path = tmp_path / "first.seg.nrrd.json"
    record = json.loads(record_path.read_text())
    record["prompts"]["roi"] = roi
    record_path.write_text(json.dumps(record))
    return record_path


@pytest.mark.parametrize(
    "roi",
    [
        {"center_ras": [float("nan"), 0, 0], "size": [5, 5, 5], "axes_ras": np.eye(3).tolist()},
        {"center_ras": [0, 0, 0], "size": [5], "axes_ras": np.eye(3).tolist()},
        {"center_ras": [0, 0, 0], "size": [5, 5, 5], "axes_ras": [[1, 0], [0, 1]]},
        {"center_ras": [0, 0, 0], "size": [5, 5, 5], "axes_ras": np.zeros((3, 3)).tolist()},
    ],
    ids=["nan centre", "one size", "2x2 axes", "zero axes"],
)
def test_replay_with_a_bad_roi(tmp_path, case, capsys, roi):
    record = record_with_roi(tmp_path, case, roi)
    capsys.readouterr()
    out = tmp_path / "again.seg.nrrd"
    code = main(["segment", str(case["volume"]), "--replay", str(record), "--out", str(out),
                 "--model", "robustsam", "--checkpoint", str(case["checkpoint"])])  # fmt: skip
    refused(code, capsys, str(record))
    assert not out.exists()


def test_box_outside_a_volume_with_huge_spacing(tmp_path, case, capsys):
    array = np.zeros((4, 16, 16), np.int16)
    far = write_volume(Volume(array, np.diag([1e6, 1e6, 1e6, 1.0])), tmp_path / "far.nrrd")
    box = write_roi(tmp_path / "box.mrk.json", Roi(np.zeros(3) - 5e7, np.ones(3), np.eye(3)))
    out = tmp_path / "o.seg.nrrd"
    code = main(["segment", str(far), "--box", str(box), "--out", str(out), "--model",
                 "robustsam", "--checkpoint", str(case["checkpoint"])])  # fmt: skip
    refused(code, capsys, "does not overlap")
    assert not out.exists()


def test_box_drawn_in_another_view(tmp_path, case, capsys):
    volume = read_volume(case["volume"])
    sagittal = ijk_box_roi(volume, (16, 6, 1), (16, 26, 6))  # no width along I
    box = write_roi(tmp_path / "box.mrk.json", sagittal)
    out = tmp_path / "o.seg.nrrd"
    args = ["segment", str(case["volume"]), "--box", str(box), "--out", str(out), "--model",
            "robustsam", "--checkpoint", str(case["checkpoint"]), "--device", "cpu"]  # fmt: skip
    line = refused(main(args), capsys, "no width or no height", "axial slices")
    assert not out.exists()
    advice = line.split("--axis ")[-1]  # the axis the box was drawn on works
    assert main([*args, "--axis", advice]) == 0 and out.exists()  # a tiny random model


@pytest.mark.parametrize("side", ["first", "last"])
@pytest.mark.parametrize("axis", ["axial", "coronal"])
def test_box_just_outside_an_edge_is_told_so(tmp_path, case, capsys, side, axis):
    # a box with width and height, past the I edge by < half a voxel: it passed the overlap
    # check, clipped to nothing, and was sent to another view ("use --axis sagittal")
    volume = read_volume(case["volume"])
    edge = volume.shape[2] - 1
    low, high = (-3.0, -0.2) if side == "first" else (edge + 0.2, edge + 3.0)
    roi = ijk_box_roi(volume, (low, 6, 1), (high, 26, 6))
    box = write_roi(tmp_path / "box.mrk.json", roi)
    out = tmp_path / "o.seg.nrrd"
    args = ["segment", str(case["volume"]), "--box", str(box), "--out", str(out), "--model",
            "robustsam", "--checkpoint", str(case["checkpoint"]), "--device", "cpu",
            "--axis", axis]  # fmt: skip
    name = {index: n for n, index in anatomical_axes(volume).items()}[2]
    line = refused(main(args), capsys, "lies outside volume", f"past its {side} {name} slice",
                   "move it into the volume")  # fmt: skip
    assert "--axis" not in line and not out.exists()


# --- embedding cache ---------------------------------------------------------------------


def test_cache_folder_that_is_a_file(tmp_path, case, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    refused(segment(case, tmp_path / "o.seg.nrrd", "--cache-dir", str(cache)), capsys, str(cache))
    assert cache.read_text() == "not a folder" and not (tmp_path / "o.seg.nrrd").exists()


def test_readonly_cache_folder(tmp_path, case, capsys, readonly_dir):  # noqa: F811
    out = tmp_path / "o.seg.nrrd"
    refused(segment(case, out, "--cache-dir", str(readonly_dir)), capsys, "cannot write")
    assert listing(readonly_dir) == [] and not out.exists()


@pytest.mark.parametrize("damage", ["shape", "nan", "frame", "names", "junk"])
def test_damaged_cache_files_are_encoded_again(tmp_path, case, damage):
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    first = tmp_path / "first.seg.nrrd"
    assert segment(case, first, "--cache-dir", str(cache)) == 0
    for path in cache.rglob("*.safetensors"):
        tensors = load_file(str(path))
        if damage == "shape":
            tensors["embedding"] = tensors["embedding"][:, :, :2].contiguous()
        elif damage == "nan":
            tensors["embedding"][0, 0, 0, 0] = float("nan")
        elif damage == "frame":
            tensors["frame"] = torch.tensor([1, 1, 1, 1])
        elif damage == "names":
            tensors = {"payload": tensors["embedding"]}
        save_file(tensors, str(path))
        if damage == "junk":
            path.write_bytes(b"\xff" * 64)
    again = tmp_path / "again.seg.nrrd"
    assert segment(case, again, "--cache-dir", str(cache)) == 0
    np.testing.assert_array_equal(read_segmentation(first)[0], read_segmentation(again)[0])


# --- checkpoints -------------------------------------------------------------------------


def forged(state: dict, change: str) -> dict:
    state = dict(state)
    if change == "1-D patch_embed":
        state["image_encoder.patch_embed.proj.weight"] = torch.zeros(64)
    elif change == "no encoder blocks":
        state = {k: v for k, v in state.items() if ".blocks." not in k}
    elif change == "huge pos_embed":  # 8 bytes in the file; a 50000-pixel grid to build
        state["image_encoder.pos_embed"] = torch.zeros(1, 1, 1, 64).expand(1, 50000, 50000, 64)
    elif change == "a block missing":
        state = {k: v for k, v in state.items() if ".blocks.1." not in k}
    return state


@pytest.mark.parametrize(
    "change, words",
    [
        ("empty file", ("empty",)),
        ("1-D patch_embed", ("patch_embed",)),
        ("no encoder blocks", ("blocks",)),
        ("a block missing", ("blocks",)),
        ("huge pos_embed", ("pos_embed",)),
    ],
)
def test_bad_checkpoint(tmp_path, case, capsys, tiny_robust_state, change, words):
    bad = tmp_path / "bad.pth"
    if change == "empty file":
        bad.write_bytes(b"")
    else:
        torch.save(forged(tiny_robust_state, change), bad)
    case["checkpoint"] = bad
    out = tmp_path / "o.seg.nrrd"
    refused(segment(case, out), capsys, str(bad), *words)
    assert not out.exists()


def fuse(tiny_checkpoints, out: Path) -> int:
    return main(["fuse", "--encoder", str(tiny_checkpoints["sam"]),
                 "--decoder", str(tiny_checkpoints["robust"]), "--out", str(out)])  # fmt: skip


def test_fuse_into_a_readonly_folder(capsys, tiny_checkpoints, readonly_dir):  # noqa: F811
    refused(fuse(tiny_checkpoints, readonly_dir / "f.pth"), capsys, "cannot write")
    assert listing(readonly_dir) == []


def test_fuse_on_a_full_disk(capsys, tiny_checkpoints, full_dir):  # noqa: F811
    fill(full_dir, leave=64 * 1024)  # room for the record, not for the checkpoint
    before = listing(full_dir)
    refused(fuse(tiny_checkpoints, full_dir / "f.pth"), capsys, "cannot write", "No space")
    assert listing(full_dir) == before


def test_fuse_out_is_a_folder(tmp_path, capsys, tiny_checkpoints):
    out = tmp_path / "f.pth"
    out.mkdir()
    refused(fuse(tiny_checkpoints, out), capsys, "folder")
    assert listing(tmp_path) == ["f.pth"]


# --- batch -------------------------------------------------------------------------------


def batch(case: dict, cases: Path, out_dir: Path) -> int:
    return main(["segment", "--cases", str(cases), "--out-dir", str(out_dir), "--model",
                 "robustsam", "--checkpoint", str(case["checkpoint"])])  # fmt: skip


def case_list(case: dict, *rows: str) -> Path:
    path = case["volume"].parent / "cases.csv"
    path.write_text("volume,points,out\n" + "".join(f"{r}\n" for r in rows))
    return path


def test_binary_case_list(tmp_path, case, capsys):
    cases = case["volume"].parent / "cases.csv"
    cases.write_bytes(bytes(range(256)) * 8)
    refused(batch(case, cases, tmp_path / "out"), capsys, str(cases), "not a CSV")
    assert not (tmp_path / "out").exists()


def test_case_volume_that_is_not_an_image(tmp_path, case, capsys):
    up = "../" * 40  # from any folder, up to the root
    cases = case_list(case, "ct.nrrd,p.mrk.json,", f"{up}etc/passwd,p.mrk.json,")
    if not Path("/etc/passwd").is_file():
        (case["volume"].parent / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        cases = case_list(case, "ct.nrrd,p.mrk.json,", "passwd,p.mrk.json,")
    refused(batch(case, cases, tmp_path / "out"), capsys, "passwd", "not an image")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["../x.seg.nrrd", ".hidden.seg.nrrd", "a\tb.seg.nrrd", "c:x.seg.nrrd", "a\\b.nii"]
)
def test_case_output_names_stay_in_the_folder(tmp_path, case, capsys, name):
    cases = case_list(case, f'ct.nrrd,p.mrk.json,"{name}"')
    refused(batch(case, cases, tmp_path / "out"), capsys, "plain file name")
    assert not (tmp_path / "out").exists()


def test_batch_into_a_readonly_folder(case, capsys, readonly_dir):  # noqa: F811
    cases = case_list(case, "ct.nrrd,p.mrk.json,")
    refused(batch(case, cases, readonly_dir), capsys, "cannot write", str(readonly_dir))
    assert listing(readonly_dir) == []


def test_batch_on_a_full_disk(case, capsys, full_dir):  # noqa: F811
    cases = case_list(case, "ct.nrrd,p.mrk.json,", "ct.nrrd,p.mrk.json,second.nii.gz")
    fill(full_dir)
    before = listing(full_dir)
    refused(batch(case, cases, full_dir), capsys, "cannot write", "No space")
    assert listing(full_dir) == before


# --- finetune ----------------------------------------------------------------------------

MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro") / "micro.safetensors"
    return save_state_dict(SegmentAnythingModel(MICRO, robust=True).state_dict(), path, MICRO)


def finetune_config(folder: Path, checkpoint: Path, **train) -> Path:
    """A two-step decoder run on a few phantom slices, with ``train`` overrides as TOML."""
    values = {"steps": 2, "batch_size": 2, "lr": 0.001, "val_every": 2, "checkpoint_every": 2,
              **train}  # fmt: skip
    text = "\n".join(f"{k} = {v}" for k, v in values.items())
    path = folder / "config.toml"
    path.write_text(
        f'[model]\ncheckpoint = "{checkpoint}"\n[train]\n{text}\n'
        "[data]\nphantom_volumes = 2\nphantom_shape = [6, 48, 48]\nval_samples = 2\n"
    )
    return path


@pytest.mark.parametrize(
    "train, words",
    [
        ({"lr": "nan"}, ("train.lr", "finite")),
        ({"lr": "inf"}, ("train.lr", "finite")),
        ({"val_every": 0}, ("train.val_every",)),
        ({"log_every": 0}, ("train.log_every",)),
        ({"checkpoint_every": 0}, ("train.checkpoint_every",)),
        ({"seed": -1}, ("train.seed",)),
        ({"grad_clip": "nan", "weight_decay": -5.0}, ("train.",)),
        ({"device": 5}, ("train.device", "text")),
        ({"batch_size": 5000}, ("train.batch_size", "training samples")),
    ],
)
def test_finetune_bad_config(tmp_path, capsys, micro_checkpoint, train, words):
    config = finetune_config(tmp_path, micro_checkpoint, **train)
    text = config.read_text()
    out = tmp_path / "run"
    refused(main(["finetune", str(config), "--out", str(out)]), capsys, *words)
    assert listing(out) == [] if out.exists() else True
    assert config.read_text() == text


def test_finetune_into_a_readonly_folder(tmp_path, capsys, micro_checkpoint, readonly_dir):  # noqa: F811
    config = finetune_config(tmp_path, micro_checkpoint)
    out = readonly_dir / "run"
    refused(main(["finetune", str(config), "--out", str(out)]), capsys, str(out))
    assert listing(readonly_dir) == []


def test_finetune_on_a_full_disk(tmp_path, capsys, micro_checkpoint, full_dir):  # noqa: F811
    config = finetune_config(tmp_path, micro_checkpoint)
    fill(full_dir, leave=256 * 1024)  # room for the config and log, not the checkpoints
    before = listing(full_dir)
    refused(main(["finetune", str(config), "--out", str(full_dir / "run")]), capsys,
            "cannot write", "No space")  # fmt: skip
    hidden = [Path(n).name for n in listing(full_dir) if Path(n).name.startswith(".")]
    assert all(re.match(r"\.(key|kinds)_v\d+$", n) for n in hidden), hidden  # no temporary
    assert set(before) <= set(listing(full_dir))


# --- evaluate and corrupt ----------------------------------------------------------------

EVALUATE = ["--data", "phantom:sphere,size=24", "--corruptions", "clean", "--severities", "1",
            "--seeds", "0", "--prompt", "box", "--projection", "mask", "--clicks", "1",
            "--device", "cpu", "--no-progress", "--protocol", "volumetric"]  # fmt: skip


def evaluate(tiny_checkpoints, out: Path) -> int:
    return main(["evaluate", "--model", "robustsam", "--checkpoint",
                 str(tiny_checkpoints["robust"]), "--out", str(out), *EVALUATE])  # fmt: skip


def test_evaluate_out_is_a_file(tmp_path, capsys, tiny_checkpoints):
    out = tmp_path / "report.csv"
    out.write_text("mine")
    refused(evaluate(tiny_checkpoints, out), capsys, str(out), "is a file")
    assert out.read_text() == "mine" and listing(tmp_path) == ["report.csv"]


def test_evaluate_into_a_readonly_folder(capsys, tiny_checkpoints, readonly_dir):  # noqa: F811
    refused(evaluate(tiny_checkpoints, readonly_dir), capsys, "cannot write")
    assert listing(readonly_dir) == []


def test_evaluate_on_a_full_disk(capsys, tiny_checkpoints, full_dir):  # noqa: F811
    fill(full_dir)
    before = listing(full_dir)
    refused(evaluate(tiny_checkpoints, full_dir), capsys, "cannot write", "No space")
    assert listing(full_dir) == before


@pytest.mark.parametrize("missing", ["--model", "--data"])
def test_evaluate_without_models_or_data(tmp_path, capsys, missing):
    given = {"--model": ["--model", "sam"], "--data": ["--data", "phantom:sphere,size=24"]}
    del given[missing]
    out = tmp_path / "out"
    args = ["evaluate", *[a for pair in given.values() for a in pair], "--out", str(out)]
    refused(main(args), capsys, f"give {missing} SPEC", "--report-only")
    assert not out.exists()


@pytest.mark.parametrize(
    "data", ["phantom:sphere,cuont=2", "phantom:sphere,limit=1", "phantom:sphere,size=24,size=32"]
)
def test_evaluate_data_spec_with_an_unknown_or_repeated_option(tmp_path, capsys, data):
    # a misspelt key, or one the kind does not take, was ignored: the run went on (exit 0)
    # on other data than asked for; a repeated key kept its last value
    out = tmp_path / "out"
    refused(main(["evaluate", "--model", "sam", "--data", data, "--out", str(out)]), capsys,
            data, "unknown or repeated", "count, modality, size, name")  # fmt: skip
    assert not out.exists()


def test_evaluate_report_only_needs_neither_models_nor_data(tmp_path, capsys, tiny_checkpoints):
    out = tmp_path / "out"
    assert evaluate(tiny_checkpoints, out) == 0
    (out / "summary.md").unlink()
    assert main(["evaluate", "--report-only", "--out", str(out)]) == 0
    assert "| robustsam |" in (out / "summary.md").read_text()
    capsys.readouterr()
    refused(main(["evaluate", "--report-only", "--out", str(tmp_path)]), capsys, "results.csv")


def test_corrupt_on_a_full_disk(case, capsys, full_dir):  # noqa: F811
    fill(full_dir)
    before = listing(full_dir)
    code = main(["corrupt", str(case["volume"]), "--type", "gaussian_noise", "--severity", "2",
                 "--out", str(full_dir / "noisy.nrrd")])  # fmt: skip
    refused(code, capsys, "cannot write", "No space")
    assert listing(full_dir) == before


# --- the page that lists all of the above ---------------------------------------------------


def test_every_documented_test_exists():
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "refusals.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", page))
    defined = {
        name
        for path in (root / "Testing").rglob("test_*.py")
        for name in re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.M)
    }
    assert len(named) > 30 and named <= defined, sorted(named - defined)
    here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M))
    assert here - {"test_every_documented_test_exists"} <= named, sorted(here - named)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--bounds", "1", "5"), ("--bounds", "--propagate")),
        (("--slice-step", "2"), ("--slice-step", "--propagate")),
        (("--segment-name", " "), ("--segment-name", "empty")),
    ],
)
def test_flags_that_would_be_ignored_are_refused(tmp_path, case, capsys, monkeypatch, extra, words):
    # without --propagate, --bounds and --slice-step did nothing: one slice, exit 0
    monkeypatch.setattr("RobustMedSAMLib.inference.batch.make_segmenter", no_model)
    refused(segment(case, tmp_path / "out.seg.nrrd", *extra), capsys, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("extra", [("--bounds", "1", "5"), ("--slice-step", "2")])
def test_batch_refuses_propagation_flags_without_propagate(tmp_path, case, capsys, extra):
    # --cases runs every case with the same flags: without --propagate these did nothing
    out_dir = tmp_path / "runs"
    code = main(["segment", "--cases", str(case["volume"].parent), "--out-dir", str(out_dir),
                 *extra])  # fmt: skip
    refused(code, capsys, extra[0], "--propagate")
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [(("--workers", "0"), ("--workers 0",)), (("--segment-name", ""), ("--segment-name",))],
)
def test_batch_with_no_workers_makes_no_folder(tmp_path, case, capsys, extra, words):
    out_dir = tmp_path / "runs"
    code = main(["segment", "--cases", str(case["volume"].parent), "--out-dir", str(out_dir),
                 *extra])  # fmt: skip
    refused(code, capsys, *words)
    assert not out_dir.exists()


# --- half precision ----------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_half_on_a_device_without_it_is_refused(tmp_path, case, capsys, monkeypatch, device):
    # --half runs on CUDA only: with --device cpu it was ignored in silence (fp32, exit 0)
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("RobustMedSAMLib.inference.loader.load_model", no_load)
    words = ("--half", f"--device {device}")
    refused(segment(case, tmp_path / "o.seg.nrrd", "--device", device, "--half"), capsys, *words)
    out_dir = tmp_path / "runs"
    code = main(["segment", "--cases", str(case["volume"].parent), "--out-dir", str(out_dir),
                 "--device", device, "--half"])  # fmt: skip
    refused(code, capsys, *words)
    token = tmp_path / "token"
    refused(main(["serve", "--device", device, "--half", "--token-file", str(token)]), capsys,
            *words)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, folder, token
    with pytest.raises(InputError, match="--half"):  # the Python API
        load_named_model("robustsam", case["checkpoint"], device=device, half=True)


# --- an output that is an input ------------------------------------------------------------


def linked(target: Path, how: str) -> Path:
    """``target`` itself, or a new symbolic or hard link to it beside it."""
    if how == "same path":
        return target
    link = target.with_name("link" + target.name)
    if how == "symbolic link":
        link.symlink_to(target.name)
    else:
        link.hardlink_to(target)
    return link


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link"])
def test_an_output_that_is_an_input_is_refused(tmp_path, case, capsys, how):
    # --out naming the input volume replaced it with the segmentation (exit 0)
    folder = case["volume"].parent
    encoder = Path(shutil.copy(case["checkpoint"], folder / "encoder.pth"))
    out, fused = linked(case["volume"], how), linked(encoder, how)
    before = snapshot(folder)
    refused(segment(case, out), capsys, "is the input volume", "replace")
    code = main(["corrupt", str(case["volume"]), "--type", "gaussian_noise", "--severity", "2",
                 "--out", str(out)])  # fmt: skip
    refused(code, capsys, "is the input volume")
    code = main(["fuse", "--encoder", str(encoder), "--decoder", str(case["checkpoint"]),
                 "--out", str(fused)])  # fmt: skip
    refused(code, capsys, "is the --encoder checkpoint")
    assert snapshot(folder) == before


def test_a_batch_output_that_is_a_case_volume_is_refused(tmp_path, case, capsys):
    # a case list beside its volumes, written into that folder: out=ct.nrrd replaced ct.nrrd
    folder = case["volume"].parent
    cases = case_list(case, "ct.nrrd,p.mrk.json,ct.nrrd")
    before = snapshot(folder)
    refused(batch(case, cases, folder), capsys, "is the volume of case ct.nrrd")
    assert snapshot(folder) == before


def test_replaying_into_the_record_replayed_is_refused(tmp_path, case, capsys):
    out = tmp_path / "first.seg.nrrd"
    assert segment(case, out) == 0
    record = tmp_path / "first.seg.nrrd.json"
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(["segment", str(case["volume"]), "--replay", str(record), "--out", str(out),
                 "--model", "robustsam", "--checkpoint", str(case["checkpoint"])])  # fmt: skip
    refused(code, capsys, "is the --replay record")
    assert snapshot(tmp_path) == before


# --- names written into files --------------------------------------------------------------


@pytest.mark.parametrize("name", ["liver\nSegment0_Color:=1 0 0", "tab\there", "bell\x07"])
def test_a_segment_name_with_control_characters_is_refused(
    tmp_path, case, capsys, monkeypatch, name
):
    # a line break ended the .seg.nrrd header field: exit 0, a file ITK and Slicer cannot read
    monkeypatch.setattr("RobustMedSAMLib.inference.batch.make_segmenter", no_model)
    refused(segment(case, tmp_path / "o.seg.nrrd", "--segment-name", name), capsys,
            "segment name", "printable")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    volume = read_volume(case["volume"])
    with pytest.raises(InputError, match="printable"):  # the Python API
        write_segmentation(tmp_path / "o.seg.nrrd", np.ones(volume.shape, bool), volume,
                           [(1, name, (1.0, 0.0, 0.0))])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["corrupt", "in.nrrd", "--type", "gaussian_noise", "--severity", "x",
          "--out", "o.nrrd"], ["--severity", "invalid int value"]),
        (["segment", "in.nrrd", "--out", "o.seg.nrrd", "--projection", "nope"],
         ["--projection", "invalid choice"]),
        (["evaluate", "--workers"], ["--workers", "expected one argument"]),
        (["segment", "--model"], ["--model", "expected one argument"]),
    ],
)  # fmt: skip
def test_a_bad_option_value_is_one_line(argv, words, capsys):
    """argparse's refusals too: one line naming the option, no usage block before it."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    line = refused(stop.value.code, capsys, *words)
    assert line.endswith("--help)")


def test_an_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["nope"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("robustmedsam: error: argument COMMAND: invalid choice: 'nope'")
    assert all(name in line for name in COMMANDS)  # the commands there are
    assert line.endswith("(see robustmedsam --help)")
