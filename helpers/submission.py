"""Submission files: the dict and list formats, conversion, validation, atomic saving.

- dict: ``{"query.jpg": ["g1.jpg", "g2.jpg", ...]}`` (what the course server takes)
- list: ``[{"filename": "query.jpg", "samples": ["g1.jpg", ...]}, ...]``
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .fileio import write_json

FORMATS = ("dict", "list")
Rankings = dict[str, list[str]]


class SubmissionError(Exception):
    """A submission file that cannot be read as either format."""


def _names(names: Any, where: str) -> list[str]:
    """``names`` as a list of strings, or :class:`SubmissionError` naming ``where`` and the position of a non-string."""
    if not isinstance(names, list):
        raise SubmissionError(f"{where} must be a list of gallery names, not {_kind(names)}")
    for position, name in enumerate(names):
        if not isinstance(name, str):
            raise SubmissionError(f"{where}, position {position}: gallery names must be strings, got "
                                  f"{_what(name)}")
    return list(names)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _what(value: Any) -> str:
    """``value``'s JSON kind and a short preview of it, e.g. ``int 5``, ``null``, ``list (a list of 3 item(s))``."""
    return f"{_kind(value)} {_preview(value)}".rstrip()


def _preview(value: Any, limit: int = 40) -> str:
    """A short text of ``value`` that never walks a deep structure (a nested list shows as its type only)."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return f"(a {type(value).__name__} of {len(value)} item(s))"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_submission(raw: Any) -> Rankings:
    """Accept either format (already parsed from JSON) and return the dict format.

    Every query and gallery name must be a string: ``null``, numbers, booleans, NaN and lists are refused with
    their position (they are never turned into text such as ``"None"``).
    """
    if isinstance(raw, dict):
        rankings: Rankings = {}
        for query, names in raw.items():
            if not isinstance(query, str):
                raise SubmissionError(f"query names must be strings, got {_what(query)}")
            rankings[query] = _names(names, f"entry {query!r}")
        return rankings
    if isinstance(raw, list):
        rankings = {}
        for position, item in enumerate(raw):
            if not isinstance(item, dict) or "filename" not in item or "samples" not in item:
                raise SubmissionError(
                    f"list entry {position} must be an object with 'filename' and 'samples', got {_what(item)}"
                )
            query = item["filename"]
            if not isinstance(query, str):
                raise SubmissionError(f"list entry {position}: 'filename' must be a string, got "
                                      f"{_what(query)}")
            if query in rankings:
                raise SubmissionError(f"query {query!r} appears twice in the list")
            rankings[query] = _names(item["samples"], f"list entry {position} ({query!r}): 'samples'")
        return rankings
    raise SubmissionError("a submission must be a JSON object {query: [names]} or a list of {filename, samples}")


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.load`: an object naming one key twice is refused (JSON would keep
    only the last value, silently dropping a ranking)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SubmissionError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def load_submission(path: str | os.PathLike) -> Rankings:
    """Read a submission file of either format as the dict format."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle, object_pairs_hook=_refuse_repeated_keys)
    except FileNotFoundError:
        raise SubmissionError(f"submission file not found: {path}") from None
    except SubmissionError as exc:
        raise SubmissionError(f"{path}: {exc}") from None
    except RecursionError:
        raise SubmissionError(f"cannot read submission {path}: the JSON is nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise SubmissionError(f"cannot read submission {path}: {exc}") from None
    try:
        return parse_submission(raw)
    except SubmissionError as exc:
        raise SubmissionError(f"{path}: {exc}") from None


def to_list_format(rankings: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """``{q: names}`` -> ``[{"filename": q, "samples": names}]`` in the same order."""
    return [{"filename": query, "samples": list(names)} for query, names in rankings.items()]


def save_submission(path: str | os.PathLike, rankings: Mapping[str, list[str]], fmt: str = "dict") -> Path:
    """Write ``rankings`` atomically in ``fmt`` (``dict`` or ``list``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    payload: Any = dict(rankings) if fmt == "dict" else to_list_format(rankings)
    return write_json(path, payload)


def validate_submission(
    rankings: Mapping[str, list[str]],
    k: int | None = 10,
    query_names: Iterable[str] | None = None,
    gallery_names: Iterable[str] | None = None,
) -> list[str]:
    """Problems with ``rankings``, one readable line each (empty list: valid).

    Checks every entry is a list of exactly ``k`` distinct, non-empty names; with ``query_names`` that every query
    is known and none is missing; with ``gallery_names`` that every ranked name is in the gallery.
    """
    problems: list[str] = []
    known_queries = set(query_names) if query_names is not None else None
    gallery = set(gallery_names) if gallery_names is not None else None
    if not rankings:
        problems.append("the submission has no query")
    for query, names in rankings.items():
        if not isinstance(query, str):
            problems.append(f"a query name is {_what(query)}, not a string")
        elif not query:
            problems.append("an entry has an empty query name")
        if not isinstance(names, list):
            problems.append(f"{query}: not a list of names")
            continue
        if k is not None and len(names) != k:
            problems.append(f"{query}: {len(names)} names, expected {k}")
        not_text = [f"position {i}: {_kind(n)}" for i, n in enumerate(names) if not isinstance(n, str)]
        if not_text:
            problems.append(f"{query}: {len(not_text)} name(s) not a string ({', '.join(not_text[:3])})")
            names = [n for n in names if isinstance(n, str)]
        empty = sum(1 for n in names if not n.strip())
        if empty:
            problems.append(f"{query}: {empty} empty name(s)")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"{query}: duplicate names {duplicates[:5]}")
        if gallery is not None:
            unknown = [n for n in names if n not in gallery]
            if unknown:
                problems.append(f"{query}: {len(unknown)} name(s) not in the gallery, e.g. {unknown[:3]}")
        if known_queries is not None and query not in known_queries:
            problems.append(f"{query}: not a known query")
    if known_queries is not None:
        missing = sorted(known_queries - set(rankings))
        if missing:
            problems.append(f"{len(missing)} query(ies) missing, e.g. {missing[:5]}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# The scores file: the similarity of each ranked name, beside its submission
# ----------------------------------------------------------------------------------------------------------------
def scores_sidecar_path(submission: str | os.PathLike) -> Path:
    """Where the similarities of a submission are kept: ``<name>.scores.json`` beside ``<name>.json``."""
    submission = Path(submission)
    return submission.with_name(f"{submission.stem}.scores.json")


def write_scores(path: str | os.PathLike, scores: Mapping[str, Iterable[float]]) -> Path:
    """Write ``{query: [similarity of each ranked name]}`` (rounded to 6 decimals; the file read by ``show``)."""
    return write_json(path, {q: [round(float(s), 6) for s in row] for q, row in scores.items()}, indent=None)


def load_scores(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read a scores file; a clear ValueError when it is not ``{query: [numbers]}``."""
    from .fileio import read_json

    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read scores file {path}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ValueError(f"scores file {path} must be a JSON object {{query: [similarities]}}")
    try:
        return {str(q): [float(s) for s in row] for q, row in raw.items()}
    except (TypeError, ValueError):
        raise ValueError(f"scores file {path}: every similarity must be a number") from None
