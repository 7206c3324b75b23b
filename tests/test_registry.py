"""Registry and knob validation: clear errors that name the offender."""

import dataclasses

import pytest

import tokreduce
from tokreduce import Reducer, get_reducer, list_reducers, register_reducer

EXPECTED = {
    "random",
    "uniform",
    "pool",
    "tome",
    "visionzip",
    "flowcut",
    "divprune",
    "fastv",
    "dart",
    "dycoke",
    "framefusion",
    "vidcom2",
    "evs",
    "fastvid",
    "holitom",
    "prunevid",
    "ficoco",
}


def test_every_method_is_registered():
    assert EXPECTED <= set(list_reducers())
    assert list_reducers() == sorted(list_reducers())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_get_reducer_builds_the_registered_class(name):
    reducer = get_reducer(name, keep=0.5)
    assert isinstance(reducer, Reducer)
    assert reducer.name == name and reducer.keep == 0.5


def test_aliases_point_at_the_classes():
    assert tokreduce.FastV is tokreduce.FastVReducer
    assert tokreduce.FastV(keep=0.5, layer=2).stage == "llm"


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="Unknown reducer 'nope'; available: .*divprune"):
        get_reducer("nope")


def test_unknown_knob_names_the_knob_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"fastv has no knob\(s\) \['layr'\].*layer"):
        get_reducer("fastv", layr=2)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_reducer("divprune")
        @dataclasses.dataclass
        class Other(Reducer):
            pass


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, 0, -3, True, "half", float("nan")])
def test_bad_keep_is_a_value_error_naming_keep(keep):
    with pytest.raises(ValueError, match="keep must be a fraction in \\(0, 1\\] or a count >= 1"):
        get_reducer("random", keep=keep)


@pytest.mark.parametrize(
    "name, knobs, match",
    [
        ("fastv", {"layer": 0}, "layer must be an int in"),
        ("dart", {"layer": 1.5}, "layer must be an int in"),
        ("dycoke", {"prune_ratio": 1.2}, "prune_ratio must be a number in"),
        ("framefusion", {"threshold": 2.0}, "threshold must be a number in"),
        ("pool", {"factor": 0}, "factor must be an int in"),
        ("tome", {"stage": "llm"}, "stage must be one of"),
        ("visionzip", {"dominant": 5}, "set both dominant and contextual"),
        ("random", {"positions": "shuffled"}, "positions must be one of"),
    ],
)
def test_bad_method_knobs(name, knobs, match):
    with pytest.raises(ValueError, match=match):
        get_reducer(name, **knobs)


def test_wrap_rejects_unsupported_models_with_the_supported_list():
    import torch

    class Config:
        model_type = "resnet"

    model = torch.nn.Linear(2, 2)
    model.config = Config()
    with pytest.raises(ValueError, match="does not support model_type 'resnet'.*supported"):
        tokreduce.wrap(model, "random", keep=0.5)
    with pytest.raises(ValueError, match="not wrapped"):
        tokreduce.unwrap(model)
