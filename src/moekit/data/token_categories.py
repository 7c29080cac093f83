"""Which category each byte of a Python file belongs to: the token categories a byte-level language
model is scored by, read by :mod:`tokenize` (:func:`label_python`), or by byte class alone for a
file that does not tokenize (:func:`label_byte_classes`).

Shape legend: N bytes of one file, K token spans.

The categories (:data:`CATEGORIES`, ids in that order):

- keyword: a NAME that :func:`keyword.iskeyword` accepts (``True``, ``None`` too). Soft keywords
  (``match``, ``case``, ``type``, ``_``) are names: tokenize cannot tell ``match x:`` from
  ``re.match``.
- name: any other NAME. operator: OP (operators, brackets, ``:``, ``,``, ``.``). number: NUMBER.
- string: STRING, and f-strings (t-strings) whole, from prefix to closing quote, replacement
  fields included: Python 3.12+ tokenizes their insides, 3.11 does not; the labels agree.
- comment: COMMENT (``#`` to the end of the line).
- whitespace: bytes no token covers except newlines: indentation, spaces between tokens, a line
  continuation's backslash, a UTF-8 byte order mark.
- newline: every ``\\n`` and ``\\r`` byte, wherever it is (NEWLINE, NL, inside a docstring too).
- other: ERRORTOKEN and any token type not named above.
"""

from __future__ import annotations

import io
import keyword
import string
import token
import tokenize
import warnings

import numpy as np

CATEGORIES = ("keyword", "name", "operator", "number", "string", "comment", "whitespace",
              "newline", "other")
KEYWORD, NAME, OPERATOR, NUMBER, STRING, COMMENT, WHITESPACE, NEWLINE, OTHER = range(9)
LABELLING = "tokenize-v1"  # these rules, named in a corpus's record; bump when they change

_UNPAINTED = 255
_TOKEN_CATEGORY = {token.NUMBER: NUMBER, token.STRING: STRING, token.OP: OPERATOR,
                   token.COMMENT: COMMENT, token.INDENT: WHITESPACE, token.ERRORTOKEN: OTHER}
_EMPTY_TOKENS = {token.ENCODING, token.DEDENT, token.ENDMARKER, token.NEWLINE, token.NL}
_OPENS = {getattr(token, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(token, n)}
_CLOSES = {getattr(token, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(token, n)}

# Byte classes for files that do not tokenize; bytes >= 0x80 (pieces of non-ASCII characters)
# and control bytes are other.
_BYTE_CLASS = np.full(256, OTHER, dtype=np.uint8)
for _chars, _category in ((string.ascii_letters + "_", NAME), (string.digits, NUMBER),
                          (string.punctuation.replace("_", ""), OPERATOR), (" \t\f\v", WHITESPACE),
                          ("\n\r", NEWLINE)):
    _BYTE_CLASS[list(_chars.encode())] = _category


def label_byte_classes(data: bytes) -> np.ndarray:
    """Category ids (uint8, shape (N,)) by byte class alone: letters and ``_`` name, digits number,
    other ASCII punctuation operator, space/tab/form feed/vertical tab whitespace, ``\\n``/``\\r``
    newline, everything else (control bytes, bytes >= 0x80) other.

        >>> [CATEGORIES[i] for i in label_byte_classes(b"x1 (\\n")]
        ['name', 'number', 'whitespace', 'operator', 'newline']
    """
    return _BYTE_CLASS[np.frombuffer(data, dtype=np.uint8)]


def label_python(data: bytes) -> np.ndarray:
    """Category ids (uint8, shape (N,)) of the Python source ``data``, one per byte (module
    docstring for the rules). Raises what :mod:`tokenize` raises on a file it cannot read.

        >>> [CATEGORIES[i] for i in label_python(b"x = 1\\n")]
        ['name', 'whitespace', 'operator', 'whitespace', 'number', 'newline']
    """
    spans, encoding = [], "utf-8"  # spans: (start row, start col, end row, end col, category)
    depth, opened = 0, (1, 0)  # f-string nesting, and where the outermost one opened
    with warnings.catch_warnings():  # 3.12+ tokenize warns of invalid escapes: not our concern
        warnings.simplefilter("ignore")
        for tok in tokenize.tokenize(io.BytesIO(data).readline):
            kind = tok.type
            if kind == token.ENCODING:
                encoding = "utf-8" if tok.string == "utf-8-sig" else tok.string
            elif kind in _OPENS:
                opened = tok.start if depth == 0 else opened
                depth += 1
            elif kind in _CLOSES:
                depth -= 1
                if depth == 0:
                    spans.append((*opened, *tok.end, STRING))
            elif depth == 0 and kind not in _EMPTY_TOKENS:
                if kind == token.NAME:
                    category = KEYWORD if keyword.iskeyword(tok.string) else NAME
                else:
                    category = _TOKEN_CATEGORY.get(kind, OTHER)
                end = tok.end
                if end[0] > tok.start[0]:  # 3.12.1 says this column in bytes; recount it
                    end = (end[0], len(tok.string) - tok.string.rfind("\n") - 1)
                spans.append((*tok.start, *end, category))
    labels_N = np.full(len(data), _UNPAINTED, dtype=np.uint8)
    if spans:
        span_K5 = np.array(spans, dtype=np.int64)
        start_K, end_K = _byte_offsets(data, encoding, span_K5[:, :2], span_K5[:, 2:4])
        length_K = np.maximum(end_K - start_K, 0)
        # every byte of every span at once: span k covers start_K[k] + (0 .. length_K[k] - 1)
        shift_K = start_K - (np.cumsum(length_K) - length_K)
        labels_N[np.arange(length_K.sum()) + np.repeat(shift_K, length_K)] = np.repeat(
            span_K5[:, 4], length_K)
    labels_N[labels_N == _UNPAINTED] = WHITESPACE
    data_N = np.frombuffer(data, dtype=np.uint8)
    labels_N[(data_N == ord("\n")) | (data_N == ord("\r"))] = NEWLINE
    return labels_N


def _byte_offsets(data: bytes, encoding: str, *positions_K2: np.ndarray) -> list[np.ndarray]:
    """Byte offsets in ``data`` of tokenize's (row from 1, column in characters) positions."""
    lines = data.split(b"\n")  # as io.BytesIO.readline splits them
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark
    lines[0] = lines[0][bom:]  # tokenize counts row 1's columns after a byte order mark
    row_start_R = np.cumsum([bom] + [len(line) + 1 for line in lines[:-1]])
    wide = [r + 1 for r, line in enumerate(lines) if not line.isascii()]
    out = []
    for position_K2 in positions_K2:
        row_K = np.minimum(position_K2[:, 0], len(lines))
        offset_K = row_start_R[row_K - 1] + position_K2[:, 1]  # exact on ASCII rows
        for k in np.flatnonzero(np.isin(row_K, wide)):  # characters of several bytes
            row, col = int(row_K[k]), int(position_K2[k, 1])
            sizes = [len(c.encode(encoding)) for c in lines[row - 1].decode(encoding)[:col]]
            offset_K[k] = row_start_R[row - 1] + sum(sizes) + col - len(sizes)
        out.append(np.clip(offset_K, 0, len(data)))
    return out
