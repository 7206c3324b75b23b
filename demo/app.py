"""The Gradio demo's layout and the ``tokreduce demo`` command; the model-side work is in ``session``.

Ask a question about an image or a video, pick a method and a budget, and see both answers, which tokens
were kept (pruned ones dimmed, merged groups in shared colours), and what it saved in tokens, prefill time
and FLOPs. Safe by default: binds 127.0.0.1, no share link, analytics off, uploads and video length
limited, one request at a time. Uploads reach the app undecoded (``preprocess=False``): the demo checks
each file itself (``DemoSession.read_media``: what it is, its size and pixel count before decoding) and
says what is wrong in the page (``gradio.Error``), instead of Gradio failing on it with a bare "Error".
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from tokreduce.demo.session import (
    DemoInputError,
    DemoSession,
    Limits,
    format_answer,
    format_numbers,
    method_choices,
    method_info,
)
from tokreduce.devices import resolve_device

log = logging.getLogger(__name__)

DEFAULT_METHOD = "divprune"
INTRO = """# tokreduce: which visual tokens does a method keep?
Pick an example (or upload an image or a short video), choose a method and how many visual tokens to keep,
and press **Run**. The model answers twice, with all visual tokens and with the reduced set."""
LEGEND = """**Reading the picture**: bright cells are kept tokens, dark cells were pruned, cells tinted in
one colour were merged into one token. A LLaVA-OneVision image has two spans over the same picture: the
base view and the high-resolution (anyres) crop grid; a video is one span over its sampled frames.
Prefill time is measured here (fastest of a few runs); FLOPs are estimated for the language model's prefill."""


def _import_gradio():
    # Analytics must be off before gradio is imported: it reads the variable at import time.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the demo needs Gradio: pip install "tokreduce[demo]"') from e
    return gr


def build_app(session: DemoSession):
    """The Gradio Blocks of the demo for a loaded :class:`DemoSession` (not launched)."""
    gr = _import_gradio()
    methods = method_choices()
    default = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    max_layer = max(session.llm_layers - 1, 1)

    with gr.Blocks(title="tokreduce demo", analytics_enabled=False) as app:
        kind = gr.State("image")
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Tabs(selected="image") as tabs:
                    with gr.Tab("Image", id="image") as image_tab:
                        image = gr.Image(type="pil", label="Image", height=260, elem_id="image-input")
                    with gr.Tab("Video", id="video") as video_tab:
                        video = gr.Video(label=f"Video (up to {session.limits.max_video_seconds:.0f} s)", height=260)
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                method = gr.Dropdown(methods, value=default, label="Method", elem_id="method")
                keep = gr.Slider(
                    0.05, 1.0, value=0.25, step=0.05, label="Keep (fraction of visual tokens)", elem_id="keep"
                )
                info = method_info(default)
                layer = gr.Slider(
                    1,
                    max_layer,
                    value=min(info.layer or 2, max_layer),
                    step=1,
                    label="Layer (in-LLM methods prune after this decoder layer)",
                    visible=info.layer is not None,
                    elem_id="layer",
                )
                run = gr.Button("Run", variant="primary", elem_id="run")
                for media_kind, target in (("image", image), ("video", video)):
                    chosen = [e for e in session.examples if e.kind == media_kind]
                    if chosen:
                        gr.Examples(
                            [[e.media, e.question] for e in chosen],
                            [target, question],
                            label=f"{media_kind.capitalize()} examples",
                            example_labels=[e.label for e in chosen],
                            elem_id=f"{media_kind}-examples",
                        )
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    answer_full = gr.Textbox(label="Answer, all tokens", elem_id="answer-full", interactive=False)
                    answer_reduced = gr.Textbox(label="Answer, reduced", elem_id="answer-reduced", interactive=False)
                overlay = gr.Image(
                    type="pil",
                    label="Kept tokens",
                    show_label=False,
                    elem_id="overlay",
                    interactive=False,
                    format="png",
                )
                numbers = gr.Markdown(elem_id="numbers")
                gr.Markdown(LEGEND)

        # The most recently chosen input (tab click, upload or example) is the one that runs. These light
        # UI events skip the queue so they never wait behind the single model worker.
        image_tab.select(lambda: "image", outputs=kind, queue=False)
        video_tab.select(lambda: "video", outputs=kind, queue=False)
        raw = dict(queue=False, preprocess=False)  # the upload's file path, not Gradio's decoded image
        image.change(_chose("image", gr), inputs=[image, kind], outputs=[kind, tabs], **raw)
        video.change(_chose("video", gr), inputs=[video, kind], outputs=[kind, tabs], **raw)
        method.change(lambda name: _layer_update(gr, name, max_layer), inputs=method, outputs=layer, queue=False)

        def on_run(kind, image, video, question, method, keep, layer):
            try:
                media = session.read_media(kind, upload_path(image if kind == "image" else video))
                result = session.compare(media, question, method, float(keep), int(layer))
            except DemoInputError as e:
                raise gr.Error(str(e), title="Input", print_exception=False) from e
            except ValueError as e:  # a method unsupported for this model, bad knobs: tokreduce says why
                raise gr.Error(str(e), title=f"{method} could not run", print_exception=False) from e
            except Exception as e:  # anything else: show it, log the traceback, keep the app up
                log.exception("demo run failed")
                raise gr.Error(f"{type(e).__name__}: {e}", title=f"{method} failed", print_exception=False) from e
            note = "" if result.overlay is not None else "The method recorded no selection for this input."
            return (
                note,
                format_answer(result.answer_full),
                format_answer(result.answer_reduced),
                result.overlay,
                format_numbers(result),
            )

        outputs = [status, answer_full, answer_reduced, overlay, numbers]
        # Clear the last result first, so an error is never shown beside the answers of an earlier input.
        run.click(lambda: ("", "", "", None, ""), outputs=outputs, queue=False).then(
            on_run, inputs=[kind, image, video, question, method, keep, layer], outputs=outputs, preprocess=False
        )
    return app


def upload_path(value) -> str | None:
    """The server-side file of an image or video input given to a ``preprocess=False`` event (a FileData dict)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    raise TypeError(f"unexpected upload payload {type(value).__name__}")


def _chose(which: str, gr):
    def handler(value, current):
        if value is None:  # cleared: keep whatever was chosen before
            return current, gr.Tabs()
        return which, gr.Tabs(selected=which)

    return handler


def _layer_update(gr, name: str, max_layer: int):
    info = method_info(name)
    if info.layer is None:
        return gr.Slider(visible=False)
    return gr.Slider(visible=True, value=min(info.layer, max_layer))


def launch(app, session: DemoSession, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Start the server: one model worker behind the queue, upload limit, no share link, no MCP server.

    With ``block=False`` it returns once the server is up (call ``app.block_thread()`` or ``app.close()``).
    """
    # Example media live in the installed package (the toy data), outside the working directory.
    media_dirs = sorted({str(Path(e.media).parent) for e in session.examples})
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=True,  # a gradio.Error's message (what was wrong with the input) appears in the page
        max_file_size=f"{session.limits.max_upload_mb}mb",
        ssr_mode=False,  # no Node server: faster start, fewer moving parts
        footer_links=[],
        mcp_server=False,
        prevent_thread_lock=not block,
        quiet=True,  # our own "ready" line below says where it runs
        allowed_paths=media_dirs or None,
    )
    return app


# -- the ``tokreduce demo`` command ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled toy model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:1")
    p.add_argument("--max-upload-mb", type=_positive(int), default=Limits.max_upload_mb, help="largest upload in MB")
    p.add_argument(
        "--max-video-seconds", type=_positive(float), default=Limits.max_video_seconds, help="longest video"
    )
    p.add_argument("--frames", type=_positive(int), default=Limits.frames, help="frames sampled per video (default 8)")


def _positive(kind: type):
    """An argparse type: a number of ``kind`` > 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} > 0, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; a bad --model or --device raises ValueError (one line and exit 2 from the CLI)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = str(resolve_device(args.device))
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model}: not a checkpoint directory (no config.json); pass a model folder")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the demo has no authentication; anyone who can reach this port can use it", args.host)
    start = time.perf_counter()
    limits = Limits(max_upload_mb=args.max_upload_mb, max_video_seconds=args.max_video_seconds, frames=args.frames)
    session = DemoSession.load(args.model, device=device, limits=limits)
    session.warm_up()
    app = build_app(session)
    launch(app, session, host=args.host, port=args.port, block=False)
    print(f"tokreduce demo ready in {time.perf_counter() - start:.1f} s at {app.local_url}", flush=True)
    app.block_thread()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python demo/app.py [--model DIR]``: the same as ``tokreduce demo``, errors and exit codes included."""
    from tokreduce.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
