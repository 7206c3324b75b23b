"""The Gradio demo (installed as ``tokreduce.demo``): ``tokreduce demo`` or ``python demo/app.py``.

:mod:`tokreduce.demo.app` holds the Gradio layout and the command, :mod:`tokreduce.demo.session` the
model-side work (both answers, the overlay, tokens, time and FLOPs; usable from Python without Gradio) and
:mod:`tokreduce.demo.media` what the demo accepts. The core package never imports the demo.
"""
