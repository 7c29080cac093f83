"""A self-contained HTML report: tables, figures embedded as PNG data, and plain text."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moekit.io.files import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.reproduced { color: #17652a; font-weight: 600; } .partly { color: #8a6100; font-weight: 600; }
.not-reproduced { color: #a31515; font-weight: 600; }
figure { margin: 1.2em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; } code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
.banner { border: 2px solid; border-radius: 4px; padding: 0.7em 1em; margin: 1em 0;
          font-weight: 600; }
.banner.warning { border-color: #b36b00; background: #fff4e0; color: #5c3700; }
.banner.note { border-color: #0072B2; background: #eaf4fb; color: #053b5c; }
"""
BANNER_KINDS = ("warning", "note")


@dataclass(frozen=True)
class Section:
    """A heading and its HTML body (build bodies with the helpers below, which escape text); an
    empty title renders the body alone."""

    title: str
    body: str


def text(paragraph: str) -> str:
    return f"<p>{html.escape(paragraph)}</p>"


def preformatted(content: str) -> str:
    return f"<pre>{html.escape(content)}</pre>"


def banner(message: str, kind: str = "warning") -> str:
    """A framed paragraph that stands out from the text: a 'warning' (the reader must know it to
    trust what follows) or a 'note'."""
    if kind not in BANNER_KINDS:
        raise ValueError(f"banner: kind must be one of {BANNER_KINDS}; got kind={kind!r}.")
    role = ' role="alert"' if kind == "warning" else ""
    return f'<div class="banner {kind}"{role}>{html.escape(message)}</div>'


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
          row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if row_classes else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                    + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(path: Path | str, caption: str, *, link_from: Path | str | None = None) -> str:
    """Embed a PNG so the report is one file that can be mailed or archived; with ``link_from``
    (the folder of the report) link to the file instead, by its path relative to that folder."""
    path = Path(path)
    if link_from is None:
        source = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    else:
        source = html.escape(Path(os.path.relpath(path, link_from)).as_posix())
    return (f'<figure><img alt="{html.escape(caption)}" src="{source}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(path.name)})</figcaption></figure>")


def render(title: str, sections: Sequence[Section]) -> str:
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'>"
              f"<title>{html.escape(title)}</title>"),
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    # a section without a title (a banner) sits right under the page's title
    parts += [(f"<h2>{html.escape(s.title)}</h2>" if s.title else "") + s.body for s in sections]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path | str, title: str, sections: Sequence[Section]) -> Path:
    path = Path(path)
    write_text_atomic(path, render(title, sections))
    return path
