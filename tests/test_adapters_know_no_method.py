"""Adapters serve what a method declares (tokreduce.stages) and never name a method.

Every registered reducer's name, class, paper alias and module is looked up in every file of adapters/: in
code, strings, comments and docstrings alike, so that adding a method never needs an adapter change.
Three registered names are ordinary words ("random", "uniform", "pool"); for those only a quoted string
and the capitalised alias count.
"""

import re
from pathlib import Path

import tokreduce
from tokreduce.registry import list_reducers, reducer_class

ADAPTERS = Path(__file__).parents[1] / "adapters"
ORDINARY_WORDS = {"random", "uniform", "pool"}


def forbidden() -> list[tuple[str, re.Pattern]]:
    patterns = [("the methods package", re.compile(r"tokreduce\.methods|from \.+methods\b"))]
    for name in list_reducers():
        cls = reducer_class(name)
        aliases = [alias for alias in dir(tokreduce) if getattr(tokreduce, alias) is cls]
        for word in {cls.__name__, *aliases}:
            patterns.append((word, re.compile(rf"\b{re.escape(word)}\b")))
        patterns.append(
            (cls.__module__, re.compile(re.escape(cls.__module__.rsplit(".", 1)[-1]) + r"\b(?=\s+import|\.)"))
        )
        patterns.append((f'"{name}"', re.compile(rf"[\"']{re.escape(name)}[\"']")))
        if name not in ORDINARY_WORDS:
            patterns.append((name, re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)))
    return patterns


def test_adapters_name_no_method():
    found = []
    patterns = forbidden()
    for path in sorted(ADAPTERS.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in patterns:
                if pattern.search(line):
                    found.append(f"{path.name}:{number}: {what}: {line.strip()}")
    assert not found, "adapters name methods:\n" + "\n".join(found)


def test_the_check_sees_a_method_name():
    """The patterns catch what they are for (a test that cannot fail would prove nothing)."""
    patterns = forbidden()
    for line in (
        "if reducer.name == 'dycoke':",
        "from tokreduce.methods.tome import parse_r",
        "isinstance(r, ToMeReducer)",
        "# VisionZip scores",
        'name == "random"',
        "FastV(keep=0.5)",
    ):
        assert any(p.search(line) for _, p in patterns), line
