"""Annotation files, input paths and queries; the whole bad-input corpus, row by row."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amodal.annotations import Row, iter_annotations, read_annotations, resolve_input, validate_query
from amodal.images import InvalidInput, load_image, load_mask
from tests import badinputs as bad
from tests.paths import EXAMPLES

PAPER = EXAMPLES
PAPER_QUERIES = ["spray paint can", "bird", "camera", "ice cream cone", "cat", "calculator", "potato"]


def outcome(row: Row, images: Path) -> tuple[str, str, np.ndarray | None]:
    """What reading one row gives under the corpus limits: ("ok", "", image) or ("invalid", message, None)."""
    limits = bad.LIMITS
    try:
        if row.error:
            raise InvalidInput(row.error)
        validate_query(row.query, limits["max_query_chars"])
        image = load_image(resolve_input(images, row.image).read_bytes(),
                           max_pixels=limits["max_pixels"], min_side=limits["min_side"])
        if row.visible_mask:
            mask_path = resolve_input(images, row.visible_mask, "visible mask")
            load_mask(mask_path.read_bytes(), image.shape[:2])
    except InvalidInput as exc:
        return "invalid", str(exc), None
    return "ok", "", image


def test_bad_corpus_every_row(tmp_path):
    annotations, expected = bad.write_bad_corpus(tmp_path)
    rows = read_annotations(annotations)
    assert [row.line for row in rows] == [e["line"] for e in expected]
    assert {e["kind"] for e in expected} == {"ok", "invalid"}
    for row, want in zip(rows, expected):
        kind, message, image = outcome(row, tmp_path / bad.IMAGES)
        assert (kind, row.line) == (want["kind"], want["line"]), message
        assert want["message"] in message, (row, message)
        if kind == "ok":
            assert image.dtype == np.uint8 and image.shape == (*want["shape"], 3), row


def test_corpus_rows_carry_what_the_file_says(tmp_path):
    annotations, _ = bad.write_bad_corpus(tmp_path)
    rows = {row.line: row for row in read_annotations(annotations)}
    assert 2 not in rows  # the blank line
    assert rows[1] == Row(1, "good.png", "red block", None, None)
    assert rows[3].query == "  red block  "  # stripping is validate_query's job
    assert rows[14].visible_mask == "mask255.png" and rows[14].error is None
    assert rows[17].visible_mask is None and rows[17].error is None  # null mask, extra key
    malformed = [row for row in rows.values() if row.error]
    assert all(row.error.startswith(f"line {row.line}") for row in malformed)
    assert [row.line for row in malformed] == list(range(40, 46))


def test_paper_annotation_file():
    source = PAPER / "example_annotation.json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(source.read_text())  # the released file has a trailing comma
    rows = read_annotations(source)
    assert [row.line for row in rows] == list(range(1, 8))
    assert [row.query for row in rows] == PAPER_QUERIES
    assert all(row.image.startswith("images_example/") and row.error is None and row.visible_mask is None
               for row in rows)
    # the folder users pass holds the images directly: each row falls back to its base name
    for row in rows:
        path = resolve_input(PAPER / "images", row.image)
        assert path == (PAPER / "images" / Path(row.image).name).resolve() and path.is_file()


def test_paper_format_with_filename_list(tmp_path):
    names = [f"images_example/{n}.jpg" for n in ("a", "b", "c")]
    doc = {"annotations": [{"filename": names[0], "labels": ["cat", "dog"]},
                           {"filename": names[1], "labels": ["cup"]},
                           {"filename": names[0], "labels": ["mat"]},
                           {"filename": names[2], "labels": ["sofa"]}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "list.txt").write_text(f"{names[2]}\n\n{names[0]}\nimages_example/none.jpg\n")
    rows = read_annotations(tmp_path / "a.json", tmp_path / "list.txt")
    assert [(r.line, r.image, r.query) for r in rows] == [
        (1, names[2], "sofa"), (2, names[0], "cat"), (3, names[0], "dog"), (4, names[0], "mat"),
        (5, "images_example/none.jpg", "")]
    assert [r.error for r in rows[:4]] == [None] * 4
    assert rows[4].error == "no annotation for listed file images_example/none.jpg"
    # the paper's own pair of files
    paper = read_annotations(PAPER / "example_annotation.json", PAPER / "img_filenames_example.txt")
    assert [row.query for row in paper] == PAPER_QUERIES
    with pytest.raises(InvalidInput, match="filename list holds no queries"):
        read_annotations(PAPER / "img_filenames_example.txt")


def test_malformed_paper_entries_become_error_rows(tmp_path):
    doc = {"annotations": [{"filename": "a.jpg", "labels": ["cat"]},
                           "not an entry",
                           {"labels": ["dog"]},
                           {"filename": "b.jpg", "labels": "cup"},
                           {"filename": "c.jpg", "labels": []},
                           {"filename": "d.jpg", "labels": ["mat", 5, "rug"]}],
           "statistics": {"total_labels": 4}}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc, indent=2))
    rows = read_annotations(path)
    assert [(r.line, r.image, r.query) for r in rows] == [
        (1, "a.jpg", "cat"), (2, "", ""), (3, "", ""), (4, "b.jpg", ""), (5, "c.jpg", ""),
        (6, "d.jpg", "mat"), (7, "d.jpg", ""), (8, "d.jpg", "rug")]
    assert [r.error for r in rows] == [
        None, "annotation 2 is not a JSON object", "annotation 3: 'filename' must be a non-empty string",
        "annotation 4 (b.jpg): 'labels' must be a list of strings", "annotation 5 (c.jpg) has no labels",
        None, "annotation 6 (d.jpg): label 2 is not a string", None]


def test_format_is_told_by_content_not_extension(tmp_path):
    paper = {"annotations": [{"filename": "x.png", "labels": ["cat"]}]}
    minified = tmp_path / "paper.jsonl"
    minified.write_text(json.dumps(paper))  # one line, named like JSONL
    assert read_annotations(minified) == [Row(1, "x.png", "cat")]
    jsonl = tmp_path / "rows.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"image": "x.png", "query": "cat"}\r\n\r\n{"image": "y.png", "query": "dog"}')
    assert read_annotations(jsonl) == [Row(1, "x.png", "cat"), Row(3, "y.png", "dog")]
    single = tmp_path / "single.json"
    single.write_text('{"image": "x.png", "query": "cat", "visible_mask": "m.png"}\n')
    assert read_annotations(single) == [Row(1, "x.png", "cat", "m.png")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert read_annotations(empty) == []


def test_unusable_files_are_refused_whole(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "annotations": [\n    {"filename": "x.png", "labels": ["cat"]\n  ]\n}\n')
    with pytest.raises(InvalidInput, match="broken.json: not an annotation file: invalid JSON"):
        read_annotations(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": []}, indent=2))
    with pytest.raises(InvalidInput, match="no annotations list"):
        read_annotations(other)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"image": "x.png", "query": "cat"}\n')
    with pytest.raises(InvalidInput, match="filename list goes with the paper's JSON format only"):
        read_annotations(jsonl, tmp_path / "list.txt")


def test_resolve_input(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (root / name).write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "inside_link.png").symlink_to(root / "sub" / "b.png")
    (root / "out_link.png").symlink_to(tmp_path / "secret.png")
    (root / "out_dir").symlink_to(tmp_path, target_is_directory=True)
    (root / "loop.png").symlink_to(root / "loop.png")
    real = root.resolve()
    assert resolve_input(root, "a.png") == real / "a.png"
    assert resolve_input(root, "./sub/b.png") == real / "sub" / "b.png"
    assert resolve_input(root, "inside_link.png") == real / "sub" / "b.png"
    assert resolve_input(root, "elsewhere/a.png") == real / "a.png"  # base-name fallback
    refusals = {
        "/etc/hostname": "image path must be relative to the images folder: /etc/hostname",
        str(tmp_path / "secret.png"): "must be relative to the images folder",
        "../secret.png": "image path must not contain '..': ../secret.png",
        "sub/../../secret.png": "must not contain '..'",
        "out_link.png": "image path leads outside the images folder: out_link.png",
        "out_dir/secret.png": "leads outside the images folder",
        "elsewhere/out_link.png": "leads outside the images folder",  # the fallback is checked too
        "sub": "image is not a file: sub",
        "loop.png": "image path cannot be used: loop.png",
        "x" * 300 + ".png": "image path cannot be used",
        "": "image path is empty",
        "a\0.png": "NUL character",
        "nothing.png": "image not found: nothing.png",
        "sub/nothing.png": "image not found: sub/nothing.png",
    }
    for relative, message in refusals.items():
        with pytest.raises(InvalidInput) as info:
            resolve_input(root, relative)
        assert message in str(info.value), relative
    with pytest.raises(InvalidInput, match="^visible mask not found: m.png$"):
        resolve_input(root, "m.png", "visible mask")


def test_validate_query():
    assert validate_query("  a red cup \n", 64) == "a red cup"
    assert validate_query("x" * 64, 64) == "x" * 64
    assert validate_query("čaša, 杯子 🙂", 64) == "čaša, 杯子 🙂"
    refusals = {
        "": "query is empty",
        " \t\n ": "query is empty",
        "x" * 65: "query is too long: 65 characters, over the limit of 64",
        "red\tcup": "control character (U+0009)",
        "red\x00cup": "control character (U+0000)",
        "red\x7fcup": "control character (U+007F)",
        "red\ud800cup": "control character (U+D800)",
    }
    for query, message in refusals.items():
        with pytest.raises(InvalidInput) as info:
            validate_query(query, 64)
        assert message in str(info.value), repr(query)


def test_paper_format_gives_the_first_label_only_unless_all_labels(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"annotations": [{"filename": "a.jpg", "labels": ["cat", "dog"]},
                                                {"filename": "b.jpg", "labels": ["cup"]}]}))
    assert [(r.image, r.query) for r in read_annotations(path, all_labels=False)] == [("a.jpg", "cat"), ("b.jpg", "cup")]
    assert [r.query for r in read_annotations(path)] == ["cat", "dog", "cup"]
    total, rows = iter_annotations(path, all_labels=False)
    assert total == 2 and [r.query for r in rows] == ["cat", "cup"]
