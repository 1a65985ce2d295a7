"""Seeded random mutations of JSON documents (request bodies, manifests) for the hardening tests.

``mutations(document, seed, count)`` yields ``(description, text)``: the document serialized after one to
three random edits at random places — a value replaced by a hostile one (wrong types, huge, tiny, negative,
non-finite and over-long numbers written as raw JSON text, long strings, deep nesting, paths that climb
out), a key deleted, an unknown key added, a container emptied, wrapped or made the top level.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any


class Raw:
    """JSON text put into the output as is (``1e400``, ``NaN``, a 400-digit integer, broken syntax)."""

    def __init__(self, text: str):
        self.text = text


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 2, -(2**31), 2**31, 2**63, 2**64 + 1, 10**30, -(10**30), 0.5, -0.5, 5e-324,
    1e308, -1e308, 1.0000001, "", " ", "x", "NaN", "1e400", "0x10", "-1", "../../../../etc/passwd", "/etc/passwd",
    "/dev/zero", "file:///etc/passwd", "http://169.254.169.254/", "data:image/png;base64,@@@", "\u0000", "\ud7ff" * 3,
    "a" * 5000, "9" * 400, [], {}, [None], [1, 2, 3], {"a": 1}, {"type": "image"}, {"type": "volume"},
    [{"type": "text"}], _deep(70), {"": {"": {"": {}}}},
    Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("9" * 400), Raw("-" + "9" * 400),
    Raw("9" * 5000), Raw("1" + "0" * 4300), Raw("1e-400"), Raw("0.0000000000000000000000001"), Raw("[" * 100_000),
    Raw("{" * 5000), Raw("1.5e309"),
]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a node (the root is ())."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def _edit(document: Any, rng: random.Random) -> tuple[Any, str]:
    paths = _paths(document)
    path = rng.choice(paths)
    hostile = copy.deepcopy(rng.choice(HOSTILE))
    shown = hostile.text[:20] if isinstance(hostile, Raw) else repr(hostile)[:40]
    if not path:
        return hostile, f"root = {shown}"
    parent, key = _get(document, path[:-1]), path[-1]
    action = rng.random()
    where = "/".join(map(str, path))
    if action < 0.6:
        parent[key] = hostile
        return document, f"{where} = {shown}"
    if action < 0.75:
        del parent[key]
        return document, f"delete {where}"
    if action < 0.85:
        target = _get(document, path)
        if isinstance(target, dict):
            target[rng.choice(["unknown", "", "__proto__", "files", "path", "type"])] = hostile
            return document, f"{where} += key {shown}"
        parent[key] = [target]
        return document, f"{where} wrapped in a list"
    if action < 0.95:
        target = _get(document, path)
        parent[key] = type(target)() if isinstance(target, dict | list | str) else str(target)
        return document, f"{where} emptied/stringified"
    return _get(document, path), f"root = {where}"


def serialize(document: Any) -> str:
    """JSON text with every ``Raw`` value spliced in as written."""
    raws: list[str] = []

    def default(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\u0001RAW{len(raws) - 1}\u0001"
        raise TypeError(type(value).__name__)

    text = json.dumps(document, default=default)
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\u0001RAW{index}\u0001"), raw)
    return text


def mutations(document: Any, seed: int, count: int) -> Iterator[tuple[str, str]]:
    """``count`` mutated copies of ``document`` as ``(description, JSON text)``, reproducible from ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        mutated = copy.deepcopy(document)
        steps = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            if isinstance(mutated, Raw):
                break
            mutated, step = _edit(mutated, rng)
            steps.append(step)
        yield "; ".join(steps), serialize(mutated)
