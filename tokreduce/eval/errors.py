"""RunFailed: a run that could not be done though the request was fine (exit code 1 of ``tokreduce eval``).

Requests that cannot run as given raise ``ValueError`` (exit code 2); see ``tokreduce.cli``.
"""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run could not be done: its directory is in use by another run, or every item failed."""
