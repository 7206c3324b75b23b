"""Video QA datasets: one loader per annotation format, all yielding :class:`QAItem`.

Every loader takes ``(path, video_root)`` and returns items in file order. Problems with an item's
annotation (an answer that is not one of its options, too few options) do not stop loading: the item
carries ``error`` and the runner records it without running the model. Example files of every format
live in ``tests/resources/eval/``.

Formats (``--dataset FORMAT:PATH``):

- ``toy``: the video items of the bundled toy test split (``tokreduce.toy.data_path()``); no path.
- ``jsonl``: one JSON object per line: ``id``, ``video`` (or ``media``), ``question``, ``options``
  (or ``candidates``), ``answer`` (a letter, a 0-based index or the option text); optional
  ``category``, ``media_type`` ("video" or "image"), ``start`` / ``end`` seconds. The toy format is a
  special case.
- ``mvbench``: an MVBench task file (a JSON list of ``video``, ``question``, ``candidates``, ``answer``
  as option text, optional ``start`` / ``end``) or a folder of them; the category is the task (file stem).
- ``videomme``: Video-MME rows (``.parquet``, ``.json`` or ``.jsonl``) with ``videoID``, ``question_id``,
  ``question``, ``options`` ("A. ..."), ``answer`` (a letter), ``task_type``, ``duration``; videos are
  ``<video_root>/<videoID>.mp4``.
- ``nextqa``: NExT-QA multiple choice CSV (``video``, ``qid``, ``question``, ``a0``..``a4``, ``answer``
  index, ``type``); videos are ``<video_root>/<video>.mp4``, or mapped through a
  ``map_vid_vidorID.json`` next to the CSV or in the video root.
- ``egoschema``: EgoSchema ``questions.json`` (``q_uid``, ``question``, ``option 0``..``option 4``);
  answers from each item's ``answer`` or a ``subset_answers.json`` beside it (items without an answer
  are predicted but not scored); videos are ``<video_root>/<q_uid>.mp4``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..prompts import LETTERS
from ..video import time_range_problem


@dataclass
class QAItem:
    """One multiple-choice question about one video (or image).

    Attributes:
        id: unique within the dataset.
        video: absolute path of the media file.
        question: question text, without the options.
        options: option texts, without letters; option i has letter ``LETTERS[i]``.
        answer: the correct letter, or None when the dataset does not say (not scored).
        category: task / question type, for per-category accuracy.
        media_type: "video" or "image".
        start, end: clip bounds in seconds, or None for the whole video.
        error: why the item cannot be evaluated ("unknown_option: ..."), or None.
        extra: format-specific fields worth keeping (duration, ...).
    """

    id: str
    video: str
    question: str
    options: list[str]
    answer: str | None
    category: str = ""
    media_type: str = "video"
    start: float | None = None
    end: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def media_key(self) -> tuple:
        """Questions with the same key share one decoded (and preprocessed) clip."""
        return (self.media_type, self.video, self.start, self.end)

    def fingerprint(self) -> str:
        """Hash of the annotation a record of this item was made from: media, bounds, question, options,
        answer. A saved record whose hash differs is stale and runs again (the category is not part of it:
        reports take the category, like the answer, from the current annotation)."""
        fields = [self.media_type, self.video, self.start, self.end, self.question, self.options, self.answer]
        return hashlib.sha1(json.dumps(fields + [self.error]).encode()).hexdigest()[:16]


DATASETS: dict[str, Callable[[Path | None, Path | None], list[QAItem]]] = {}


def register_dataset(name: str):
    """Decorator: make ``loader(path, video_root) -> list[QAItem]`` available as format ``name``."""

    def decorator(fn):
        DATASETS[name] = fn
        return fn

    return decorator


def load_dataset(
    name: str, path: str | Path | None = None, video_root: str | Path | None = None, limit: int | None = None
) -> list[QAItem]:
    """Load a dataset by format name; checks that ids are unique.

    Args:
        name: a key of DATASETS.
        path: the annotation file or folder (unused by "toy").
        video_root: folder video paths are relative to; default the annotation file's folder.
        limit: keep the first N items.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset format {name!r}; formats: {sorted(DATASETS)}")
    path = Path(path) if path is not None else None
    if path is not None and not path.exists():
        raise FileNotFoundError(f"{name} annotations not found: {path}")
    try:
        items = DATASETS[name](path, Path(video_root) if video_root else None)
    except (KeyError, TypeError, AttributeError, IndexError, json.JSONDecodeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} is not a {name} annotation file ({what}); see tokreduce.eval.datasets") from e
    if not items:
        raise ValueError(f"{name} {path or ''}: no items to evaluate")
    seen: set[str] = set()
    duplicates = [it.id for it in items if it.id in seen or seen.add(it.id)]
    if duplicates:
        raise ValueError(f"{name} {path}: duplicate item ids {duplicates[:5]}; ids must be unique so runs can resume")
    return items[:limit] if limit is not None else items


def answer_letter(answer, options: list[str]) -> tuple[str | None, str | None]:
    """Normalise a ground-truth answer to a letter.

    Accepts a letter ("B", "(B)", "B."), a 0-based index (int or digit string) or the option text.

    Returns:
        (letter, None), or (None, error reason) when the answer matches no option.
    """
    n = len(options)
    if answer is None:
        return None, None
    if isinstance(answer, bool):
        return None, f"unknown_option: answer {answer!r} is not an option"
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        i = int(answer)
        if 0 <= i < n:
            return LETTERS[i], None
        return None, f"unknown_option: answer index {i} out of range for {n} options"
    text = str(answer).strip()
    stripped = [_strip_letter(o) for o in options]
    if text in options or text in stripped:
        i = options.index(text) if text in options else stripped.index(text)
        return LETTERS[i], None
    m = re.fullmatch(r"\(?([A-Z])[).:]?", text)
    if m and LETTERS.index(m.group(1)) < n:
        return m.group(1), None
    return None, f"unknown_option: answer {text!r} is not one of {n} options"


def _strip_letter(option: str) -> str:
    """ "A. red" / "(A) red" -> "red"."""
    return re.sub(r"^\(?[A-Z][).:]\s*", "", str(option).strip())


def _make_item(id, video, root: Path, question, options, answer, start=None, end=None, **kw) -> QAItem:
    options = [_strip_letter(o) for o in options]
    letter, error = answer_letter(answer, options)
    if len(options) < 2:
        error = f"unknown_option: {len(options)} option(s); a multiple-choice item needs at least 2"
    start, end = _seconds(start), _seconds(end)
    problem = time_range_problem(start, end)
    if problem:
        error = f"bad_time_range: {problem}"
    path = Path(video)
    if not path.is_absolute():
        path = root / path
    return QAItem(
        id=str(id),
        video=str(path),
        question=str(question).strip(),
        options=options,
        answer=letter,
        start=start,
        end=end,
        error=error,
        **kw,
    )


def _seconds(value):
    """A clip bound from an annotation: None when absent, a float when numeric, else the value as text
    (so that the item reports it as ``bad_time_range`` instead of loading failing)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


@register_dataset("jsonl")
def load_jsonl(path: Path, video_root: Path | None = None) -> list[QAItem]:
    root = video_root or path.parent
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected one JSON object per line, got a {type(row).__name__}")
            video = row.get("video", row.get("media"))
            options = row.get("options", row.get("candidates"))
            missing = [
                k for k, v in (("video", video), ("question", row.get("question")), ("options", options)) if v is None
            ]
            if missing:
                raise ValueError(
                    f"{path}:{n}: missing field(s) {missing}; see tokreduce.eval.datasets for the jsonl format"
                )
            media_type = row.get("media_type", "video")
            if media_type not in ("video", "image"):
                raise ValueError(f"{path}:{n}: media_type must be 'video' or 'image', got {media_type!r}")
            items.append(
                _make_item(
                    row.get("id", f"{path.stem}-{n}"),
                    video,
                    root,
                    row["question"],
                    options,
                    row.get("answer"),
                    category=str(row.get("category", row.get("task", ""))),
                    media_type=media_type,
                    start=row.get("start"),
                    end=row.get("end"),
                )
            )
    return items


@register_dataset("toy")
def load_toy(path: Path | None = None, video_root: Path | None = None) -> list[QAItem]:
    try:
        from .. import toy
    except ImportError as e:
        raise ImportError("the toy dataset needs tokreduce.toy, which this installation lacks") from e
    items = load_jsonl(Path(path) if path else toy.data_path(), video_root)
    return [it for it in items if it.media_type == "video"]


@register_dataset("mvbench")
def load_mvbench(path: Path, video_root: Path | None = None) -> list[QAItem]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no MVBench task files (*.json) in {path}")
    items = []
    for file in files:
        with open(file) as f:
            rows = json.load(f)
        root = video_root or file.parent
        for i, row in enumerate(rows):
            bound = row.get("bound", True)
            items.append(
                _make_item(
                    row.get("id", f"{file.stem}-{i}"),
                    row["video"],
                    root,
                    row["question"],
                    row["candidates"],
                    row["answer"],
                    category=file.stem,
                    start=row.get("start") if bound else None,
                    end=row.get("end") if bound else None,
                )
            )
    return items


@register_dataset("videomme")
def load_videomme(path: Path, video_root: Path | None = None) -> list[QAItem]:
    root = video_root or path.parent
    items = []
    for row in _read_rows(path):
        items.append(
            _make_item(
                row["question_id"],
                f"{row['videoID']}.mp4",
                root,
                row["question"],
                list(row["options"]),
                row["answer"],
                category=str(row.get("task_type", "")),
                extra={k: row[k] for k in ("duration", "domain", "sub_category") if k in row},
            )
        )
    return items


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(f"reading {path} needs pandas and pyarrow: pip install pandas pyarrow") from e
        return pd.read_parquet(path).to_dict("records")
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path) as f:
        return json.load(f)


@register_dataset("nextqa")
def load_nextqa(path: Path, video_root: Path | None = None) -> list[QAItem]:
    root = video_root or path.parent
    mapping: dict[str, str] = {}
    for candidate in (path.parent / "map_vid_vidorID.json", root / "map_vid_vidorID.json"):
        if candidate.is_file():
            with open(candidate) as f:
                mapping = json.load(f)
            break
    items = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            options = [row[k] for k in sorted(k for k in row if re.fullmatch(r"a\d+", k))]
            video = mapping.get(row["video"], row["video"])
            items.append(
                _make_item(
                    f"{row['video']}-{row['qid']}",
                    f"{video}.mp4",
                    root,
                    row["question"],
                    options,
                    int(row["answer"]),
                    category=row.get("type", ""),
                )
            )
    return items


@register_dataset("egoschema")
def load_egoschema(path: Path, video_root: Path | None = None) -> list[QAItem]:
    root = video_root or path.parent
    with open(path) as f:
        rows = json.load(f)
    answers = {}
    answer_file = path.parent / "subset_answers.json"
    if answer_file.is_file():
        with open(answer_file) as f:
            answers = json.load(f)
    items = []
    for row in rows:
        options = [
            row[k] for k in sorted((k for k in row if re.fullmatch(r"option \d+", k)), key=lambda k: int(k.split()[1]))
        ]
        answer = row.get("answer", answers.get(row["q_uid"]))
        items.append(
            _make_item(
                row["q_uid"], f"{row['q_uid']}.mp4", root, row["question"], options, answer, category="egoschema"
            )
        )
    return items
