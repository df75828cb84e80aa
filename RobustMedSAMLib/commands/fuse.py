"""``robustmedsam fuse``: MedSAM's image encoder + RobustSAM's decoder in one checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fuse",
        help="write a fused checkpoint (MedSAM encoder + RobustSAM decoder)",
        description="Take image_encoder.* from ENCODER (MedSAM) and the prompt encoder and "
        "robust mask_decoder.* from DECODER (RobustSAM); write them in RobustSAM's key layout, "
        "which robust-segment-anything's builder loads unchanged. A FUSED.json record beside "
        "it names the sources and their SHA-256.",
    )
    parser.add_argument("--encoder", required=True, type=Path, help="MedSAM checkpoint")
    parser.add_argument("--decoder", required=True, type=Path, help="RobustSAM checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="fused .pth or .safetensors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.formats.atomic import atomic_output, check_not_an_input, sha256_of
    from RobustMedSAMLib.weights.checkpoint import (
        fuse_state_dicts,
        read_state_dict,
        save_state_dict,
    )

    path = Path(args.out)
    check_not_an_input(
        (path, path.with_name(path.name + ".json")),
        {"the --encoder checkpoint": args.encoder, "the --decoder checkpoint": args.decoder},
    )
    fused = fuse_state_dicts(
        read_state_dict(args.encoder), read_state_dict(args.decoder), args.encoder, args.decoder
    )
    if path.is_dir():
        raise InputError(f"--out {path} is a folder: give a checkpoint file name")
    with atomic_output(path.with_name(path.name + ".json")) as record_file:
        with atomic_output(path) as temporary:
            save_state_dict(fused, temporary)
            record = {
                "fused": str(path),
                "sha256": sha256_of(temporary),
                "image_encoder_from": {
                    "path": str(args.encoder),
                    "sha256": sha256_of(args.encoder),
                },
                "prompt_encoder_and_mask_decoder_from": {
                    "path": str(args.decoder),
                    "sha256": sha256_of(args.decoder),
                },
            }
            record_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(fused)} tensors, sha256 {record['sha256'][:12]}...)")
    return 0
