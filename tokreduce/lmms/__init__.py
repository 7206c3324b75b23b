"""tokreduce inside lmms-eval: one lmms-eval model that runs any supported VLM with any reducer.

    pip install "tokreduce[lmms]"
    lmms-eval --model tokreduce --model_args pretrained=DIR,method=divprune,keep=0.25 --tasks mvbench

lmms-eval (0.7) collects external models from the Python entry-point group ``lmms_eval.models``:
tokreduce's pyproject declares ``tokreduce = "tokreduce.lmms:manifest"`` there, and lmms-eval calls
:func:`manifest` when it builds its model registry. Nothing is patched or copied; the model class is
imported only when ``--model tokreduce`` is asked for. See :mod:`tokreduce.lmms.model` for the
model_args and :mod:`tokreduce.lmms.efficiency` for what is recorded per sample.
"""

from __future__ import annotations

MODEL_ID = "tokreduce"
MODEL_CLASS = "tokreduce.lmms.model.TokReduceLMM"


def manifest():
    """The ``lmms_eval.models`` entry point: a ModelManifest naming :class:`~tokreduce.lmms.model.TokReduceLMM`.

    It is a "simple" model in lmms-eval's terms (requests carry a text context and a ``doc_to_visual``),
    which is the form that serves both ``generate_until`` and ``loglikelihood`` tasks.
    """
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as e:
        raise ImportError('tokreduce.lmms needs lmms-eval >= 0.7: pip install "tokreduce[lmms]"') from e
    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
