"""Task functions of the toy lmms-eval tasks: the bundled toy test split asked as ``tokreduce eval`` asks it.

The context is ``tokreduce.toy.format_prompt`` ("question A opt B opt"), the answer letter is read by
``tokreduce.toy.parse_answer``: the same prompt and parsing as the evaluator's toy prompter.
"""

from PIL import Image

from tokreduce import toy

ROOT = toy.data_path().parent
LETTERS = toy.LETTERS


def images(dataset):
    return dataset.filter(lambda doc: doc["media_type"] == "image")


def videos(dataset):
    return dataset.filter(lambda doc: doc["media_type"] == "video")


def doc_to_visual(doc):
    """A PIL image for image questions (as most lmms-eval image tasks give), a file path for videos."""
    path = ROOT / doc["media"]
    if doc["media_type"] == "image":
        with Image.open(path) as image:
            return [image.convert("RGB")]
    return [str(path)]


def doc_to_text(doc):
    return toy.format_prompt(doc)


def doc_to_choice(doc):
    return list(LETTERS[: len(doc["options"])])


def doc_to_target_index(doc):
    return LETTERS.index(doc["answer"])


def process_results(doc, results):
    return {"accuracy": float(toy.parse_answer(results[0], len(doc["options"])) == doc["answer"])}
