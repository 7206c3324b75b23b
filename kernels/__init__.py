"""Triton kernels for the similarity work (installed as ``tokreduce.kernels``).

Import-time side effects are deliberately absent: transformers probes for a top-level package named
``kernels``, so this file must stay importable cheaply and must not define a version.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when the triton package can be imported (kernels still need CUDA tensors or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
