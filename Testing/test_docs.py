"""The README's layout matches the tree, and every relative link in the docs resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LIBRARY = ROOT / "RobustMedSAMLib"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def layout_block() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Layout") :]
    return section.split("```")[1].splitlines()


def library_entries() -> set[str]:
    """Names the layout gives under ``RobustMedSAMLib/`` (``formats/``, ``cli.py``, ...):
    the indented lines' first column, before the three-space gap of the description."""
    lines = layout_block()
    start = next(i for i, line in enumerate(lines) if line.startswith("RobustMedSAMLib/"))
    names = set()
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        names |= set(re.findall(r"\b\w+(?:\.py|/)", line.split("   ")[0]))  # before the notes
    return names


def test_layout_lists_every_package_and_top_level_module():
    listed = library_entries()
    packages = {f"{p.name}/" for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.name for p in LIBRARY.glob("*.py")} - {"__init__.py"}
    assert packages | modules <= listed, (
        f"missing from README Layout: {(packages | modules) - listed}"
    )
    assert listed <= packages | modules, (
        f"in README Layout but not in the tree: {listed - packages - modules}"
    )


def test_top_level_folders_in_the_layout_exist():
    for line in layout_block():
        if line and not line.startswith(" "):
            name = line.split()[0]
            assert (ROOT / name).exists(), name


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_resolves():
    broken = []
    for doc in doc_files():
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(t).name for t in LINK.findall(README.read_text()) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not in the README tour: {pages - linked}"


def test_every_repository_path_named_in_the_docs_exists():
    pattern = re.compile(r"`((?:RobustMedSAMLib|Testing|scripts|configs|Resources)/[\w./-]+)`")
    missing = [
        f"{doc.relative_to(ROOT)}: {name}"
        for doc in doc_files()
        for name in pattern.findall(doc.read_text())
        if not (ROOT / name.rstrip("/")).exists()
    ]
    assert missing == []


def test_every_model_named_in_a_docs_command_exists():
    """A ``--model NAME`` in the docs is one the CLI accepts (the removed demo model
    left commands behind that fail with 'invalid choice')."""
    from RobustMedSAMLib.names import MODEL_NAMES

    unknown = []
    for doc in doc_files():
        # evaluate's specs are NAME or LABEL=NAME:CHECKPOINT; upper case is a placeholder
        for label, name in re.findall(r"--model[ =]([\w-]+)(?:=([\w-]+):)?", doc.read_text()):
            name = name or label
            if not name.isupper() and name not in MODEL_NAMES:
                unknown.append(f"{doc.relative_to(ROOT)}: --model {name}")
    assert not unknown, unknown


# Where each sub-command's options are documented: docs/cli.md, plus its own page.
OPTION_PAGES = {
    "segment": ["cli.md"],
    "corrupt": ["cli.md", "corruptions.md"],
    "corruptions": ["cli.md", "corruptions.md"],
    "models": ["cli.md", "models.md"],
    "fuse": ["cli.md"],
    "evaluate": ["cli.md", "evaluation.md"],
    "finetune": ["cli.md", "fine-tuning.md"],
    "serve": ["cli.md", "server.md"],
}


def test_every_command_line_option_is_named_on_its_page():
    """A flag users can pass is named where that command is documented (``--no-progress``
    was named only in a measurement's command line; ``--verbose`` and ``--version``
    nowhere)."""
    import argparse

    from RobustMedSAMLib.cli import COMMANDS, build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(OPTION_PAGES) == set(COMMANDS)
    places = [("robustmedsam", parser, ["cli.md"])]
    places += [(name, sub, OPTION_PAGES[name]) for name, sub in commands.choices.items()]
    missing = []
    for name, sub, pages in places:
        text = "\n".join((ROOT / "docs" / page).read_text() for page in pages)
        for action in sub._actions:
            for flag in action.option_strings:
                named = re.search(re.escape(flag) + r"(?![\w-])", text)
                if flag.startswith("--") and flag != "--help" and not named:
                    missing.append(f"{name} {flag} (in none of {pages})")
    assert not missing


def test_slicer_page_lists_the_runtime_requirements_the_panel_checks():
    """docs/slicer.md names the packages the panel checks: every runtime dependency of
    pyproject.toml (nibabel, h11, fastapi and uvicorn were missing from the list)."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [re.split(r"[=<>!~ ;\[]", spec)[0] for spec in pyproject["project"]["dependencies"]]
    text = " ".join((ROOT / "docs" / "slicer.md").read_text().split())
    listed = re.search(r"those of `pyproject\.toml`: ([^)]*)\)", text).group(1)
    assert sorted(re.split(r",\s*", listed.strip())) == sorted(wanted)
