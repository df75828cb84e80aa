"""Dependency checks and install plans for Slicer's Python (standard library only)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from RobustMedSAMLib import dependencies as deps
from RobustMedSAMLib.dependencies import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_fallback_list_equals_pyproject_runtime_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert list(deps.RUNTIME_REQUIREMENTS) == pyproject["project"]["dependencies"]


def test_check_works_without_packaging_and_imports_nothing_heavy():
    """In Slicer's Python before installation: standard library only, packaging optional."""
    code = (
        "import json, sys\n"
        "class NoPackaging:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'packaging':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoPackaging())\n"
        "import RobustMedSAMLib.dependencies as d, RobustMedSAMLib.training.process\n"
        "checked = d.check()\n"
        "d.install_plan(checked, slicer_provides={'numpy'})\n"
        "heavy = {'torch', 'numpy', 'SimpleITK', 'scipy', 'nrrd', 'PIL', 'packaging'}\n"
        "print(json.dumps([sorted(heavy & set(sys.modules)), [r.ok for r in checked]]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    imported, ok = json.loads(result.stdout)
    assert imported == []
    assert ok == [r.ok for r in deps.check()]  # the same verdicts as with packaging


def test_required_uses_matching_installed_metadata_without_extras(monkeypatch):
    listed = ["torch==2.14.1", 'numpy>=1.24; python_version >= "3.8"', 'pytest>=8; extra == "test"']
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: listed)
    assert deps.required() == ["torch==2.14.1", "numpy>=1.24"]
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1")  # an old install
    assert deps.required() == list(deps.RUNTIME_REQUIREMENTS)


def test_required_falls_back_when_the_library_is_not_installed(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    assert deps.required() == list(deps.RUNTIME_REQUIREMENTS)


def test_check_reports_installed_missing_and_wrong_versions():
    numpy_version = importlib.metadata.version("numpy")
    found = {r.name: r for r in deps.check(["numpy>=1.0", "pynrrd", "numpy<1.0", "nosuchpkg==1"])}
    ok = deps.check(["numpy>=1.0"])[0]
    assert (
        ok.ok and ok.installed == numpy_version and ok.problem == "" and ok.import_name == "numpy"
    )
    assert found["pynrrd"].ok and found["pynrrd"].import_name == "nrrd"
    wrong = deps.check(["numpy<1.0"])[0]
    assert not wrong.ok and wrong.problem == f"{numpy_version} installed, <1.0 required"
    absent = found["nosuchpkg"]
    assert (absent.ok, absent.installed, absent.problem) == (False, None, "not installed")
    pinned = deps.check(["numpy==0.1"])[0]
    assert pinned.problem == f"{numpy_version} installed, 0.1 required"


def test_check_of_the_real_requirements_names_every_one():
    results = deps.check()
    assert [r.spec for r in results] == deps.required()
    assert all(r.ok == (r.problem == "") for r in results)


@pytest.mark.parametrize(
    ("version", "specifier", "expected"),
    [
        ("2.14.1", "==2.14.1", True),
        ("2.14.1+cu126", "==2.14.1", True),
        ("2.1.0", "==2.14.1", False),
        ("1.0", "==1.0.0", True),
        ("1.26.4", ">=1.24", True),
        ("1.9.3", ">=1.24", False),
        ("2.0.0", "<2", False),
        ("1.99", "<2", True),
        ("2.4.1", "~=2.3", True),
        ("3.0", "~=2.3", False),
        ("2.3.9", "~=2.3.1", True),
        ("2.4.0", "~=2.3.1", False),
        ("2.0.0rc1", ">=2.0.0", False),
        ("1.5", ">=1.0,<2,!=1.5", False),
        ("1.5.2", "==1.5.*", True),
        ("", "", True),
    ],
)
def test_version_matching_with_and_without_packaging(version, specifier, expected):
    assert deps._simple_matches(version, specifier) is expected
    if version:
        assert deps.version_matches(version, specifier) is expected


def req(name, spec, installed, ok, problem=""):
    return Requirement(name, spec, deps.import_name_of(name), installed, ok, problem)


def test_install_plan_sends_torch_through_the_pytorch_extension():
    missing = [
        req("torch", "torch==2.14.1", None, False, "not installed"),
        req("segment-anything", "segment-anything==1.0", None, False, "not installed"),
    ]
    installed_ok = req("torchvision", "torchvision==0.29.1", "0.29.1", True)
    plan = deps.install_plan([*missing, installed_ok], slicer_provides=set(), pytorch_utils=True)
    assert [r.name for r in plan.torch] == ["torch", "torchvision"]  # installed as a pair
    assert plan.torch_arguments() == {
        "torchVersionRequirement": "==2.14.1",
        "torchvisionVersionRequirement": "==0.29.1",
    }
    assert plan.pip == ("segment-anything==1.0",) and not plan.restart_needed
    both = deps.install_plan(
        [missing[0], req("torchvision", "torchvision==0.29.1", None, False, "not installed")],
        slicer_provides=set(),
        pytorch_utils=True,
    )
    assert both.torch_arguments() == {
        "torchVersionRequirement": "==2.14.1",
        "torchvisionVersionRequirement": "==0.29.1",
    }
    assert "PyTorch extension" in both.summary()


def test_install_plan_without_the_extension_uses_pinned_pip_specs_and_says_so():
    missing = [
        req("torch", "torch==2.14.1", "2.1.0", False, "2.1.0 installed, 2.14.1 required"),
        req("torchvision", "torchvision==0.29.1", None, False, "not installed"),
    ]
    plan = deps.install_plan(
        missing, slicer_provides=set(), pytorch_utils=False, imported={"torch"}
    )
    assert plan.torch == () and plan.pip == ("torch==2.14.1", "torchvision==0.29.1")
    assert plan.restart_needed  # the old torch is already imported
    assert any("PyTorch extension" in note for note in plan.notes)
    assert "Restart Slicer" in plan.summary()


def test_install_plan_keeps_slicer_provided_packages():
    checked = [
        req("numpy", "numpy>=1.24", "1.26.4", True),
        req("SimpleITK", "SimpleITK>=2.3", "2.2.1", False, "2.2.1 installed, >=2.3 required"),
        req("scipy", "scipy>=1.10", None, False, "not installed"),  # not in this Slicer build
        req("pynrrd", "pynrrd>=1.0", None, False, "not installed"),
        req("tqdm", "tqdm>=4.60", "4.66.0", True),
    ]
    plan = deps.install_plan(
        checked, slicer_provides={"numpy", "simpleitk", "scipy"}, pytorch_utils=False, imported=()
    )
    assert plan.pip == ("scipy>=1.10", "pynrrd>=1.0")
    assert plan.constraints == ("numpy==1.26.4", "SimpleITK==2.2.1")
    assert plan.skipped == ("numpy 1.26.4 (provided by Slicer)",)
    assert len(plan.blocked) == 1 and "SimpleITK 2.2.1" in plan.blocked[0]
    assert ">=2.3" in plan.blocked[0] and "newer Slicer" in plan.blocked[0]


def test_install_plan_of_nothing_missing_is_empty():
    plan = deps.install_plan(
        [req("tqdm", "tqdm>=4.60", "4.66.0", True)], slicer_provides=set(), pytorch_utils=True
    )
    assert plan.empty and "Everything" in plan.summary()


# Realistic pip outputs --------------------------------------------------------------------

OFFLINE = """\
Collecting segment-anything==1.0
  WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) \
after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.\
HTTPSConnection object at 0x7f3c2a1b5d50>: Failed to establish a new connection: [Errno -3] \
Temporary failure in name resolution')': /simple/segment-anything/
ERROR: Could not find a version that satisfies the requirement segment-anything==1.0 \
(from versions: none)
ERROR: No matching distribution found for segment-anything==1.0
"""

PROXY = """\
Collecting torch==2.14.1
  WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) \
after connection broken by 'ProxyError('Cannot connect to proxy.', \
NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x0000021>: \
Failed to establish a new connection: [WinError 10061] No connection could be made because \
the target machine actively refused it'))': /simple/torch/
ERROR: Could not find a version that satisfies the requirement torch==2.14.1 (from versions: none)
ERROR: No matching distribution found for torch==2.14.1
"""

NO_WHEEL = """\
Collecting torch==2.14.1
ERROR: Ignored the following versions that require a different python version: \
2.14.1 Requires-Python >=3.12
ERROR: Could not find a version that satisfies the requirement torch==2.14.1 (from versions: \
2.2.0, 2.2.1, 2.2.2, 2.3.0, 2.3.1, 2.4.0, 2.4.1, 2.5.0, 2.5.1)
ERROR: No matching distribution found for torch==2.14.1
"""

PERMISSION = """\
Collecting pynrrd>=1.0
  Using cached pynrrd-1.1.1-py3-none-any.whl (23 kB)
Installing collected packages: pynrrd
ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied: \
'/opt/Slicer-5.8.0-linux-amd64/lib/Python/lib/python3.9/site-packages/nrrd'
Consider using the `--user` option or check the permissions.
"""

DISK_FULL = """\
Collecting torch==2.14.1
  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (887.5 MB)
Installing collected packages: torch
ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device
"""

IN_USE = """\
Collecting numpy>=1.24
  Using cached numpy-1.26.4-cp311-cp311-win_amd64.whl (15.8 MB)
Installing collected packages: numpy
  Attempting uninstall: numpy
    Found existing installation: numpy 1.23.5
    Uninstalling numpy-1.23.5:
      Successfully uninstalled numpy-1.23.5
ERROR: Could not install packages due to an OSError: [WinError 5] Access is denied: \
'C:\\\\Users\\\\ana\\\\AppData\\\\Local\\\\slicer.org\\\\Slicer 5.8.0\\\\lib\\\\Python\\\\Lib\\\\\
site-packages\\\\numpy\\\\core\\\\_multiarray_umath.cp311-win_amd64.pyd'
Check the permissions.
"""

CONFLICT = """\
ERROR: Cannot install segment-anything==1.0 and torch==2.14.1 because these package versions \
have conflicting dependencies.
ERROR: ResolutionImpossible: for help visit \
https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
"""


@pytest.mark.parametrize(
    ("spec", "output", "says"),
    [
        ("segment-anything==1.0", OFFLINE, "no connection to the Python package index"),
        ("torch==2.14.1", PROXY, "proxy"),
        ("torch==2.14.1", NO_WHEEL, "no release of the package fits this Python"),
        ("pynrrd>=1.0", PERMISSION, "may not write to Slicer's Python folder"),
        ("torch==2.14.1", DISK_FULL, "the disk is full"),
        ("numpy>=1.24", IN_USE, "Restart Slicer"),
        ("torch==2.14.1", CONFLICT, "conflict"),
        ("tqdm", "ERROR: something odd happened", "Read pip's output below"),
    ],
)
def test_pip_failures_are_explained_with_what_to_do_and_the_raw_tail(spec, output, says):
    message = deps.explain_failure(spec, output)
    assert message.startswith(f"Installing {spec} failed")
    assert says in message
    assert output.strip().splitlines()[-1] in message  # pip's own last line is kept


def test_missing_wheel_message_lists_the_versions_that_exist():
    message = deps.explain_failure("torch==2.14.1", NO_WHEEL)
    assert "Available here: 2.3.0, 2.3.1, 2.4.0, 2.4.1, 2.5.0, 2.5.1." in message
    assert "2.14.1 Requires-Python >=3.12" in message.split("pip output")[0]
    none = (
        "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)"
    )
    assert "The index offers none for it" in deps.explain_failure("x==1", none)


def test_failure_message_keeps_only_the_last_lines():
    output = "\n".join(f"line {i}" for i in range(100)) + "\nNo space left on device"
    message = deps.explain_failure("torch", output, tail_lines=5)
    assert "line 96" in message and "line 95" not in message


def test_slicer_gets_minimum_torch_versions_not_the_exact_pins():
    """Exact pins clash with other AI extensions' torch (slicer-review finding 11)."""
    specs = deps.for_slicer(["torch==2.14.1", "torchvision==0.29.1", "numpy>=1.24"])
    assert specs == ["torch>=2.4", "torchvision>=0.19", "numpy>=1.24"]
    newer = [
        req("torch", "torch>=2.4", "2.6.0", deps.version_matches("2.6.0", ">=2.4")),
        req("torchvision", "torchvision>=0.19", "0.21.0", True),
    ]
    assert deps.install_plan(newer, slicer_provides=set(), pytorch_utils=True).empty
    too_old = req("torch", "torch>=2.4", "2.1.2", deps.version_matches("2.1.2", ">=2.4"))
    plan = deps.install_plan([too_old], slicer_provides=set(), pytorch_utils=True)
    assert plan.torch_arguments()["torchVersionRequirement"] == ">=2.4"
