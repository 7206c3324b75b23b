"""What can go wrong in a run: RunFailed (exit code 1 of ``tokreduce eval``) and the error labels of records.

Requests that cannot run as given raise ``ValueError`` (exit code 2); see ``tokreduce.cli``.
"""

from __future__ import annotations

from ..image import REASONS as IMAGE_REASONS
from ..image import ImageError
from ..video import REASONS as VIDEO_REASONS
from ..video import VideoError


class RunFailed(RuntimeError):
    """The run could not be done: its directory is in use by another run, or every item failed."""


# Errors that come from the input itself: rerunning cannot fix them, so they are never retried.
INPUT_ERRORS = (*VIDEO_REASONS, *IMAGE_REASONS, "unknown_option", "unsupported_item", "input_error")
MEDIA_ERRORS = (VideoError, ImageError)
# Errors of the model or method that a rerun (other device, fixed adapter) may fix: --retry-errors.
RUN_ERRORS = ("model_error", "method_error")
UNPARSABLE = "unparsable_answer"  # the model ran; its answer counts as wrong
