"""Text coloured by its experts (Jiang et al. 2024, Mixtral of Experts, Figure 8): every byte of a
held-out file drawn in a monospace grid on the colour of the expert a layer's router chose first
for it.

Shape legend: N bytes shown, L layers shown, E experts.

Bytes are drawn as themselves when printable ASCII; a newline as a ``↵`` at the end of its line
(it is routed like any byte), a tab as ``→``, any other byte (control bytes, pieces of non-ASCII
characters) as ``·``. Long lines wrap at ``max_columns``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from moekit.plotting.style import expert_colors, new_figure

CELL_W, CELL_H = 0.07, 0.19  # inches per character cell
NEWLINE_MARK, TAB_MARK, OTHER_MARK = "\u21b5", "\u2192", "\u00b7"


def byte_glyph(byte: int) -> str:
    """How one byte is shown: itself if printable ASCII, else a mark (module docstring).

    Example:
        >>> [byte_glyph(b) for b in b"a \\n\\t\\xc3"]
        ['a', ' ', '↵', '→', '·']
    """
    if byte == 10:
        return NEWLINE_MARK
    if byte == 9:
        return TAB_MARK
    return chr(byte) if 32 <= byte < 127 else OTHER_MARK


def byte_grid(bytes_N: Sequence[int], max_columns: int = 80) -> list[tuple[int, int]]:
    """The (row, column) of each byte: a newline ends its row (drawn at its end), a row longer
    than ``max_columns`` wraps.

    Example:
        >>> byte_grid(b"ab\\ncd", max_columns=80)
        [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    """
    if max_columns < 1:
        raise ValueError(f"byte_grid: max_columns must be >= 1; got max_columns={max_columns}.")
    cells, row, col = [], 0, 0
    for byte in bytes_N:
        if col >= max_columns:
            row, col = row + 1, 0
        cells.append((row, col))
        if byte == 10:
            row, col = row + 1, 0
        else:
            col += 1
    return cells


def plot_byte_experts(bytes_N: Sequence[int], experts_LN: np.ndarray, layers: Sequence[int],
                      n_experts: int, *, max_columns: int = 80, title: str = "") -> Figure:
    """The bytes ``bytes_N`` once per layer, each on the colour of its first-choice expert there
    (``experts_LN[i]`` for layer ``layers[i]``), with one legend of the experts' colours.

    Example:
        >>> fig = plot_byte_experts(b"x = 1\\n", np.array([[0, 1, 2, 1, 0, 3]]), [0], 4)
        >>> len(fig.axes)
        1
    """
    experts_LN = np.asarray(experts_LN)
    n_bytes = len(bytes_N)
    if experts_LN.shape != (len(layers), n_bytes):
        raise ValueError(f"plot_byte_experts: experts_LN must have shape (len(layers)="
                         f"{len(layers)}, len(bytes_N)={n_bytes}); got {experts_LN.shape}.")
    cells = byte_grid(bytes_N, max_columns)
    n_rows = 1 + max((r for r, _ in cells), default=0)
    n_cols = max(8, 1 + max((c for _, c in cells), default=0))
    colors = expert_colors(n_experts)
    glyphs = [byte_glyph(int(b)) for b in bytes_N]
    fig = new_figure(n_cols * CELL_W + 1.9, len(layers) * (n_rows * CELL_H + 0.45) + 0.5)
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, layer, experts_N in zip(axes, layers, experts_LN, strict=True):
        for (row, col), glyph, expert in zip(cells, glyphs, experts_N, strict=True):
            ax.add_patch(Rectangle((col, row), 1, 1, facecolor=colors[int(expert)], alpha=0.5,
                                   linewidth=0))
            if glyph != " ":
                ax.text(col + 0.5, row + 0.52, glyph, ha="center", va="center",
                        fontfamily="monospace", fontsize=8, color="k", in_layout=False)
        ax.set_xlim(0, n_cols)
        ax.set_ylim(n_rows, 0)
        ax.set_axis_off()
        share = np.bincount(experts_N.astype(np.int64), minlength=n_experts) / max(n_bytes, 1)
        busiest = int(np.argmax(share))
        ax.set_title(f"layer {layer}: first choice per byte (most bytes: expert {busiest}, "
                     f"{share[busiest]:.0%})", fontsize=9, loc="left")
    handles = [Patch(facecolor=c, alpha=0.5, label=f"expert {e}") for e, c in enumerate(colors)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
