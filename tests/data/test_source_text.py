"""The byte corpus of Python source: per-byte token categories, the split by file, the windows."""

import hashlib
import json
import tokenize

import numpy as np
import pytest
import torch

from moekit.data.source_text import (
    STDLIB_SKIPPED_DIRS,
    in_validation,
    stdlib_corpus,
    stdlib_files,
    text_corpus,
)
from moekit.data.token_categories import CATEGORIES, label_byte_classes, label_python
from moekit.exceptions import DataError

# A worked example: each piece of source and the category of every one of its bytes.
SNIPPET = [
    ("# café ☕ 🙂", "comment"), ("\n", "newline"),
    ("def", "keyword"), (" ", "whitespace"), ("café", "name"), ("(", "operator"),
    ("x", "name"), (")", "operator"), (":", "operator"), ("\n", "newline"),
    ("    ", "whitespace"), ('"""doc é', "string"), ("\n", "newline"),  # a newline in a string
    ('    🙂"""', "string"), ("\n", "newline"),
    ("    ", "whitespace"), ("match", "name"), (" ", "whitespace"), ("=", "operator"),  # soft
    (" ", "whitespace"), ("x", "name"), (" ", "whitespace"), ("+", "operator"),
    (" ", "whitespace"), ("\\", "whitespace"), ("\n", "newline"),  # a line continuation
    ("        ", "whitespace"), ("0x1F", "number"), (" ", "whitespace"), ("if", "keyword"),
    (" ", "whitespace"), ("x", "name"), (" ", "whitespace"), ("else", "keyword"),
    (" ", "whitespace"), ("1.5e3", "number"), ("\n", "newline"),
    ("\n", "newline"),  # a blank line (NL)
    ("    ", "whitespace"), ('f"""é{x}', "string"), ("\n", "newline"), ('🙂"""', "string"),
    ("\n", "newline"),
    ("    ", "whitespace"), ("return", "keyword"), (" ", "whitespace"),
    ("f'{match!r:>{x}}é🙂'", "string"), (" ", "whitespace"), ("+", "operator"),
    (" ", "whitespace"), ("'é🙂'", "string"), ("  ", "whitespace"), ("# ünï 🙂", "comment"),
    ("\r\n", "newline"),
    ("None", "keyword"), ("\n", "newline"),
]


def expand(pieces):
    """The bytes of ``pieces`` and the category id of each byte."""
    data = "".join(text for text, _ in pieces).encode()
    ids = [CATEGORIES.index(c) for text, c in pieces for _ in text.encode()]
    return data, np.array(ids, dtype=np.uint8)


def names(labels):
    return [CATEGORIES[i] for i in labels]


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def modules(n):
    """n small distinct Python files, m00.py ... ."""
    return {f"m{i:02d}.py": f"x{i} = {i}  # file {i}\n" * (i + 1) for i in range(n)}


def test_categories_of_a_snippet_byte_by_byte():
    data, expected = expand(SNIPPET)
    got = label_python(data)
    assert len(got) == len(data)
    assert names(got) == names(expected)


def test_byte_order_mark_and_a_non_ascii_name_shift_later_tokens():
    data, expected = expand([("x", "name"), (" ", "whitespace"), ("=", "operator"),
                             (" ", "whitespace"), ("'é'", "string"), ("\n", "newline")])
    got = label_python(b"\xef\xbb\xbf" + data)
    assert names(got) == ["whitespace"] * 3 + names(expected)  # the mark is covered by no token


def test_byte_classes_of_a_file_that_does_not_tokenize():
    data = b"ab_1 +\t\n\xc3\xa9\x01"
    assert names(label_byte_classes(data)) == [
        "name", "name", "name", "number", "whitespace", "operator", "whitespace", "newline",
        "other", "other", "other"]  # é is two bytes >= 0x80; 0x01 is a control byte


@pytest.mark.parametrize("source", [
    b'x = """never closed\n',  # TokenError: EOF in multi-line string
    b"if x:\n        y\n    z\n",  # IndentationError: unindent does not match
])
def test_a_file_that_does_not_tokenize_is_labelled_by_byte_class(tmp_path, source):
    with pytest.raises((tokenize.TokenError, SyntaxError)):
        label_python(source)
    good = {name: text for name, text in modules(12).items() if not in_validation(name, 0.5)}
    write(tmp_path, {**good, "broken.py": source})
    corpus = text_corpus(tmp_path, validation_fraction=0.0)
    train = corpus.splits["train"]
    assert corpus.record["splits"]["train"]["byte_class_files"] == ["broken.py"]
    start = train.file_starts[train.files.index("broken.py")]
    np.testing.assert_array_equal(train.category_N[start:start + len(source)],
                                  label_byte_classes(source))


def test_split_is_by_file_deterministic_and_stable_when_a_file_is_added(tmp_path):
    files = modules(20)
    corpus = text_corpus(write(tmp_path, files), validation_fraction=0.3)
    for split in ("train", "validation"):
        part = corpus.splits[split]
        assert list(part.files) == sorted(f for f in files if in_validation(f, 0.3) == (
            split == "validation"))
        # each file whole, at its start offset, in sorted order
        for name, start in zip(part.files, part.file_starts, strict=True):
            text = files[name].encode()
            assert part.data_N[start:start + len(text)].tobytes() == text
        assert len(part) == sum(len(files[f]) for f in part.files)
    assert set(corpus.splits["train"].files).isdisjoint(corpus.splits["validation"].files)
    write(tmp_path, {"zz_new.py": "y = 2\n", "a_new.py": "z = 3\n"})
    again = text_corpus(tmp_path, validation_fraction=0.3)
    for split in ("train", "validation"):
        assert set(corpus.splits[split].files) <= set(again.splits[split].files)


def test_in_validation_is_a_hash_of_the_path():
    # sha256("json/decoder.py")[:8] as an integer, modulo 1000
    digest = hashlib.sha256(b"json/decoder.py").digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    assert in_validation("json/decoder.py", (bucket + 1) / 1000)
    assert not in_validation("json/decoder.py", bucket / 1000)
    share = np.mean([in_validation(f"pkg/m{i}.py", 0.2) for i in range(2000)])
    assert 0.17 < share < 0.23


def test_split_record_is_json_and_checks_the_data(tmp_path):
    files = modules(12)
    corpus = text_corpus(write(tmp_path, files), validation_fraction=0.5)
    record = json.loads(json.dumps(corpus.record))
    assert record["root"] == str(tmp_path.resolve()) and record["source"] == "paths"
    assert record["categories"] == list(CATEGORIES)
    for split in ("train", "validation"):
        entry, part = record["splits"][split], corpus.splits[split]
        assert entry["files"] == [[f, len(files[f])] for f in part.files]
        joined = "".join(files[f] for f in part.files).encode()
        assert entry["sha256"] == hashlib.sha256(joined).hexdigest()
        assert entry["bytes"] == len(joined) and entry["byte_class_files"] == []
    corpus.check_record(record)
    record["splits"]["validation"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match="the validation bytes differ from the record's"):
        corpus.check_record(record)


def test_max_bytes_takes_whole_files_in_hash_order(tmp_path):
    files = modules(12)
    full = text_corpus(write(tmp_path, files), validation_fraction=0.0)
    capped = text_corpus(tmp_path, validation_fraction=0.0, max_bytes=200)
    kept = capped.splits["train"].files
    assert 0 < len(capped.splits["train"]) <= 200 and len(kept) < len(full.splits["train"].files)
    assert capped.record["max_bytes"] == 200
    assert capped.record["splits"] == text_corpus(tmp_path, validation_fraction=0.0,
                                                  max_bytes=200).record["splits"]


def test_batch_shapes_shift_and_reproducibility(tmp_path):
    corpus = text_corpus(write(tmp_path, modules(12)), validation_fraction=0.5)
    x_BT, y_BT = corpus.batch("train", 5, 7, torch.Generator().manual_seed(3))
    assert x_BT.shape == y_BT.shape == (5, 7) and x_BT.dtype == y_BT.dtype == torch.int64
    data_N = torch.from_numpy(corpus.splits["train"].data_N).long()
    starts_B = torch.randint(0, len(data_N) - 7, (5,), generator=torch.Generator().manual_seed(3))
    for b, start in enumerate(starts_B.tolist()):  # windows of the concatenated split
        assert torch.equal(x_BT[b], data_N[start:start + 7])
        assert torch.equal(y_BT[b], data_N[start + 1:start + 8])  # the next byte
    again = corpus.batch("train", 5, 7, torch.Generator().manual_seed(3))
    other = corpus.batch("train", 5, 7, torch.Generator().manual_seed(4))
    assert torch.equal(again[0], x_BT) and not torch.equal(other[0], x_BT)


def test_windows_predict_every_validation_byte_once(tmp_path):
    corpus = text_corpus(write(tmp_path, modules(12)), validation_fraction=0.5)
    part = corpus.splits["validation"]
    batches = list(corpus.windows("validation", 16, batch_size=4))
    n_windows, tail = divmod(len(part) - 1, 16)
    assert tail and all(x.shape == (4, 16) for x, _, _ in batches[:n_windows // 4])
    assert batches[-1][0].shape == (1, tail)  # the remainder, one short window
    x = torch.cat([x_BT.flatten() for x_BT, _, _ in batches])
    y = torch.cat([y_BT.flatten() for _, y_BT, _ in batches])
    cat = torch.cat([c_BT.flatten() for _, _, c_BT in batches])
    assert torch.equal(x, torch.from_numpy(part.data_N[:-1]).long())
    assert torch.equal(y, torch.from_numpy(part.data_N[1:]).long())
    assert torch.equal(cat, torch.from_numpy(part.category_N[1:]).long())
    assert sum(x_BT.shape[0] for x_BT, _, _ in batches) == n_windows + 1


def test_errors_name_the_parameter_the_value_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"paths='.*nope' does not exist; pass an existing"):
        text_corpus(tmp_path / "nope")
    write(tmp_path / "hidden", {".secret": "x\n"})
    with pytest.raises(DataError, match=r"paths='.*hidden' holds no files .*; pass a folder"):
        text_corpus(tmp_path / "hidden")
    write(tmp_path / "blank", {"a.py": "", "b.py": ""})
    with pytest.raises(DataError, match=r"the 2 files under .* are all empty; pass files with"):
        text_corpus(tmp_path / "blank")
    write(tmp_path / "mixed", {"a.py": "x = 1\n", "logo.png": b"\x89PNG\x00\x01"})
    with pytest.raises(DataError, match=r"logo.png' holds NUL bytes, so it is binary.*pass paths "
                                        "as a list of the text files only"):
        text_corpus(tmp_path / "mixed")
    with pytest.raises(DataError, match=r"has 6 bytes, more than max_bytes=3; pass max_bytes >= 6"):
        text_corpus(tmp_path / "mixed" / "a.py", max_bytes=3)
    with pytest.raises(ValueError, match=r"max_bytes must be an integer >= 1; got max_bytes=0"):
        text_corpus(tmp_path / "mixed" / "a.py", max_bytes=0)
    with pytest.raises(ValueError, match=r"validation_fraction must be a number in \[0, 1\); got "
                                         r"validation_fraction=1.5"):
        text_corpus(tmp_path / "mixed" / "a.py", validation_fraction=1.5)
    name = next(f"t{i}.py" for i in range(100) if not in_validation(f"t{i}.py", 0.1))
    write(tmp_path / "one", {name: "x = 1\n"})
    with pytest.raises(DataError, match=r"the validation split is empty.*validation_fraction=0.1"
                                        r"\); pass more files"):
        text_corpus(tmp_path / "one")
    corpus = text_corpus(tmp_path / "one", validation_fraction=0.0)
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'validation'; got "
                                         r"split='valid'"):
        corpus.batch("valid", 2, 3)
    with pytest.raises(ValueError, match=r"seq_len must be below the train split's length \(6 "
                                         r"bytes\); got seq_len=6. Pass a smaller seq_len"):
        corpus.batch("train", 2, 6)


def test_real_stdlib_files():
    root, files = stdlib_files()
    assert "json/decoder.py" in files and files == sorted(files)
    assert not any(set(f.split("/")[:-1]) & set(STDLIB_SKIPPED_DIRS) for f in files)
    corpus = stdlib_corpus(max_bytes=150_000, validation_fraction=0.5)
    assert corpus.record["root"] == str(root) and corpus.record["source"] == "stdlib"
    counts = np.bincount(corpus.splits["train"].category_N, minlength=len(CATEGORIES))
    assert (counts[:8] > 0).all()  # every category but other appears in real code
