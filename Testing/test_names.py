"""One vocabulary: the registries and option checks use exactly the names in names.py."""

from __future__ import annotations

import pytest

from RobustMedSAMLib import names
from RobustMedSAMLib.corruptions import CORRUPTIONS
from RobustMedSAMLib.device import select_device
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.weights.registry import model_names


def test_registries_name_what_names_lists():
    assert set(model_names()) == set(names.MODEL_NAMES)
    assert names.DEFAULT_MODEL in names.MODEL_NAMES
    assert tuple(CORRUPTIONS) == names.CORRUPTION_NAMES


def test_every_listed_projection_and_overlap_is_accepted():
    for projection in names.PROJECTIONS:
        for overlap in names.OVERLAP_MEASURES:
            PropagationOptions(projection=projection, overlap=overlap).validate()
    with pytest.raises(InputError, match="unknown projection"):
        PropagationOptions(projection="lasso").validate()


def test_an_unlisted_device_is_refused():
    assert select_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        select_device("tpu")
