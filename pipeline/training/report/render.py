"""HTML and PNG helpers every report section shares: formatting of figures and
intervals, tables, matplotlib (Agg) figures embedded as base64 PNG."""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from pipeline.training.outcome import ClassificationResult
from pipeline.training.report.stats import finite

def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not finite(x) else f"{100 * x:.{digits}f} %"


def fmt_ci(lo: float, hi: float) -> str:
    return "" if not (finite(lo) and finite(hi)) else f" [{100 * lo:.1f}–{100 * hi:.1f}]"


def fmt_num(x: Any, digits: int = 3) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if finite(x):
        return f"{float(x):.{digits}g}" if abs(float(x)) < 1e-3 or abs(float(x)) >= 1e4 else f"{float(x):.{digits}f}"
    return "n/a"


def esc(x: Any) -> str:
    return html.escape(str(x))


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table of already formatted (escaped) cells."""
    th = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


def png_b64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_outside(ax, **kw) -> None:
    """A legend right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, frameon=False, **kw)


def integer_axis(axis) -> None:
    """Counts get integer ticks (no 2.5 faces)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def tick_font(n: int) -> int:
    return 7 if n > 12 else 9


def face_key(d: ClassificationResult, i: int) -> tuple[str, int | None]:
    """The thumbnail key of result row ``i``: its photo and face (None: the main face)."""
    return d.uris[i], (int(d.faces[i]) if d.faces is not None else None)


def confusion_png(title: str, cm: np.ndarray, rows: list[str], cols: list[str], xlabel: str) -> str:
    """Confusion matrix: the count written in every non-empty cell, the colour the share
    of its row (so a big row, e.g. the strangers, does not wash out the others)."""
    plt = pyplot()
    nr, nc = cm.shape
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(4.5, min(17.0, 0.3 * max(nr, nc) + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.0, side * nr / max(nc, 1) + 0.5))
    im = ax.imshow(share, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(nc), cols, rotation=90, fontsize=tick_font(nc))
    ax.set_yticks(range(nr), rows, fontsize=tick_font(nr))
    ax.set_xlabel(xlabel), ax.set_ylabel("true")
    if max(nr, nc) <= 60:
        font = 9 if max(nr, nc) <= 12 else 7
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font,
                    color="white" if share[i, j] > 0.6 else "black")
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("share of the row (cells: counts)")
    ax.set_title(title)
    return png_b64(fig)
