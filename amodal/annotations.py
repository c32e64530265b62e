"""Reading annotation files into rows, and checking the paths and queries they hold.

Two formats, told apart by content (not by file extension):

- The paper's released format: one JSON document
  ``{"annotations": [{"filename": ..., "labels": [query, ...]}, ...], "statistics": ...}``. Each
  (filename, label) pair is one row; a row's ``line`` is its 1-based position among the pairs.
  It is parsed with ``json`` and, where that fails, with ``json5`` (the released file has a
  trailing comma, which ``json`` rejects; ``json5`` is slow, so large files should be plain JSON).
  An optional filename list (one relative path per line, as the paper's
  ``img_filenames_example.txt``) may be given beside it: then it selects and orders the images,
  each listed file giving the rows of its entries, and a listed file with no entry gives an error
  row. A filename list alone holds no queries and is refused.
- JSONL: one ``{"image": ..., "query": ..., "visible_mask": ...}`` object per line
  (``visible_mask`` optional; other keys ignored). Blank lines are skipped; ``line`` is the line's
  number in the file. A malformed line becomes a row with ``error`` set and does not stop the others.

A file is read as one JSON document when it parses as one and holds an ``annotations`` list. A file
whose first non-blank line is a lone ``{`` or ``[`` (a pretty-printed document, never a JSONL row)
must be that, or it is refused as a whole; anything else is JSONL.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import json5

from amodal.images import InvalidInput

_DOCUMENT_STARTS = (b"{", b"[")


@dataclass(frozen=True)
class Row:
    """One input (image, query) pair; ``error`` is set for a malformed row, which still gets an outcome."""

    line: int
    image: str
    query: str
    visible_mask: str | None = None
    error: str | None = None


def read_annotations(path: Path, filenames: Path | None = None, all_labels: bool = True) -> list[Row]:
    """The rows of an annotation file (formats in the module docstring), in file order.

    ``filenames`` is the paper format's optional filename list; without ``all_labels`` a paper-format
    entry gives its first label only (as the paper's code reads it). Raises :class:`InvalidInput` when
    the file as a whole is unusable (a broken JSON document, no JSON at all).
    """
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = raw.splitlines()
    first = next((line.strip() for line in lines if line.strip()), None)
    document, problem = _parse_document(raw)
    if isinstance(document, dict) and "annotations" in document:
        listed = _read_filenames(filenames) if filenames else None
        return _paper_rows(document["annotations"], listed, path, all_labels)
    if filenames:
        raise InvalidInput(f"{path}: a filename list goes with the paper's JSON format only")
    if first is None:
        return []
    if first in _DOCUMENT_STARTS:
        raise InvalidInput(f"{path}: not an annotation file: {problem or 'no annotations list'}")
    if not any(line.lstrip().startswith(_DOCUMENT_STARTS) for line in lines):
        raise InvalidInput(f"{path}: not an annotation file: neither the paper's JSON format nor JSONL rows "
                           "(a filename list holds no queries: give it beside the annotation JSON)")
    return [_jsonl_row(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def iter_annotations(path: Path, all_labels: bool = True) -> tuple[int, Iterable[Row]]:
    """(row count, rows in file order). JSONL is streamed (one counting pass, then one reading pass);
    anything else goes through ``read_annotations`` whole, which also refuses what is not annotations."""
    with open(path, "rb") as f:
        first = next((line.strip().removeprefix(b"\xef\xbb\xbf") for line in f if line.strip()), b"")
    try:
        value = json.loads(first)
    except ValueError:
        value = None
    if not isinstance(value, dict) or "annotations" in value:
        rows = read_annotations(path, all_labels=all_labels)
        return len(rows), rows
    with open(path, "rb") as f:
        count = sum(1 for line in f if line.strip())

    def stream() -> Iterator[Row]:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                line = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line
                if line.strip():
                    yield _jsonl_row(number, line.rstrip(b"\r\n"))

    return count, stream()


def _parse_document(raw: bytes) -> tuple[Any, str | None]:
    """The file as one JSON value, or (None, why not)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    try:
        return json.loads(text), None
    except ValueError:
        pass
    try:
        return json5.loads(text), None
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"


def _read_filenames(path: Path) -> list[str]:
    try:
        text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: filename list is not UTF-8 text ({exc.reason})") from None
    return [name.strip() for name in text.splitlines() if name.strip()]


def _entry_pairs(index: int, entry: Any) -> tuple[str, list[tuple[str, str | None]]]:
    """An annotation entry's filename and its (query, error) pairs; malformed parts give error pairs."""
    where = f"annotation {index}"
    if not isinstance(entry, dict):
        return "", [("", f"{where} is not a JSON object")]
    filename, labels = entry.get("filename"), entry.get("labels")
    if not isinstance(filename, str) or not filename:
        return "", [("", f"{where}: 'filename' must be a non-empty string")]
    where = f"{where} ({filename})"
    if not isinstance(labels, list):
        return filename, [("", f"{where}: 'labels' must be a list of strings")]
    if not labels:
        return filename, [("", f"{where} has no labels")]
    return filename, [(label, None) if isinstance(label, str) else ("", f"{where}: label {k} is not a string")
                      for k, label in enumerate(labels, 1)]


def _paper_rows(entries: Any, listed: list[str] | None, path: Path, all_labels: bool) -> list[Row]:
    if not isinstance(entries, list):
        raise InvalidInput(f"{path}: 'annotations' must be a list")
    parsed = [_entry_pairs(index, entry) for index, entry in enumerate(entries, 1)]
    if not all_labels:
        parsed = [(name, queries[:1]) for name, queries in parsed]
    if listed is None:
        pairs = [(name, query, error) for name, queries in parsed for query, error in queries]
    else:
        by_name: dict[str, list[tuple[str, str | None]]] = {}
        for name, queries in parsed:
            by_name.setdefault(name, []).extend(queries)
        pairs = [(name, query, error) for name in listed
                 for query, error in by_name.get(name, [("", f"no annotation for listed file {name}")])]
    return [Row(line=number, image=name, query=query, error=error)
            for number, (name, query, error) in enumerate(pairs, 1)]


def _jsonl_row(number: int, raw: bytes) -> Row:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Row(number, "", "", error=f"line {number} is not UTF-8 text ({exc.reason})")
    except ValueError as exc:
        return Row(number, "", "", error=f"line {number} is not valid JSON: {exc}")
    if not isinstance(value, dict):
        return Row(number, "", "", error=f"line {number} is not a JSON object but a {type(value).__name__}")
    image, query, mask = value.get("image"), value.get("query"), value.get("visible_mask")
    problems = [f"missing '{key}'" if value.get(key) is None else
                f"'{key}' must be a string, not {type(value[key]).__name__}"
                for key in ("image", "query") if not isinstance(value.get(key), str)]
    if mask is not None and not (isinstance(mask, str) and mask):
        problems.append("'visible_mask' must be a non-empty string or null")
    return Row(number, image if isinstance(image, str) else "", query if isinstance(query, str) else "",
               mask if isinstance(mask, str) and mask else None,
               f"line {number}: " + "; ".join(problems) if problems else None)


def resolve_input(root: Path, relative: str, what: str = "image") -> Path:
    """The real path of input file ``relative`` under ``root``; ``what`` names it in messages.

    Refuses absolute paths, paths with a ``..`` part, and paths that lead outside ``root`` through
    symbolic links. When ``relative`` does not exist but its base name does directly under
    ``root``, that file is used: the paper's annotation file names its images
    ``images_example/<name>.jpg`` while the folder users pass holds ``<name>.jpg``.
    """
    if not relative.strip() or "\0" in relative:
        raise InvalidInput(f"{what} path is empty or holds a NUL character: {relative!r}")
    path = PurePosixPath(relative)
    if path.is_absolute():
        raise InvalidInput(f"{what} path must be relative to the images folder: {relative}")
    if ".." in path.parts:
        raise InvalidInput(f"{what} path must not contain '..': {relative}")
    base = root.resolve()
    candidates = [base / path] + ([base / path.name] if len(path.parts) > 1 else [])
    for candidate in candidates:
        try:
            if not (candidate.is_symlink() or candidate.exists()):
                continue
            real = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # name too long, symbolic link loop
            raise InvalidInput(f"{what} path cannot be used: {relative} ({exc})") from None
        if not real.is_relative_to(base):
            raise InvalidInput(f"{what} path leads outside the images folder: {relative}")
        if not real.is_file():
            raise InvalidInput(f"{what} is not a file: {relative}")
        return real
    raise InvalidInput(f"{what} not found: {relative}")


def validate_query(query: str, max_chars: int) -> str:
    """The query stripped of surrounding whitespace; refuses empty, over-long and control-character queries."""
    text = query.strip()
    if not text:
        raise InvalidInput("query is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"query is too long: {len(text)} characters, over the limit of {max_chars}")
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise InvalidInput(f"query holds a control character (U+{ord(bad):04X})")
    return text
