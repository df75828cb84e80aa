"""Modules moved into packages still import under their old names for one release,
with a DeprecationWarning that names the new home."""

from __future__ import annotations

import importlib
import sys

import pytest

from RobustMedSAMLib import MOVED_MODULES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_name_warns_and_gives_the_new_module(old):
    name = f"RobustMedSAMLib.{old}"
    sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match=MOVED_MODULES[old].replace(".", r"\.")):
        shim = importlib.import_module(name)
    new = importlib.import_module(f"RobustMedSAMLib.{MOVED_MODULES[old]}")
    public = [n for n in vars(new) if not n.startswith("_")]
    assert public and all(getattr(shim, n) is getattr(new, n) for n in public)


def test_the_readme_example_import_still_works():
    sys.modules.pop("RobustMedSAMLib.volume", None)
    with pytest.warns(DeprecationWarning):
        from RobustMedSAMLib.volume import read_volume
    from RobustMedSAMLib.formats.volume import read_volume as current

    assert read_volume is current
