"""HoliTom on tiny video models: the pre-LLM merge, then the similarity merge inside the LLM, with generate.

The two-stage reference is built by hand: the pre-LLM selection on the video features, the language model's input
checked against it, layer K-1's eager attention of the last prompt token and the hidden states entering layer K
choosing and merging, then a no-cache forward of the reduced prompt (at layer K the kept tokens take their merged
states, the others go) for every decode step, against generate's cached decode. Ragged batches and the final budget
of images and videos: test_prunevid_models.py (``TWO_STAGE``).
"""

import pytest
import torch
from conftest import (
    QWEN_GREEDY,
    QWEN_VIDEO,
    build_qwen,
    qwen_inputs,
)
from test_prunevid_models import STEPS, generate_after_pre_llm, lm_call, video_case

import tokreduce
from tokreduce.adapters.compat import output_cache
from tokreduce.flops import recorded_lengths
from tokreduce.functional import budget, holitom_llm_merge

K = 2  # the merge at the input of decoder layer K (tiny models have 4 layers; the reference's 18 of 28)


def assert_cached_decode_is_merged_forward(model, gen, embeds, pos, video, later):
    """generate's logits at every step == :func:`merged_forward` of the reduced prompt and the tokens generated so far
    (each new token one position after the last)."""
    lm = model.model.language_model
    tokens = gen.sequences[0, -STEPS:].tolist()
    for step in range(STEPS):
        new = torch.tensor([tokens[:step]], dtype=torch.long)
        step_pos = torch.cat([pos, pos[..., -1:] + 1 + torch.arange(step)], -1)
        with torch.no_grad():
            hidden = merged_forward(lm, torch.cat([embeds, lm.embed_tokens(new)], 1), step_pos, video, later)
            logits = model.lm_head(hidden)[0, -1]
        torch.testing.assert_close(gen.logits[step][0], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llava_onevision", "llava_next_video"])
def test_generate_matches_two_stage_reference(model_type):
    model, eager, inputs, start, grid = video_case(model_type)
    n = grid[0] * grid[1] * grid[2]
    reducer = tokreduce.get_reducer("holitom", keep=0.25, layer=K)
    earlier, embeds, pos, _, video, gen, state = generate_after_pre_llm(model, inputs, start, grid, reducer)
    assert earlier.num_kept == budget(n, 0.5)  # keep / (1 - r) before the LLM

    with torch.no_grad():
        out = eager.model.language_model(
            inputs_embeds=embeds, position_ids=pos, output_attentions=True, output_hidden_states=True
        )
    scores = out.attentions[K - 1][0].mean(0)[-1, video]  # the last prompt token, mean over heads
    later = holitom_llm_merge(out.hidden_states[K][:, video], scores[None], budget(n, 0.25))
    assert later.assign is not None and bool((later.assign >= 0).all())  # every pruned token merged
    (record,) = state.selections[0]
    assert record.stage == "llm" and record.index.tolist() == earlier.index[0, later.index[0]].tolist()
    assert state.stats.tokens_out == [budget(n, 0.25)]

    assert_cached_decode_is_merged_forward(model, gen, embeds, pos, video, later)
    lengths = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
    removed = video.numel() - later.num_kept
    assert lengths[K:] == [lengths[0] - removed] * (len(lengths) - K)
    prompt = embeds.shape[1]
    assert recorded_lengths(reducer, state) == [[prompt] * K + [prompt - removed] * (len(lengths) - K)]


def merged_forward(lm, embeds, pos, video, later):
    """Last hidden states of a no-cache forward of the language model (positions ``pos`` (1, L), or (4, 1, L)) in which
    layer K's input gets ``later``'s merge of the video tokens (1-D positions ``video``) and loses the merged-away
    ones; layers >= K see only what is left (their masks and rotary embeddings cut alike)."""
    live = torch.ones(embeds.shape[1], dtype=torch.bool)
    live[video] = False
    live[video[later.index[0]]] = True
    rows = live.nonzero().squeeze(-1)

    def cut_kwargs(module, args, kwargs):
        kw = dict(kwargs)
        kw["position_embeddings"] = tuple(x.index_select(-2, rows) for x in kw["position_embeddings"])
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"].index_select(-1, rows)
        if isinstance(kw.get("attention_mask"), torch.Tensor):
            kw["attention_mask"] = kw["attention_mask"].index_select(-1, rows).index_select(-2, rows)
        return args, kw

    def merge_and_cut(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, video[later.index[0]]] = later.merge(h[:, video])
        args, kw = cut_kwargs(module, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return (h[:, rows], *args), kw

    hooks = [
        layer.register_forward_pre_hook(merge_and_cut if i == K else cut_kwargs, with_kwargs=True)
        for i, layer in enumerate(lm.layers)
        if i >= K
    ]
    try:
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long)  # no mask would read the position gaps as packing
        return lm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()


def test_qwen2_vl_video_generate_matches_merged_no_cache_forward(qwen_models):
    model = qwen_models("qwen2_vl")
    eager = build_qwen("qwen2_vl", attn="eager")
    eager.load_state_dict(model.state_dict())
    inputs = qwen_inputs("qwen2_vl", [[("video", (8, 4, 4))]], seed=4)
    reducer = tokreduce.get_reducer("holitom", keep=0.25, layer=K)
    seen, ids, (gen, state) = lm_call(
        model, inputs, reducer, max_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True, **QWEN_GREEDY
    )
    embeds, pos = seen["inputs_embeds"], seen["position_ids"]  # after the pre-LLM stage; pos (4, 1, L)
    video = (ids[0] == QWEN_VIDEO).nonzero().squeeze(-1)
    (record,) = state.selections[0]
    assert video.numel() == budget(record.num_tokens, 0.5) and len(record.index) == budget(record.num_tokens, 0.25)
    with torch.no_grad():
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
        out = eager.model.language_model(
            inputs_embeds=embeds,
            position_ids=pos,
            attention_mask=mask,
            output_attentions=True,
            output_hidden_states=True,
        )
    scores = out.attentions[K - 1][0].mean(0)[-1, video]
    later = holitom_llm_merge(out.hidden_states[K][:, video], scores[None], len(record.index))
    assert_cached_decode_is_merged_forward(model, gen, embeds, pos, video, later)


def test_layer_must_fit_the_model(llava):
    with pytest.raises(ValueError, match=r"holitom: layer must be in \[1, 3\] for this model, got 18"):
        with tokreduce.get_reducer("holitom", keep=0.25)(llava):
            pass
    with tokreduce.get_reducer("holitom", keep=0.25, r=0.0)(llava):  # no LLM stage: any depth
        pass
