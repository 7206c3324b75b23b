"""Launch the tokreduce Gradio demo from a checkout: ``python demo/app.py [--model DIR] [--port N]``.

The app ships inside the package so that ``tokreduce demo`` runs the same thing from an installed copy:
:mod:`tokreduce.demo_app` holds the Gradio layout and the command, :mod:`tokreduce.demo_core` the
model-side work (both answers, the overlay, tokens, time and FLOPs), usable from Python without Gradio.
"""

import sys

from tokreduce.demo_app import build_app, launch, main
from tokreduce.demo_core import DemoSession

__all__ = ["DemoSession", "build_app", "launch", "main"]

if __name__ == "__main__":
    sys.exit(main())
