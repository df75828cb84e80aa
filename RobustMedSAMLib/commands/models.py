"""``robustmedsam models``: known models, their sources, SHA-256 and local state; downloads."""

from __future__ import annotations

import argparse
from pathlib import Path

from RobustMedSAMLib.names import DEFAULT_MODEL

DESCRIPTION = """\
List the known models: architecture, preprocessing, where the checkpoint is on this
machine (or "missing"), its size, published SHA-256 and source. With --download NAME,
fetch a published checkpoint and check its SHA-256 before keeping it.

Checkpoints are looked for in $ROBUSTMEDSAM_MODELS, then in the user cache folder.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="known models, sources, SHA-256, local state; --download NAME",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--download", metavar="NAME", help="download this model's checkpoint")
    parser.add_argument(
        "--dest",
        type=Path,
        metavar="DIR",
        help="download folder (default: $ROBUSTMEDSAM_MODELS, else the user cache folder)",
    )
    parser.add_argument(
        "--allow-unverified",
        action="store_true",
        help="download even where no SHA-256 is published (the computed one is printed)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="hash the local checkpoints against the published SHA-256 (about 1 s each)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.errors import InputError

    if args.download:
        return _download(args.download, args.dest, args.allow_unverified)
    if args.dest is not None or args.allow_unverified:
        raise InputError("--dest and --allow-unverified only apply with --download NAME")
    return _list(args.verify, args.json)


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("KB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _list(verify: bool, as_json: bool) -> int:
    import json

    from RobustMedSAMLib.weights import registry

    statuses = registry.model_status(verify=verify)
    folder = registry.default_models_dir()
    if as_json:
        payload = {"models_dir": str(folder), "models": [s.to_dict() for s in statuses]}
        print(json.dumps(payload, indent=2))
        return 0
    rows = [["NAME", "ARCH", "PREPROC", "LOCAL", "SIZE", "SHA-256", "SOURCE"]]
    for s in statuses:
        local = "missing" if s.path is None else f"{s.path} [{s.state}]"
        sha = s.expected_sha256[:12] if s.expected_sha256 else "(none published)"
        row = [s.name, s.architecture, s.preprocessing, local, _human(s.size_bytes), sha]
        rows.append([*row, s.source])
    print(_table(rows))
    print(f"\nDefault model (--model): {DEFAULT_MODEL}")
    print(f"\nDownloads go to {folder} (set ${registry.MODELS_ENV} to change).")
    print("Get one with: robustmedsam models --download NAME")
    return 0


def _download(name: str, dest: Path | None, allow_unverified: bool) -> int:
    from RobustMedSAMLib.formats.atomic import sha256_of
    from RobustMedSAMLib.weights import registry
    from RobustMedSAMLib.weights.download import download

    source = registry.get_source(name)
    folder = dest.expanduser() if dest is not None else registry.default_models_dir()
    target = folder / source.filename
    if target.is_file():
        digest = sha256_of(target)
        if source.sha256 is None or digest == source.sha256:
            check = "verified" if source.sha256 else "no published SHA-256"
            print(f"{name}: already present at {target} ({check}); SHA-256 {digest}")
            return 0
        print(f"{name}: {target} has SHA-256 {digest}, expected {source.sha256}; downloading again")
    path = download(source, folder, allow_unverified=allow_unverified)
    digest = sha256_of(path)
    size = _human(path.stat().st_size)
    if source.sha256:
        print(f"{name}: saved {path} ({size}); SHA-256 {digest} verified")
    else:
        print(f"{name}: saved {path} ({size})")
        print(f"unverified: no published SHA-256; computed SHA-256 {digest} (record it)")
    if registry.find_local(source) != path:
        print(f"Use it with --checkpoint {path}, or set {registry.MODELS_ENV}={folder}")
    return 0
