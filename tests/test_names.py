"""`atop.names` holds exactly the keys of the torch registries, in their order (the light copy the
refusals check names against must never drift from what a run can build)."""
from __future__ import annotations

from atop import names
from atop.attacks import ATTACKS
from atop.config import RTType
from atop.data import DATASETS
from atop.models import CLASSIFIERS, PURIFIERS
from atop.transforms import TRANSFORMS


def test_each_registry_is_keyed_by_its_names_in_order() -> None:
    assert tuple(DATASETS) == names.DATASETS
    assert tuple(CLASSIFIERS) == names.CLASSIFIERS
    assert tuple(PURIFIERS) == names.PURIFIERS
    assert tuple(ATTACKS) == names.ATTACKS
    assert tuple(TRANSFORMS) == tuple(names.RT_PARAMS) == tuple(rt.value for rt in RTType)
    assert {rt: spec.params for rt, spec in TRANSFORMS.items()} == names.RT_PARAMS
