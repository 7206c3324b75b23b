"""Vision-stage reduction (ToMe in the CLIP / SigLIP layers, VisionZip) on tiny LLaVA-family models."""

import pytest
import torch
from conftest import IMAGE_TOKEN, VIDEO_TOKEN, anyres_inputs, build, first_slots_logits, llava_inputs, single

import tokreduce
from tokreduce.adapters.compat import encoder_output
from tokreduce.adapters.tower import layer_scores

FAMILIES = ["llava", "llava_next", "llava_onevision", "llava_next_video"]
# greedy decoding that never emits placeholder ids (a random model may, and they would read as visual tokens)
GREEDY = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]}


@pytest.fixture
def models(llava_models):
    return llava_models


def inputs_for(model, seed=1):
    if model.config.model_type == "llava":
        return llava_inputs((1, 2), seed=seed)
    return anyres_inputs(model, seed=seed)


def tome(**knobs):
    return tokreduce.ToMe(stage="vision", **knobs)


def session_of(model):
    """The tokreduce session attached to ``model`` (owner of the pre-hook on the inner model)."""
    for hook in model.model._forward_pre_hooks.values():
        if hasattr(getattr(hook, "__self__", None), "records"):
            return hook.__self__
    raise AssertionError("no vision session attached")


def reduced_logits(model, ids, keep, features):
    """Logits of the prompt ``ids`` (N,) reduced to ``keep`` (N,) bool, kept tokens at their original positions,
    with ``features`` (one (K, C) tensor per image) as the image tokens."""
    return model(
        input_ids=ids[keep][None],
        attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        position_ids=torch.arange(len(ids))[keep][None],
        mm_encoder_outputs={"image": encoder_output(features)},
    ).logits


# -- identity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_identity_is_bit_identical(models, model_type):
    model = models(model_type)
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        for reducer in (tokreduce.VisionZip(keep=1.0), tome(r=0), tome(r=[0, 0], keep=1.0)):
            with reducer(model) as state:
                assert torch.equal(model(**inputs).logits, ref)
                assert torch.equal(model.generate(**inputs, max_new_tokens=3, **GREEDY), ref_gen)
            assert all(len(s.index) == s.num_tokens for row in state.selections for s in row)


# -- VisionZip scores -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llava", "llava_onevision"])  # CLIP (CLS row) and SigLIP (column sums)
def test_scores_equal_eager_attention(models, model_type):
    model = models(model_type, attn="eager")
    tower = model.model.vision_tower
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        for i, layer in enumerate(tower.encoder.layers):
            scores, metric = layer_scores(layer, out.hidden_states[i], has_cls=model_type == "llava")
            attn = out.attentions[i].float()  # (R, H, T, T)
            want = attn[:, :, 0].sum(1) if model_type == "llava" else attn.sum(2).mean(1)
            torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
            keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[i]))
            torch.testing.assert_close(metric, keys.view(3, keys.shape[1], 4, -1).mean(2), atol=1e-6, rtol=1e-6)
        # scoring in chunks of crops gives the same numbers
        small = layer_scores(tower.encoder.layers[1], out.hidden_states[1], model_type == "llava", budget=1)
        torch.testing.assert_close(
            small[0], layer_scores(tower.encoder.layers[1], out.hidden_states[1], model_type == "llava")[0]
        )


def test_anyres_rows_are_the_crops_in_the_tower(models):
    """llava_next: one recorded row per crop (feature-layer states incl. CLS, scores from the CLS row), and the
    image's rows are its base view alone, then its 1 x 2 crops stitched."""
    model = models("llava_next", attn="eager")
    inputs = anyres_inputs(model, seed=2)
    with torch.no_grad():
        crops = inputs["pixel_values"][0]
        out = model.model.vision_tower(crops, output_hidden_states=True, output_attentions=True)
        with tokreduce.VisionZip(keep=0.5)(model):
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            record = session_of(model).records["image"]
    torch.testing.assert_close(record.hidden, out.hidden_states[-2])
    torch.testing.assert_close(record.scores[:, 1:], out.attentions[1][:, :, 0, 1:].sum(1), atol=1e-5, rtol=1e-5)
    (plan,) = record.plans
    assert [(g.rows, g.stitch) for g in plan.groups] == [(1, None), (2, (1, 2))] and plan.newline is None


# -- VisionZip on llava: the paper's path, against a hand-built reference -----------------------------------
def test_visionzip_llava_matches_hand_built_reference(models):
    """Eager tower -> VisionZip by hand ([CLS, dominant - 1 patches, contextual]) -> projector -> the first slots
    of each image's placeholder run -> the language model's logits."""
    model, eager = models("llava"), models("llava", attn="eager")
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    dominant, contextual = 5, 2
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[-2]  # (2, 17, C): the feature layer (encoder layer 1) incl. CLS
        cls_attention = out.attentions[1][:, :, 0, 1:].sum(1)  # (2, 16)
        layer = eager.model.vision_tower.encoder.layers[1]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[1]))
        metric = keys.view(2, 17, 4, -1).mean(2)[:, 1:]
        patches = tokreduce.functional.visionzip(hidden[:, 1:], cls_attention, metric, dominant - 1, contextual)
        projected = model.model.multi_modal_projector(torch.cat([hidden[:, :1], patches], 1))  # [CLS, dom, ctx]
        # the reference's tokens fill the first slots of the run, in order
        ref = first_slots_logits(model, inputs["input_ids"][0], dominant + contextual, projected)
        with tokreduce.VisionZip(dominant=dominant, contextual=contextual)(model) as state:
            got = model(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert state.stats.tokens_out == [2 * (dominant + contextual)]  # the CLS token counts
    for j, s in enumerate(state.selections[0]):
        assert s.stage == "vision" and s.grid == (1, 4, 4) and len(s.index) == dominant + contextual - 1
        assert (s.assign >= 0).all() and torch.equal(s.assign[s.index], torch.arange(len(s.index)))
        assert set(cls_attention[j].topk(dominant - 1).indices.tolist()) <= set(s.index.tolist())


def test_visionzip_llava_keep_cls_false_keeps_dominant_patches(models):
    """keep_cls=False: the CLS token is not a candidate; the dominant patches are the top by CLS attention."""
    model, eager = models("llava"), models("llava", attn="eager")
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    dominant, contextual = 5, 2
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        cls_attention = out.attentions[1][:, :, 0, 1:].sum(1)  # (2, 16), the feature layer's CLS row
        with tokreduce.VisionZip(dominant=dominant, contextual=contextual, keep_cls=False)(model) as state:
            model(**inputs)
    assert state.stats.tokens_out == [2 * (dominant + contextual)]
    for j, s in enumerate(state.selections[0]):
        assert len(s.index) == dominant + contextual
        top = set(cls_attention[j].topk(dominant).indices.tolist())
        assert top <= set(s.index.tolist())
    with pytest.raises(ValueError, match="keep_cls"):
        tokreduce.VisionZip(keep=0.5, keep_cls="no")


# -- ToMe on llava ----------------------------------------------------------------------------------------
def test_tome_counts_follow_the_schedule(models):
    model = models("llava")
    inputs = llava_inputs((1, 2), seed=4)
    with torch.no_grad():
        for knobs, schedule in (({"r": 2}, [2, 2]), ({"r": [3, 1]}, [3, 1]), ({"keep": 6}, [5, 5])):
            with tome(**knobs)(model) as state:
                logits = model(**inputs).logits
            kept = 16 - sum(schedule)
            assert state.extra["schedule"] == schedule
            assert state.extra["tokens_per_layer"] == [17 - sum(schedule[: i + 1]) for i in range(2)]
            assert torch.equal(state.extra["size"].sum(1).squeeze(-1), torch.full((3,), 17.0))  # CLS + 16 patches
            assert state.stats.tokens_out == [kept, 2 * kept] and logits.shape[1] < inputs["input_ids"].shape[1]
            for s in (s for row in state.selections for s in row):
                assert len(s.index) == kept and torch.equal(s.index, s.index.sort().values)
                sizes = torch.bincount(s.assign, minlength=kept)
                assert len(sizes) == kept and (sizes > 0).all() and int(sizes.sum()) == 16
                assert torch.equal(s.assign[s.index], torch.arange(kept))  # a group holds its representative


def test_tome_merging_identical_patches_is_the_identity():
    """Constant pixels and no position embeddings: all patches are equal, so merging them (with proportional
    attention) must not change any patch's feature."""
    model = build("llava", seed=5)
    model.model.vision_tower.embeddings.position_embedding.weight.data.zero_()
    pixels = torch.full((2, 3, 28, 28), 0.3)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixels).pooler_output
        with tome(r=3)(model):
            got = model.model.get_image_features(pixel_values=pixels).pooler_output
            assert session_of(model).records["image"].merged.num_kept == 17 - 6
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- MustDrop on llava ------------------------------------------------------------------------------------
def test_mustdrop_merges_tiles_after_the_first_layer(models):
    """Wrapped logits == a hand-run tower (layer 0, MustDrop's tile merge on its output, layer 1 = the feature
    layer, plain attention), projected patches in index order, fed with the kept placeholders' positions."""
    model = models("llava")
    inputs = single(llava_inputs((2,), seed=4), 0, [2])
    reducer = tokreduce.MustDrop(keep=0.5)  # 4 x 4 patches: the one full 3 x 3 tile merges, 8 patches left
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))
        hidden = tower.encoder.layers[0](hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        selection, _ = reducer.block_match(hidden, 8, 1)  # outputs in index order: CLS first
        hidden = tower.encoder.layers[1](selection.merge(hidden), None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        feats = model.model.multi_modal_projector(hidden[:, 1:])
        ids = inputs["input_ids"][0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        starts = (ids == IMAGE_TOKEN).nonzero().squeeze(-1).view(2, 16)[:, 0]
        for j, start in enumerate(starts):
            drop = torch.ones(16, dtype=torch.bool)
            drop[selection.index[j, 1:] - 1] = False
            keep[start + torch.arange(16)[drop]] = False
        ref = reduced_logits(model, ids, keep, list(feats))
        with reducer(model) as state:
            out = model(**inputs).logits
    assert state.extra["schedule"] == [8, 0] and state.extra["tokens_per_layer"] == [9, 9]
    assert [s.index.tolist() for s in state.selections[0]] == (selection.index[:, 1:] - 1).tolist()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# -- batching, generate, hygiene --------------------------------------------------------------------------
REDUCERS = {
    "visionzip": lambda: tokreduce.VisionZip(keep=0.4),
    "tome": lambda: tome(r=2),
    "pitome": lambda: tokreduce.PiToMe(ratio=0.8, stage="vision"),
    "ficoco": lambda: tokreduce.FiCoCo(keep=0.4),
    "flowcut": lambda: tokreduce.FlowCut(keep=0.4),
    "mustdrop": lambda: tokreduce.MustDrop(keep=0.5),
}


def merges(s):
    return None if s.assign is None else s.assign.tolist()


@pytest.mark.parametrize("name", REDUCERS)
def test_ragged_batch_equals_single_runs(models, name):
    model = models("llava")
    counts = (1, 3, 2)
    inputs = llava_inputs(counts, seed=5)
    with torch.no_grad(), REDUCERS[name]()(model) as state:
        batched = model.generate(**inputs, max_new_tokens=4, **GREEDY)
        batch_sel = [[(s.index.tolist(), merges(s)) for s in row] for row in state.selections]
        for i in range(len(counts)):
            alone = model.generate(**single(inputs, i, counts), max_new_tokens=4, **GREEDY)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert [(s.index.tolist(), merges(s)) for s in state.selections[0]] == batch_sel[i]


@pytest.mark.parametrize(
    "model_type,name",
    [
        ("llava", "visionzip"),
        ("llava", "tome"),
        ("llava", "pitome"),
        ("llava_onevision", "visionzip"),
        ("llava_onevision", "ficoco"),
        ("llava", "flowcut"),
        ("llava_next", "flowcut"),
        ("llava", "mustdrop"),
    ],
)
def test_cached_decode_matches_recomputation(models, model_type, name):
    """Cached decode == a no-cache forward over prompt + generated tokens, under both position policies."""
    model = models(model_type)
    inputs = inputs_for(model, seed=7)
    b = inputs["input_ids"].shape[0]
    for policy in ("original", "compact"):
        reducer = REDUCERS[name]()
        reducer.positions = policy
        with torch.no_grad(), reducer(model) as state:
            gen = model.generate(**inputs, max_new_tokens=4, output_logits=True, return_dict_in_generate=True, **GREEDY)
            selections = [[s.index.tolist() for s in row] for row in state.selections]
            full = torch.cat([inputs["attention_mask"], torch.ones(b, 4, dtype=torch.long)], 1)
            again = model(
                **{**inputs, "input_ids": gen.sequences, "attention_mask": full},
                position_ids=(full.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
            ).logits
            assert [[s.index.tolist() for s in row] for row in state.selections] == selections
        assert sum(state.stats.tokens_out) < sum(state.stats.tokens_in)
        torch.testing.assert_close(gen.logits[-1], again[:, -2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "llava_next_video"])
def test_visionzip_on_anyres_and_video_families(models, model_type):
    """Every crop / frame reduced in the tower to its share of the item's budget; forward and generate() agree."""
    model = models(model_type)
    inputs = anyres_inputs(model, seed=1)
    layouts = tokreduce.adapters.get_adapter(model).layouts(model.model, inputs)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokreduce.VisionZip(keep=0.5)(model) as state:
            out = model(**inputs).logits
            forward = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
            model.generate(**inputs, max_new_tokens=2, **GREEDY)
            generated = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
    assert forward == generated
    spans = state.selections[0]
    assert {s.modality for s in spans} == ({"image"} if model_type == "llava_next" else {"image", "video"})
    cls = 0 if model_type == "llava_onevision" else 1  # a kept CLS token is not among the listed patches
    for modality, rows in (("image", 3), ("video", 4)):  # 1 base view + 1 x 2 crops; 4 frames
        if modality not in layouts:
            continue
        n = sum(p.num_tokens for p in layouts[modality][0].pieces)
        per_row = tokreduce.functional.budget(n, 0.5) // rows
        mine = [s for s in spans if s.modality == modality]
        assert sum(len(s.index) for s in mine) == rows * (per_row - cls)
    for s in spans:
        assert s.stage == "vision" and s.grid[1:] in ((4, 4), (4, 8))  # the tower's grids, not the layout's
        assert s.assign is None or (s.assign >= 0).all()  # 2 tokens a frame are both dominant: no merge
    assert out.shape[1] == ref.shape[1] - (sum(state.stats.tokens_in) - sum(state.stats.tokens_out))


@pytest.mark.parametrize(
    "model_type,name",
    [
        ("llava", "visionzip"),
        ("llava", "tome"),
        ("llava", "pitome"),
        ("llava_onevision", "visionzip"),
        ("llava_next", "flowcut"),
        ("llava", "mustdrop"),
    ],
)
def test_hooks_removed_after_exit_and_unwrap(models, model_type, name):
    model = models(model_type)
    inputs = inputs_for(model)

    def patched():
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        overrides = sum(
            k in m.__dict__ for m in model.modules() for k in ("forward", "get_image_features", "get_video_features")
        )
        return hooks, overrides

    with torch.no_grad():
        ref = model(**inputs).logits
        before = patched()
        with REDUCERS[name]()(model):
            assert patched() > before
            assert model(**inputs).logits.shape[1] < ref.shape[1]
        assert patched() == before
        assert torch.equal(model(**inputs).logits, ref)
        tokreduce.wrap(model, REDUCERS[name]())
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        tokreduce.unwrap(model)
        assert patched() == before
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("model_type", ["llava_next", "llava_next_video"])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_flowcut_prunes_every_crop_and_frame_in_the_tower(models, model_type, keep):
    """Every crop / frame pruned in the tower to its share of its patches; forward and generate() agree."""
    model = models(model_type)
    inputs = anyres_inputs(model, seed=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokreduce.FlowCut(keep=keep)(model) as state:
            out = model(**inputs).logits
            forward = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
            gen = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
            generated = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
    assert forward == generated
    removed = sum(state.stats.tokens_in) - sum(state.stats.tokens_out)
    assert gen.past_key_values.get_seq_length() == inputs["input_ids"].shape[1] - removed + 1  # the smaller cache
    layouts = tokreduce.adapters.get_adapter(model).layouts(model.model, inputs)
    for modality, rows in (("image", 3), ("video", 4)):  # 1 base view + 1 x 2 crops; 4 frames
        if modality in layouts:
            n = sum(p.num_tokens for p in layouts[modality][0].pieces)
            mine = [s for s in state.selections[0] if s.modality == modality]
            assert sum(len(s.index) for s in mine) == rows * (tokreduce.functional.budget(n, keep) // rows)
    assert all(s.stage == "vision" and s.assign is None for s in state.selections[0])
    assert out.shape[1] == ref.shape[1] - (sum(state.stats.tokens_in) - sum(state.stats.tokens_out))
    first, feature = state.extra["tokens_per_layer"]  # 3 layers, features from layer 1: pruned after layer 0
    assert first == feature < 17


def test_flowcut_needs_a_cls_token(models):
    model = models("llava_onevision")
    with pytest.raises(ValueError, match="flowcut.*llava_onevision.*no CLS token"):
        with tokreduce.FlowCut(keep=0.5)(model):
            pass
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left behind


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "llava_next_video"])
@pytest.mark.parametrize(
    "merge",
    [lambda: tome(r=2), lambda: tokreduce.PiToMe(ratio=0.8, stage="vision"), lambda: tokreduce.MustDrop(keep=0.5)],
)
def test_tome_in_the_tower_is_refused_for_anyres_and_video(models, model_type, merge):
    model = models(model_type)
    reducer = merge()
    with pytest.raises(ValueError, match=f"{reducer.name}.*{model_type}.*stage='pre_llm'"):
        with reducer(model):
            pass
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left behind


def test_bad_requests_are_refused(models):
    model = models("llava")
    inputs = llava_inputs((1,))
    with pytest.raises(ValueError, match="one entry per layer"):
        with tome(r=[1, 1, 1])(model):
            pass
    with pytest.raises(ValueError, match="not both"):
        with tome(r=1, keep=0.5)(model):
            pass
    with pytest.raises(ValueError, match="visionzip layer"):
        with tokreduce.VisionZip(keep=0.5, layer=7)(model):
            pass
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        given = {k: v for k, v in inputs.items() if k != "pixel_values"}
        with tokreduce.VisionZip(keep=0.5)(model), pytest.raises(ValueError, match="pixel"):
            model(**given, mm_encoder_outputs={"image": feats})
        with tokreduce.VisionZip(keep=0.5)(model), pytest.raises(ValueError, match="vision_feature_layer"):
            model(**inputs, vision_feature_layer=-1)
    multi = build("llava")
    multi.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        with tokreduce.VisionZip(keep=0.5)(multi):
            pass


# -- budget edge cases -----------------------------------------------------------------------------------
def test_budget_edge_cases(models):
    model = models("llava")
    inputs = llava_inputs((1, 2), seed=8)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokreduce.VisionZip(keep=1)(model) as state:  # k = 1: the CLS token alone stands for the image
            model(**inputs)
        assert state.stats.tokens_out == [1, 2] and all(len(s.index) == 0 for row in state.selections for s in row)
        with tokreduce.VisionZip(dominant=16, contextual=3)(model) as state:  # k = N (clamped): nothing changes
            assert torch.equal(model(**inputs).logits, ref)
        with tome(r=100)(model) as state:  # ToMe halves at most per layer: 17 -> 9 -> 5 (CLS protected)
            model(**inputs)
        assert state.extra["schedule"] == [8, 4] and state.stats.tokens_out == [4, 8]
    onevision = models("llava_onevision")
    inputs = anyres_inputs(onevision, seed=8)
    with torch.no_grad(), tokreduce.VisionZip(keep=1)(onevision) as state:
        onevision(**inputs)
    assert [len(s.index) for s in state.selections[0]] == [1, 2, 4]  # one per crop / frame, at least


@pytest.mark.parametrize("model_type", ["llava", "llava_onevision"])
def test_generate_when_every_span_stays_whole(models, model_type):
    """keep=0.99 leaves every 16-token grid whole: generate() must run unchanged (the pixels reach the forward)."""
    model = models(model_type)
    inputs = inputs_for(model, seed=10)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        with tokreduce.VisionZip(keep=0.99)(model) as state:
            out = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    assert torch.equal(out, ref) and state.stats.tokens_out == state.stats.tokens_in


@pytest.mark.parametrize("name", REDUCERS)
def test_beam_search_reduces_every_beam_alike(models, name):
    model = models("llava")
    inputs = llava_inputs((1,), seed=9)
    with torch.no_grad(), REDUCERS[name]()(model) as state:
        out = model.generate(**inputs, max_new_tokens=2, num_beams=2, **GREEDY)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)
    beams = [[s.index.tolist() for s in row] for row in state.selections]
    assert len(beams) == 2 and beams[0] == beams[1] and state.stats.tokens_out[0] < 16
