"""transformers version drift: names come from one module, and hooks that stop firing raise instead of no-op.

The drifts are simulated on tiny LLaVA and Qwen2-VL models: a cache that arrives under a name the hooks do
not know, a cache the hooks cannot see at all (a decode step then looks like a new prompt), and pixels under a
renamed argument (a prefill with visual tokens then records no selection).
"""

import functools
import inspect
import warnings

import pytest
import torch
from conftest import QWEN_GREEDY, build, build_qwen, llava_inputs, qwen_inputs, single

import tokreduce
from tokreduce.adapters import compat, get_adapter

ITEMS = [("image", (1, 4, 8)), ("video", (4, 4, 4))]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {"llava": build("llava"), "qwen2_vl": build_qwen("qwen2_vl")}


def case(models, family):
    """(model, inputs, greedy generate kwargs) of one family."""
    if family == "llava":
        return models["llava"], single(llava_inputs((2,), seed=4), 0, [2]), {"do_sample": False}
    return models["qwen2_vl"], qwen_inputs("qwen2_vl", [ITEMS], seed=4), QWEN_GREEDY


def test_cache_name_is_the_one_this_transformers_takes():
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    name = compat.cache_name()
    other = {"cache", "past_key_values"} - {name}
    for fn in (create_causal_mask, LlamaDecoderLayer.forward, LlamaModel.forward, Qwen2VLModel.forward):
        params = inspect.signature(fn).parameters
        assert name in params and not other & set(params), fn.__qualname__


def test_installed_version_is_in_the_tested_range_and_pyproject_agrees():
    from pathlib import Path

    version = compat._parse(compat.installed_version())
    assert compat._parse(compat.OLDEST_TESTED) <= version < compat._parse(compat.BELOW)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"transformers{compat.SUPPORTED}"' in pyproject


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["divprune", "fastv", "dycoke"])
def test_no_future_warning_from_tokreduce_calls(models, family, method):
    model, inputs, greedy = case(models, family)
    knobs = {"keep": 0.5, "layer": 2} if method == "fastv" else {"keep": 0.5}
    if method == "dycoke":
        knobs.update(prune_layer=2, threshold=1.0)  # re-selects at every decode step
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with tokreduce.get_reducer(method, **knobs)(model) as state:
            model.generate(**inputs, max_new_tokens=3, **greedy)
    assert state.stats.tokens_out[0] < state.stats.tokens_in[0] or method == "dycoke"
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_version_outside_the_tested_range_warns_once_at_wrap(models, family, monkeypatch):
    model, _, _ = case(models, family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tokreduce.DivPrune(keep=0.5)(model):
            pass
    assert not [w for w in caught if "tested with transformers" in str(w.message)]
    for version in ("5.25.0", "4.57.1", "6.0.0.dev0"):
        monkeypatch.setattr(compat, "installed_version", lambda version=version: version)
        with pytest.warns(UserWarning, match=rf"{compat.SUPPORTED}; {version} is installed") as record:
            with tokreduce.DivPrune(keep=0.5)(model):
                pass
        assert len([w for w in record if "tested with transformers" in str(w.message)]) == 1


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_forward_without_the_cache_argument_is_refused_at_wrap(models, family, monkeypatch):
    model, _, _ = case(models, family)
    monkeypatch.setattr(compat, "cache_name", lambda: "kv_store")
    with pytest.raises(RuntimeError, match=r"takes no 'kv_store'.*5\.23\.0,<5\.25"):
        with tokreduce.DivPrune(keep=0.5)(model):
            pass
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks  # nothing left attached


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_cache_under_an_unknown_name_raises_at_prefill(models, family, method, monkeypatch):
    """transformers renamed the cache argument again: generate's very first call must fail, not run unreduced."""
    model, inputs, greedy = case(models, family)
    knobs = {"keep": 0.5, "layer": 2} if method == "fastv" else {"keep": 0.5}
    version = compat.installed_version()
    with torch.no_grad(), tokreduce.get_reducer(method, **knobs)(model):
        monkeypatch.setattr(compat, "cache_name", lambda: "kv_store")  # what the hooks believe after the rename
        with pytest.raises(RuntimeError, match=rf"arrived as '(cache|past_key_values)'.*{version}.*5\.23\.0,<5\.25"):
            model.generate(**inputs, max_new_tokens=3, **greedy)
        with pytest.raises(RuntimeError, match="arrived as"):  # a plain forward: the output's cache gives it away
            model(**inputs, use_cache=True)


def hide_cache_from_hooks(model):
    """A release that hands the cache to the inner model some other way than as an argument of its call."""
    name, inner, stash = compat.cache_name(), model.model, {}
    outer_forward, inner_forward = model.forward, inner.forward

    @functools.wraps(outer_forward)
    def outer(*args, **kwargs):
        stash["cache"] = kwargs.pop(name, None)
        return outer_forward(*args, **kwargs)

    @functools.wraps(inner_forward)
    def forward(*args, **kwargs):
        kwargs[name] = stash.get("cache") if kwargs.get(name) is None else kwargs[name]
        return inner_forward(*args, **kwargs)

    model.forward, inner.forward = outer, forward

    def restore():
        del model.forward, inner.forward

    return restore


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_decode_step_taken_for_a_new_prompt_raises(models, family, method):
    model, inputs, greedy = case(models, family)
    knobs = {"keep": 0.5, "layer": 2} if method == "fastv" else {"keep": 0.5}
    with torch.no_grad(), tokreduce.get_reducer(method, **knobs)(model):
        restore = hide_cache_from_hooks(model)
        try:
            with pytest.raises(RuntimeError, match=r"decode step.*5\.23\.0,<5\.25"):
                model.generate(**inputs, max_new_tokens=3, **greedy)
        finally:
            restore()
        model.generate(**inputs, max_new_tokens=3, **greedy)  # the same model, hooks intact, works again


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_prefill_with_visual_tokens_but_no_selection_raises(models, family, method, monkeypatch):
    """The pixels arrive under a name the adapter does not know: the hooks find nothing to reduce."""
    model, inputs, _ = case(models, family)
    adapter = get_adapter(model)
    knobs = {"keep": 0.5, "layer": 2} if method == "fastv" else {"keep": 0.5}
    with torch.no_grad(), tokreduce.get_reducer(method, **knobs)(model):
        monkeypatch.setattr(type(adapter), "vision_inputs", lambda self: ("pixels",))
        with pytest.raises(RuntimeError, match=r"samples \[0\] hold visual tokens but no .* selection"):
            model(**inputs)


def test_identity_reducer_and_text_only_calls_pass_the_checks(models):
    model, inputs, greedy = case(models, "llava")
    text = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5]}
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, **greedy)
        with tokreduce.DivPrune(keep=1.0)(model) as state:
            same = model.generate(**inputs, max_new_tokens=3, **greedy)
            model.generate(**text, max_new_tokens=2, **greedy)  # no visual tokens: nothing to check
    assert torch.equal(plain, same) and state.selections == [[]]
