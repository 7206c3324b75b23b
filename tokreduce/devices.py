"""Device names given on the command line ("auto", "cpu", "cuda", "cuda:1"): checked, then resolved."""

from __future__ import annotations

import torch

KINDS = ("cpu", "cuda", "mps")
HELP = "auto, cpu, cuda or cuda:N"


def check_device_name(name) -> None:
    """Raise ``ValueError`` unless ``name`` is "auto" or a device string of a supported kind (not checked
    against the hardware: see :func:`resolve_device`)."""
    if name == "auto":
        return
    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in KINDS:
        raise ValueError(f"device must be {HELP}, got {name!r}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device to run on: "auto" is cuda:LOCAL_RANK when CUDA is available, else cpu; a bare "cuda" also
    gets LOCAL_RANK. Raises ``ValueError`` for a device this machine does not have."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return device
