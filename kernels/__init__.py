"""Triton kernels for the similarity work (installed as ``tokreduce.kernels``).

One file per kernel, each with the math in its docstring, a ``*_ref`` torch reference, the ``@triton.jit``
kernel and a wrapper that validates, allocates and launches:

- ``tokreduce.kernels.cosine_max``     cosine_max(a, b) -> row max / argmax of cosine similarity (ToMe, VisionZip)
- ``tokreduce.kernels.divprune``       greedy_maxmin(x, k) -> DivPrune's picks, one fused launch per pick
- ``tokreduce.kernels.attention_row``  attention_row(query, key, scale, key_mask) -> FastV's attention row

Methods do not import these: ``tokreduce.similarity`` dispatches (``backend="auto" | "torch" | "triton"``).
The package is a leaf: nothing here imports the rest of tokreduce, so the core imports kernels and never
the reverse. The submodules import triton; this file and ``utils`` do not.

Import-time side effects are deliberately absent: transformers probes for a top-level package named
``kernels``, so this file must stay importable cheaply and must not define a version.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when the triton package can be imported (kernels still need CUDA tensors or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
