"""``robustmedsam fuse`` on files: the result loads in the reference builder."""

from __future__ import annotations

import json

import torch
from reference_models import reference_robust_sam

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.model.config import TINY


def test_fuse_writes_reference_loadable_checkpoint(tmp_path, tiny_checkpoints, tiny_sam_state):
    out = tmp_path / "fused.pth"
    code = main(
        [
            "fuse",
            "--encoder",
            str(tiny_checkpoints["sam"]),
            "--decoder",
            str(tiny_checkpoints["robust"]),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    state = torch.load(out, weights_only=True)
    reference_robust_sam(TINY, state)
    assert torch.equal(
        state["image_encoder.neck.0.weight"], tiny_sam_state["image_encoder.neck.0.weight"]
    )
    record = json.loads((tmp_path / "fused.pth.json").read_text())
    assert len(record["sha256"]) == 64


def test_fuse_with_swapped_files_fails_cleanly(tmp_path, tiny_checkpoints, capsys):
    out = tmp_path / "fused.pth"
    code = main(
        [
            "fuse",
            "--encoder",
            str(tiny_checkpoints["robust"]),
            "--decoder",
            str(tiny_checkpoints["sam"]),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "expected RobustSAM" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
