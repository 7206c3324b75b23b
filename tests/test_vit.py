"""ToMe and VisionZip inside plain ViTs: timm VisionTransformer and open_clip vision towers (random weights)."""

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tokreduce
from tokreduce.adapters.vit_common import source_matrix

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

DTYPES = [torch.float32, torch.bfloat16]


# -- tiny models ----------------------------------------------------------------------------------------


def _timm(**kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": 96, "depth": 4, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def _open_clip_tower(**kwargs):
    """A small open_clip VisionTransformer (ResidualAttentionBlock with nn.MultiheadAttention by default)."""
    torch.manual_seed(0)
    kwargs = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 3, "heads": 4, "mlp_ratio": 2.0,
              "output_dim": 32, **kwargs}  # fmt: skip
    return open_clip.transformer.VisionTransformer(**kwargs).eval()


@pytest.fixture(scope="module")
def clip_b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


@pytest.fixture(scope="module")
def models(clip_b32):
    """name -> (model, images, forward, tokens in, prefix tokens, blocks) in fp32 and bf16."""
    torch.manual_seed(0)
    vit = _timm()
    out = {}
    for dtype in DTYPES:
        suffix = "" if dtype is torch.float32 else "-bf16"
        m = copy.deepcopy(vit).to(dtype)
        out["timm" + suffix] = (m, torch.randn(2, 3, 96, 96).to(dtype), m, 37, 1, m.blocks)
        c = copy.deepcopy(clip_b32).to(dtype) if dtype is not torch.float32 else clip_b32
        out["open_clip" + suffix] = (c, torch.randn(2, 3, 224, 224).to(dtype), c.encode_image, 50, 1,
                                     c.visual.transformer.resblocks)  # fmt: skip
    return out


MODELS = ["timm", "timm-bf16", "open_clip", "open_clip-bf16"]


def expected_counts(n: int, schedule: list[int], protected: int) -> list[int]:
    counts = []
    for r in schedule:
        n -= max(0, min(r, (n - protected) // 2))
        counts.append(n)
    return counts


def hook_snapshot(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
            for name, m in model.named_modules()}  # fmt: skip


# -- ToMe ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("r", [3, "list"])
def test_tome_counts_follow_schedule(models, name, r):
    model, images, forward, n, p, blocks = models[name]
    r = [5, 0, 2, 7] * (len(blocks) // 4) if r == "list" else r
    schedule = r if isinstance(r, list) else [r] * len(blocks)
    with torch.no_grad():
        reference = forward(images)
        with tokreduce.ToMe(r=r)(model) as state:
            out = forward(images)
    counts = expected_counts(n, schedule, p)
    assert state.extra["tokens_per_layer"] == counts
    assert state.stats.tokens_in == [n - p] * 2 and state.stats.tokens_out == [counts[-1] - p] * 2
    assert out.shape == reference.shape and out.dtype == reference.dtype
    size, source = state.extra["size"], state.extra["source"]
    assert size.shape == (2, counts[-1], 1) and torch.equal(size.sum(dim=(1, 2)), torch.full((2,), float(n)))
    assert torch.equal(source_matrix(source, counts[-1]).sum(-1, keepdim=True).float(), size)
    span = state.selections[1][0]
    assert span.stage == "vision" and span.num_tokens == n - p and len(span.index) == counts[-1] - p
    assert torch.equal(span.index, span.index.sort().values)


@pytest.mark.parametrize("name", MODELS)
def test_tome_r0_bit_identical_and_unwrap_exact(models, name):
    model, images, forward, _, _, _ = models[name]
    before = hook_snapshot(model)
    with torch.no_grad():
        reference = forward(images)
        tokreduce.wrap(model, "tome", r=0)
        assert torch.equal(forward(images), reference)
        tokreduce.unwrap(model)
        tokreduce.wrap(model, "tome", r=4)
        assert not torch.equal(forward(images), reference)
        tokreduce.unwrap(model)
        assert torch.equal(forward(images), reference)
    assert hook_snapshot(model) == before
    assert "_tokreduce_scope" not in model.__dict__ and "_tokreduce_attached" not in model.__dict__


def test_tome_restores_blocks_on_error(models):
    model, images, forward, _, _, blocks = models["timm"]
    with pytest.raises(RuntimeError, match="boom"), tokreduce.ToMe(r=2)(model):
        assert all("forward" in block.__dict__ for block in blocks)
        raise RuntimeError("boom")
    assert not any("forward" in block.__dict__ for block in blocks)


def test_tome_batch_equals_single(models):
    model, _, forward, _, _, _ = models["timm"]
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad(), tokreduce.ToMe(r=4)(model) as state:
        batched = forward(images)
        batched_index = [state.selections[b][0].index for b in range(3)]
        for b in range(3):
            single = forward(images[b : b + 1])
            torch.testing.assert_close(single[0], batched[b], atol=1e-5, rtol=1e-5)
            assert torch.equal(state.selections[0][0].index, batched_index[b])


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_merging_identical_tokens_is_identity(family):
    """Identical patches (constant image, no position embedding): proportional attention over merged copies
    equals attention over all copies, so the merged model's output equals the unmerged one's."""
    if family == "timm":
        model = _timm()
        model.pos_embed.data.zero_()
        forward = model
    else:
        model = _open_clip_tower()
        model.positional_embedding.data.zero_()
        forward = model
    images = torch.full((2, 3, 96 if family == "timm" else 64, 96 if family == "timm" else 64), 0.3)
    with torch.no_grad():
        reference = forward(images)
        with tokreduce.ToMe(r=4)(model) as state:
            out = forward(images)
    assert state.extra["tokens_per_layer"][-1] < state.extra["tokens_per_layer"][0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


def test_prefix_tokens_protected():
    model = _timm(img_size=64, depth=3, reg_tokens=4)  # CLS + 4 registers
    assert model.num_prefix_tokens == 5
    with torch.no_grad(), tokreduce.ToMe(r=8)(model) as state:
        model(torch.randn(2, 3, 64, 64))
    assert state.extra["tokens_per_layer"] == expected_counts(21, [8] * 3, 5)
    assert torch.equal(state.extra["size"][:, :5, 0], torch.ones(2, 5))
    assert torch.equal(state.extra["source"][:, :5], torch.arange(5).expand(2, 5))
    assert all((state.extra["source"][:, 5:] >= 5).flatten())


def test_tome_keep_and_stage_knobs(models):
    model, images, forward, n, p, _ = models["timm"]
    with torch.no_grad():
        with tokreduce.ToMe(keep=10)(model) as state:  # keep: patch tokens left after the last block
            forward(images)
        assert state.extra["tokens_per_layer"][-1] == p + 10
        # A plain ViT has no LLM: the default stage ("pre_llm") and "vision" both merge inside the blocks.
        with tokreduce.ToMe(r=3, stage="vision")(model):
            vision = forward(images)
        with tokreduce.ToMe(r=3)(model):
            default = forward(images)
        assert torch.equal(vision, default)
    with pytest.raises(ValueError, match="not both"), tokreduce.ToMe(r=3, keep=0.5)(model):
        pass
    with pytest.raises(ValueError, match="not both"), tokreduce.ToMe(r=3, keep=1)(model):  # int 1 = one token
        pass
    with pytest.raises(ValueError, match="one entry per layer"), tokreduce.ToMe(r=[1, 2])(model):
        pass


# -- MustDrop --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm", "open_clip"])
def test_mustdrop_merges_whole_tiles_after_the_first_block(models, name):
    model, images, forward, n, p, blocks = models[name]
    side = math.isqrt(n - p)  # timm 96 px: 6 x 6 patches (4 tiles); open_clip ViT-B-32: 7 x 7 (4 tiles)
    with torch.no_grad(), tokreduce.MustDrop(keep=0.5)(model) as state:
        forward(images)
    tiles = min((side // 3) ** 2, round((n - p - round(0.5 * (n - p))) / 8))  # the count nearest to keep
    left = n - 8 * tiles
    assert state.extra["tokens_per_layer"] == [left] * len(blocks)
    span = state.selections[1][0]
    assert len(span.index) == left - p and int(torch.bincount(span.assign).max()) == 9


# -- PiToMe ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_pitome_counts_follow_the_ratio(models, name):
    """floor(T - T * ratio) of the T patch tokens merge in every block; sizes and sources add up; batch == single."""
    model, images, forward, n, p, blocks = models[name]
    schedule, t = [], n - p
    for _ in blocks:
        schedule.append(math.floor(t - t * 0.8))
        t -= schedule[-1]
    with torch.no_grad():
        reference = forward(images)
        with tokreduce.PiToMe(ratio=0.8)(model) as state:
            out = forward(images)
            alone = forward(images[1:])
    counts = expected_counts(n, schedule, p)
    assert state.extra["tokens_per_layer"] == counts
    assert out.shape == reference.shape and out.dtype == reference.dtype
    torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=1e-5)
    size = state.extra["size"]
    assert torch.equal(size.sum(dim=(1, 2)), torch.full((1,), float(n)))
    with torch.no_grad(), tokreduce.PiToMe(keep=10)(model) as state:
        forward(images)
    assert state.extra["tokens_per_layer"][-1] == p + 10
    with pytest.raises(ValueError, match="not both"), tokreduce.PiToMe(ratio=0.9, keep=0.5)(model):
        pass
    with torch.no_grad(), tokreduce.PiToMe(ratio=1.0)(model):
        assert torch.equal(forward(images), reference)


def test_unsupported_reducer_and_model(models):
    model = models["timm"][0]
    with pytest.raises(ValueError, match="tome.*visionzip"), tokreduce.get_reducer("divprune", keep=0.5)(model):
        pass
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="supported:.*timm VisionTransformer"):
        tokreduce.wrap(torch.nn.Linear(2, 2), "tome", r=2)


def test_open_clip_sdpa_block_and_timm_trunk():
    tower = _open_clip_tower(qk_norm=True)  # CustomResidualAttentionBlock with open_clip's SDPA Attention
    assert type(tower.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = tower(images)
        with tokreduce.ToMe(r=3)(tower) as state:
            out = tower(images)
        assert state.extra["tokens_per_layer"] == [14, 11, 8] and out.shape == reference.shape
        assert torch.equal(tower(images), reference)
        trunk_model = open_clip.timm_model.TimmModel("vit_tiny_patch16_224", embed_dim=32)
        with tokreduce.ToMe(r=8)(trunk_model) as state:
            assert trunk_model(torch.randn(1, 3, 224, 224)).shape == (1, 32)
        assert state.extra["tokens_per_layer"][:2] == [189, 181]


def test_imports_stay_lazy():
    code = (
        "import sys, tokreduce, tokreduce.adapters; assert 'timm' not in sys.modules and 'open_clip' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- an independent ToMe block --------------------------------------------------------------------------


def reference_tome_block(x, size, parts, heads, r, protected):
    """One ToMe block written out plainly, sample by sample. x: (B, N, C), size: (B, N) -> both reduced.

    With ``protected=1`` (a CLS token) the tokens left are in the order of ToMe's own code; models without one
    are covered in tests/test_fidelity_tome.py."""
    norm1, w_qkv, b_qkv, proj, norm2, mlp = parts
    xs, sizes = [], []
    for xb, sb in zip(x, size, strict=True):
        n, c = xb.shape
        qkv = (norm1(xb) @ w_qkv.T + b_qkv).reshape(n, 3, heads, c // heads).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (H, N, D)
        logits = q @ k.transpose(-1, -2) / (c // heads) ** 0.5 + sb.log()[None, None, :]
        xb = xb + proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c))
        metric = k.mean(0)
        partners = {}
        for a in range(0, n, 2):
            if a < protected:
                continue
            candidates = [j for j in range(1, n, 2) if j >= protected]
            sims = [F.cosine_similarity(metric[a], metric[j], dim=0).item() for j in candidates]
            best = max(range(len(sims)), key=lambda i: (sims[i], -i))  # ties to the lower index
            partners[a] = (sims[best], candidates[best])
        merged = sorted(partners, key=lambda a: -partners[a][0])[: min(r, (n - protected) // 2)]
        groups = {t: [t] for t in range(n) if t not in merged}
        for a in merged:
            groups[partners[a][1]].append(a)
        # ToMe's order after a merge (tome/merge.py): the A tokens left (ascending, CLS first), then the B tokens
        keep = [t for t in range(0, n, 2) if t in groups] + list(range(1, n, 2))
        new_size = torch.stack([sb[groups[t]].sum() for t in keep])
        new_x = torch.stack([(sb[groups[t], None] * xb[groups[t]]).sum(0) for t in keep]) / new_size[:, None]
        xs.append(new_x + mlp(norm2(new_x)))
        sizes.append(new_size)
    return torch.stack(xs), torch.stack(sizes)


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_tome_block_matches_reference(family):
    if family == "timm":
        model, images = _timm(img_size=64, depth=2), torch.randn(2, 3, 64, 64)
        blocks, heads = model.blocks, 3
        parts = [(b.norm1, b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj, b.norm2, b.mlp) for b in blocks]
    else:
        model, images = _open_clip_tower(layers=2), torch.randn(2, 3, 64, 64)
        blocks, heads = model.transformer.resblocks, 4
        parts = [(b.ln_1, b.attn.in_proj_weight, b.attn.in_proj_bias, b.attn.out_proj, b.ln_2, b.mlp) for b in blocks]
    inputs, outputs = [], []
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    handles += [b.register_forward_hook(lambda m, args, out: outputs.append(out)) for b in blocks]
    with torch.no_grad(), tokreduce.ToMe(r=[3, 4])(model) as state:
        model(images)
    for h in handles:
        h.remove()
    x, size = inputs[0], torch.ones(2, inputs[0].shape[1])
    with torch.no_grad():
        for i, r in enumerate([3, 4]):
            x, size = reference_tome_block(x, size, parts[i], heads, r, protected=1)
            torch.testing.assert_close(outputs[i], x, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.extra["size"][..., 0], size)


# -- VisionZip -------------------------------------------------------------------------------------------


def visionzip(layer=None, **knobs):
    reducer = tokreduce.VisionZip(**knobs)
    if layer is not None:
        reducer.layer = layer  # works whether or not VisionZipReducer declares the knob
    return reducer


@pytest.mark.parametrize("class_token", [True, False])
def test_visionzip_scores_match_eager_attention(class_token):
    kwargs = {} if class_token else {"class_token": False, "global_pool": "avg"}
    model = _timm(**kwargs)
    p = model.num_prefix_tokens
    block = model.blocks[2]
    block.attn.fused_attn = False  # only so that the test can read the eager weights at attn_drop
    weights = []
    handle = block.attn.attn_drop.register_forward_hook(lambda m, args, out: weights.append(out))
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        reference = model(images)
        with visionzip(layer=2, dominant=6, contextual=2)(model) as state:
            out = model(images)
    handle.remove()
    assert out.shape == reference.shape
    assert state.extra["tokens_per_layer"] == [37 - 1 + p] * 2 + [8 + p] * 2
    attn = weights[0].float()  # (B, H, N, N)
    score = attn[:, :, 0].sum(1) if class_token else attn.sum(2).mean(1)
    dominant = score[:, p:].topk(6, dim=-1).indices
    for b in range(2):
        span = state.selections[b][0]
        assert len(span.index) == 8 and set(dominant[b].tolist()) <= set(span.index.tolist())
        assert torch.equal(span.assign[span.index], torch.arange(8))


def reduce_and_unwrap(models, name, reducer_class):
    """Run ``reducer_class(keep=0.25)`` on model ``name``: same output shape and dtype, exact identity at keep=1.0
    and after exit, every hook gone. Returns (state, tokens in, prefix tokens, blocks, images)."""
    model, images, forward, n, p, blocks = models[name]
    before = hook_snapshot(model)
    with torch.no_grad():
        reference = forward(images)
        with reducer_class(keep=0.25)(model) as state:
            out = forward(images)
        assert out.shape == reference.shape and out.dtype == reference.dtype
        assert torch.equal(forward(images), reference)
        with reducer_class(keep=1.0)(model) as identity:
            assert torch.equal(forward(images), reference)  # keep=1.0 is an exact identity
        assert identity.stats.tokens_out == identity.stats.tokens_in
    assert hook_snapshot(model) == before
    return state, n, p, blocks, images


@pytest.mark.parametrize("name", ["open_clip", "open_clip-bf16", "timm-bf16"])
def test_visionzip_default_layer_and_unwrap(models, name):
    state, n, p, blocks, _ = reduce_and_unwrap(models, name, tokreduce.VisionZip)
    k = round(0.25 * (n - p))
    assert state.extra["tokens_per_layer"] == [n] * (len(blocks) - 2) + [k + p] * 2  # penultimate block


def test_visionzip_bad_layer(models):
    model = models["timm"][0]
    with pytest.raises(ValueError, match=r"layer must be an int in \[-4, 3\]"), visionzip(layer=4, keep=0.5)(model):
        pass


# -- FlowCut (pruning step by step, CLS relayed) ------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_flowcut_counts_identity_and_unwrap(models, name):
    state, n, p, blocks, images = reduce_and_unwrap(models, name, tokreduce.FlowCut)
    k = round(0.25 * (n - p))
    counts = state.extra["tokens_per_layer"]
    assert len(counts) == len(blocks) and counts[-2:] == [k + p] * 2  # pruned to k after the penultimate block
    assert counts == sorted(counts, reverse=True) and counts[0] <= n
    assert [len(row[0].index) for row in state.selections] == [k] * images.shape[0]
    assert all(row[0].index.tolist() == sorted(set(row[0].index.tolist())) for row in state.selections)


def test_flowcut_batch_equals_single():
    """Each image is pruned on its own (its own prune counts), whatever else is in the batch."""
    model = _timm(depth=6)
    with torch.no_grad():  # peaked attention, so that the images prune different numbers of tokens per block
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(6.0)
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), tokreduce.FlowCut(keep=8)(model) as state:
        batched = model(images)
        chosen = [row[0].index.tolist() for row in state.selections]
        for i in range(3):
            torch.testing.assert_close(model(images[i : i + 1])[0], batched[i], atol=1e-5, rtol=1e-4)
            assert state.selections[0][0].index.tolist() == chosen[i]


@pytest.mark.parametrize("kwargs", [{"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_flowcut_needs_one_cls_token(kwargs):
    model = _timm(**kwargs)
    with pytest.raises(ValueError, match="flowcut.*CLS token"), tokreduce.FlowCut(keep=0.5)(model):
        pass
    assert not any("forward" in m.__dict__ for m in model.modules())
