"""The demo's model side (tokreduce.demo.session) on the bundled toy model, and the overlay drawing it uses.

No Gradio needed: the app only lays out what these functions return.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from media_faults import write_faults
from PIL import Image

import tokreduce
from tokreduce import SpanSelection, toy
from tokreduce.demo.session import (
    DemoInputError,
    DemoSession,
    Limits,
    build_inputs,
    format_numbers,
    method_choices,
    method_info,
)
from tokreduce.flops import layer_lengths, prefill_flops
from tokreduce.viz import captioned, mosaic, overlay_spans, span_label, token_roles

TILE = 224  # overlay_spans' default tile
CAPTION = 22  # captioned's default strip height


@pytest.fixture(scope="module")
def session():
    if not (toy.path() / "config.json").is_file():
        pytest.skip(f"no toy checkpoint at {toy.path()} (run scripts/train_toy.py)")
    return DemoSession.load(limits=Limits(timing_repeats=1, max_new_tokens=2))


def example(session, kind):
    ex = next(e for e in session.examples if e.kind == kind)
    return session.read_media(ex.kind, ex.media), ex.question


def test_examples_cover_images_and_videos(session):
    kinds = [e.kind for e in session.examples]
    assert kinds.count("image") >= 2 and kinds.count("video") >= 2
    assert all(e.answer and e.question for e in session.examples)


def test_methods_and_layer_knob():
    assert method_choices() == tokreduce.list_reducers()
    for name in ("fastv", "dart"):
        assert method_info(name).stage == "llm" and method_info(name).layer is not None
    # framefusion merges layer by layer from layer 0 and prunes where merging ends: no layer knob to slide
    assert method_info("framefusion").stage == "llm" and method_info("framefusion").layer is None
    assert method_info("divprune").layer is None


def test_image_numbers_agree_with_state_stats(session):
    media, question = example(session, "image")
    c = session.compare(media, question, "divprune", keep=0.25)
    # an independent run through the public API records the same counts
    inputs = build_inputs(session.processor, media, question)
    with tokreduce.get_reducer("divprune", keep=0.25)(session.model) as state, torch.no_grad():
        session.model(**inputs)
    assert (c.tokens_in, c.tokens_out) == (state.stats.tokens_in[0], state.stats.tokens_out[0])
    assert c.tokens_in == sum(s.num_tokens for s in c.selections) == 72  # base view 36 + crop 36
    assert c.tokens_out == sum(s.index.numel() for s in c.selections) < c.tokens_in
    assert c.seq_full == inputs["input_ids"].shape[1]
    assert c.seq_reduced == c.seq_full - (c.tokens_in - c.tokens_out)
    assert c.flops_full == prefill_flops(session.shape, c.seq_full)
    assert c.flops_reduced == prefill_flops(session.shape, c.seq_reduced) < c.flops_full
    assert 0 < c.flops_saved < 1 and c.prefill_full_s > 0 and c.prefill_reduced_s > 0
    table = format_numbers(c)
    assert f"| {c.tokens_in} | {c.tokens_out} |" in table and "speed-up" in table


def test_image_overlay_shows_both_spans(session):
    media, question = example(session, "image")
    c = session.compare(media, question, "tome", keep=0.3)
    assert [s.grid for s in c.selections] == [(1, 6, 6), (1, 6, 6)]
    assert c.overlay.size == (2 * TILE + 8, TILE + CAPTION)  # base view and crop, side by side


@pytest.mark.parametrize(
    "method, keep", [("uniform", 0.5), ("vidcom2", 0.5), ("evs", 0.5), ("fastvid", 0.5), ("holitom", 0.25)]
)
def test_video_overlay_is_a_frame_grid(session, method, keep):
    media, question = example(session, "video")
    assert len(media.frames) == session.limits.frames
    layer = 2 if method == "holitom" else None  # its merge inside the LLM: the toy has 4 decoder layers, not 28
    c = session.compare(media, question, method, keep=keep, layer=layer)
    assert [s.grid for s in c.selections] == [(8, 3, 3)]
    assert c.overlay.size == (4 * TILE + 3 * 4, 2 * TILE + 4 + CAPTION)  # 4 x 2 frames
    assert c.tokens_out == round(72 * keep)
    s = c.selections[0]
    group, merged = token_roles(s.num_tokens, s.index, s.assign)
    assert merged.any() == (method in ("fastvid", "holitom"))  # merge methods show their groups on the mosaic
    if method == "evs":  # the first frame stays whole
        assert (group[:9] >= 0).all()
    if not merged.any():  # pruned cells dimmed, kept ones drawn as they are
        assert (group >= 0).sum() == c.tokens_out
        full = session.compare(media, question, method, keep=1.0).overlay
        assert np.asarray(c.overlay).astype(int).sum() < np.asarray(full).astype(int).sum()


def test_video_overlay_shows_prunevid_merges(session):
    """PruneVid's merged groups (static positions over frames, spatial clusters) reach the frame mosaic."""
    from tokreduce.viz import token_roles

    info = method_info("prunevid")  # merges before the LLM, prunes again from layer selected_layer + 1 = 11
    assert info.stage == "pre_llm" and info.layer == 11
    media, question = example(session, "video")
    c = session.compare(media, question, "prunevid", keep=0.25, layer=2)  # selected_layer 1 on the 4-layer toy
    (sel,) = c.selections
    assert sel.grid == (8, 3, 3) and c.tokens_out == 18 and sel.assign is not None and sel.stage == "llm"
    assert c.flops_reduced == prefill_flops(session.shape, [c.seq_full - 72 + 45] * 2 + [c.seq_reduced] * 2)
    group, merged = token_roles(sel.num_tokens, sel.index, sel.assign)
    assert merged.any()  # some cells are tinted as members of a merged group
    assert c.overlay.size == (4 * TILE + 3 * 4, 2 * TILE + 4 + CAPTION)


def test_llm_method_counts_full_layers_before_pruning(session):
    media, question = example(session, "video")
    c = session.compare(media, question, "fastv", keep=0.25, layer=1)
    assert c.layer == 1 and c.stage == "llm"
    expected = prefill_flops(session.shape, layer_lengths(session.shape, c.seq_full, c.seq_reduced, 1))
    assert c.flops_reduced == expected
    with pytest.raises(ValueError, match="layer"):
        session.compare(media, question, "fastv", keep=0.25, layer=session.llm_layers)


def test_keep_one_changes_nothing(session):
    media, question = example(session, "image")
    c = session.compare(media, question, "random", keep=1.0)
    assert c.tokens_out == c.tokens_in and c.answer_reduced == c.answer_full and c.flops_saved == 0


def test_vision_stage_method_runs_on_the_toy_model(session):
    media, question = example(session, "image")
    c = session.compare(media, question, "visionzip", keep=0.5)
    assert c.tokens_out < c.tokens_in


def test_input_limits_have_clear_messages(session):
    with pytest.raises(DemoInputError, match="no image given"):
        session.read_media("image", None)
    with pytest.raises(DemoInputError, match="at most 4096 px per side"):
        session.read_media("image", Image.new("RGB", (5000, 10)))
    video = next(e for e in session.examples if e.kind == "video").media
    strict = DemoSession(session.model, session.processor, limits=Limits(max_video_seconds=0.5))
    with pytest.raises(DemoInputError, match="2 s long; the demo accepts up to 0.5 s"):
        strict.read_media("video", video)
    media, _ = example(session, "image")
    with pytest.raises(DemoInputError, match="question"):
        session.compare(media, "  ", "divprune", keep=0.5)



def test_uploads_are_checked_for_what_they_are(session, tmp_path):
    image = next(e for e in session.examples if e.kind == "image").media
    faults = write_faults(tmp_path, Path(image))
    expect = {
        "text_image": "not an image file that can be read",
        "random_image": "not an image file that can be read",
        "truncated_image": "the image does not decode",
        "bomb_image": "the image is 400,000,000 pixels; at most 16,777,216 are accepted",
        "text_video": "not a video file that can be decoded",
        "image_as_video": "not a video file that can be decoded",
        "audio_only": "not a video file that can be decoded",
    }
    for name, message in expect.items():
        path, kind, _ = faults[name]
        with pytest.raises(DemoInputError, match=message) as e:
            session.read_media(kind, str(path))
        assert str(tmp_path) not in str(e.value), "no server paths in what the user sees"
    assert Path(faults["bomb_image"][0]).stat().st_size < 100_000  # a small file that would decode to 1.2 GB
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000)).save(big)  # within the side limit, over the pixel limit below
    strict = DemoSession(session.model, session.processor, limits=Limits(max_image_pixels=4_000_000))
    with pytest.raises(DemoInputError, match="3000x3000 = 9,000,000 pixels; at most 4,000,000"):
        strict.read_media("image", str(big))
    tiff = tmp_path / "ok.tiff"
    Image.new("RGB", (8, 8)).save(tiff)  # a real image, but not a format the demo accepts
    with pytest.raises(DemoInputError, match="PNG, JPEG, WEBP, GIF, BMP"):
        session.read_media("image", str(tiff))
    assert session.read_media("image", image).data.size == Image.open(image).size
    photo = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[274] = 6  # EXIF orientation: rotate 90 degrees to view
    Image.new("RGB", (40, 20)).save(photo, exif=exif)
    assert session.read_media("image", str(photo)).data.size == (20, 40)


def test_the_page_says_what_is_wrong_with_an_upload(session, tmp_path):
    """Through the served app (as the browser calls it): the reason comes back as the error message, a file
    over the upload limit gets HTTP 413, and the server keeps answering afterwards."""
    pytest.importorskip("gradio")
    client_lib = pytest.importorskip("gradio_client")
    import socket

    import httpx

    from tokreduce.demo.app import build_app, launch

    small = DemoSession(session.model, session.processor, session.examples, Limits(1, timing_repeats=1, max_new_tokens=2))
    app = build_app(small)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, small, port=port, block=False)
    try:
        assert app.local_url == f"http://127.0.0.1:{port}/" and not app.share
        client = client_lib.Client(app.local_url, verbose=False)
        example = next(e for e in small.examples if e.kind == "image")
        faults = write_faults(tmp_path, Path(example.media))

        def run(image):
            upload = None if image is None else client_lib.handle_file(str(image))
            return client.predict(upload, None, example.question, "divprune", 0.25, 2, api_name="/on_run")

        for name, message in [("text_image", "not an image file"), ("random_image", "not an image file"),
                              ("bomb_image", "400,000,000 pixels")]:  # fmt: skip
            with pytest.raises(client_lib.exceptions.AppError, match=message):
                run(faults[name][0])
        with pytest.raises(client_lib.exceptions.AppError, match="no image given"):
            run(None)
        too_big = tmp_path / "big.png"
        too_big.write_bytes(b"\0" * 1_100_000)
        upload = httpx.post(f"{app.local_url}gradio_api/upload", files={"files": ("big.png", too_big.read_bytes())})
        assert upload.status_code == 413
        status, full, reduced, overlay, numbers = run(example.media)  # still serving
        assert full and reduced and overlay and "divprune" in numbers
    finally:
        app.close()


def test_demo_flags_are_one_line_and_exit_2(run_cli):
    for args, message in [
        (["--max-upload-mb", "-5"], "argument --max-upload-mb: must be a whole number > 0, got '-5'"),
        (["--max-video-seconds", "nan"], "argument --max-video-seconds: must be a number > 0"),
        (["--model", "/nonexistent"], "--model /nonexistent: not a checkpoint directory"),
        (["--device", "tpu:7"], "device must be"),
    ]:
        code, line = run_cli("demo", *args)
        assert code == 2 and message in line, (args, line)

# -- drawing ----------------------------------------------------------------------------------------------
def solid(value=200, size=(48, 32)):
    return Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8))


def test_overlay_spans_keeps_aspect_and_names_spans():
    base = SpanSelection(0, 0, "image", 0, (1, 2, 2), 4, torch.tensor([0, 3]))
    crop = SpanSelection(0, 1, "image", 8, (1, 2, 3), 6, torch.tensor([1]))
    out = overlay_spans([solid()], [base, crop], tile=96, labels=["base view", "crop"])
    assert out.size == (96 + 8 + 96, 64 + CAPTION)  # 48x32 scaled to 96x64, two spans
    assert span_label(crop, "crop") == "crop (2x3): 1/6 kept"
    assert span_label(base) == "image span 0 (2x2): 2/4 kept"
    plain = overlay_spans([solid()], [base], tile=96, labels=False)
    assert plain.size == (96, 64)
    with pytest.raises(ValueError, match="1 labels for 2 spans"):
        overlay_spans([solid()], [base, crop], labels=["only one"])


def test_overlay_spans_video_and_frame_mismatch():
    sel = SpanSelection(0, 0, "video", 0, (4, 1, 1), 4, torch.tensor([0, 2]))
    out = overlay_spans([solid()] * 4, [sel], tile=48, columns=2, labels=False)
    assert out.size == (2 * 48 + 4, 2 * 32 + 4)
    with pytest.raises(ValueError, match="4 frame"):
        overlay_spans([solid()] * 3, [sel])


def test_captioned_and_mosaic_of_one_tile():
    assert captioned(solid(), "hello").size == (48, 32 + CAPTION)
    assert mosaic([solid()], columns=4).size == (48, 32)  # no empty columns
