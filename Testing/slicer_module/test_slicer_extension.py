"""The extension's packaging, read from its CMake files (no Slicer build needed).

``ctkMacroCompilePythonScript`` installs only the SCRIPTS / RESOURCES it is given, and
Slicer loads every ``.py`` file of the module folder as a module (slicer-review.md,
findings 1, 9, 10), so these lists are what an installed extension holds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from RobustMedSAMLib import dependencies
from RobustMedSAMLib.names import DEFAULT_MODEL
from RobustMedSAMLib.weights import registry

ROOT = Path(__file__).resolve().parents[2]
TOP = (ROOT / "CMakeLists.txt").read_text()
MODULE_CMAKE = (ROOT / "RobustMedSAM" / "CMakeLists.txt").read_text()
MODULE = (ROOT / "RobustMedSAM" / "RobustMedSAM.py").read_text()


def cmake_list(text: str, name: str) -> list[str]:
    """The items of ``set(NAME ...)`` with ``${MODULE_NAME}`` expanded."""
    body = re.search(rf"set\({name}\s+(.*?)\)", text, re.S).group(1)
    return [item.replace("${MODULE_NAME}", "RobustMedSAM") for item in body.split()]


def tracked(pattern: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.split()


def test_licence_and_readme_are_the_extensions_own():
    """Without these UseSlicer.cmake packages Slicer's own licence and README."""
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    use = TOP.index("include(${Slicer_USE_FILE})")
    for variable, name in (
        ("EXTENSION_LICENSE_FILE", "LICENSE"),
        ("EXTENSION_README_FILE", "README.md"),
    ):
        setting = re.search(rf"set\({variable} \$\{{CMAKE_CURRENT_SOURCE_DIR\}}/{name}\)", TOP)
        assert setting and setting.start() < use, f"{variable} must be set before UseSlicer"


def test_the_shipped_model_files_are_installed_where_the_registry_looks():
    """Every registry model found in Resources/models is in the install list, which puts
    it in Resources/models beside RobustMedSAMLib (the registry's SHIPPED_MODELS_DIR)."""
    installed = cmake_list(MODULE_CMAKE, "ROBUSTMEDSAM_MODEL_FILES")
    shipped = [s for s in registry.MODELS.values() if s.architecture == "robustmedsam-lite"]
    assert shipped
    for source in shipped:
        assert f"Resources/models/{source.filename}" in installed
    assert registry.SHIPPED_MODELS_DIR == ROOT / "Resources" / "models"
    assert all((ROOT / f).is_file() for f in installed)
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources/models" in (
        MODULE_CMAKE
    )  # the library's folder, which holds RobustMedSAMLib


def test_minimum_slicer_version_is_required():
    assert re.search(r"find_package\(Slicer 5\.10 REQUIRED\)", TOP)
    assert '">=3.11"' in (ROOT / "pyproject.toml").read_text()  # Slicer 5.10: Python 3.12


def test_every_file_the_module_reads_is_installed():
    resources = cmake_list(MODULE_CMAKE, "MODULE_PYTHON_RESOURCES")
    for used in re.findall(r'resourcePath\("([^"]+)"\)', MODULE):
        assert f"Resources/{used}" in resources
    assert "Resources/Icons/RobustMedSAM.png" in resources
    assert all((ROOT / "RobustMedSAM" / r).is_file() for r in resources)
    assert "${PROJECT_SOURCE_DIR}/RobustMedSAMLib/*.py" in MODULE_CMAKE  # the whole library
    assert not [f for f in tracked("RobustMedSAMLib") if not f.endswith(".py")]


def test_only_the_module_file_is_a_python_file_in_the_module_folder():
    """Slicer loads each .py there as a module (not in subfolders); batch_segment.py
    lives in scripts/; every file of the helper package is installed."""
    files = [f.removeprefix("RobustMedSAM/") for f in tracked("RobustMedSAM/*.py")]
    assert [f for f in files if "/" not in f] == ["RobustMedSAM.py"]
    assert sorted(cmake_list(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS")) == sorted(files)


def test_the_default_model_comes_with_a_dependency_the_panel_installs():
    """No checkpoint is in the CMake install lists: the panel's default model must come
    from a package its dependency check installs into Slicer's Python."""
    default = re.search(r"model_name: Annotated\[str, Choice\(MODEL_NAMES\)\] = (\S+)", MODULE)
    name = default.group(1).strip('"')
    source = registry.MODELS[DEFAULT_MODEL if name == "DEFAULT_MODEL" else name]
    assert source.url is None and registry.LITEMEDSAM_PACKAGE in source.notes
    # RUNTIME_REQUIREMENTS equals pyproject's dependencies (test_dependencies.py)
    assert registry.LITEMEDSAM_PACKAGE in dependencies.for_slicer(dependencies.RUNTIME_REQUIREMENTS)
    assert ".pth" not in MODULE_CMAKE and ".safetensors" not in MODULE_CMAKE
