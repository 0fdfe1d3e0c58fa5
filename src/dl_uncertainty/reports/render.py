"""Self-contained HTML reports (figures inlined as base64 PNG) and Markdown tables.

A report is a title plus sections; a section is a heading with, in this order, paragraphs of
text, a table (a dict -> two columns "name | value", or a list of dicts -> one row each) and
figures. All text is HTML-escaped; the page loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

Rows = Mapping[str, Any] | Sequence[Mapping[str, Any]]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
div.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; white-space: nowrap; }
th { background: #f3f3f3; text-align: left; white-space: normal; vertical-align: bottom; }
@media print { div.table { overflow-x: visible; } table { font-size: 10px; } }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
"""


@dataclass
class Section:
    """One report section. ``figures``: Figures or data URIs, or a mapping caption -> either."""

    heading: str
    text: str | Sequence[str] = ()
    table: Rows | None = None
    figures: Sequence[Figure | str] | Mapping[str, Figure | str] = field(default_factory=tuple)


def format_value(value: Any) -> str:
    """Readable cell text: floats with 4 decimals (scientific if tiny/huge), ints as-is."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(value)


def _as_rows(table: Rows) -> list[Mapping[str, Any]]:
    if isinstance(table, Mapping):
        return [{"metric": k, "value": v} for k, v in table.items()]
    return list(table)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    return list(dict.fromkeys(k for row in rows for k in row))


def html_table(table: Rows, columns: Sequence[str] | None = None) -> str:
    """``<table>`` for a dict (name/value rows) or a list of dicts (missing cells left empty)."""
    rows = _as_rows(table)
    cols = _columns(rows, columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cls = (
                ' class="num"' if isinstance(v, numbers.Number) and not isinstance(v, bool) else ""
            )
            cells.append(f"<td{cls}>{html.escape(format_value(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (  # a wide table scrolls sideways in its box instead of running off the page
        f'<div class="table"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody>\n</table></div>"
    )


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``, drawn once: the HTML report and MLflow's copy share them."""
    cached = getattr(fig, "_png", None)
    if cached is None or cached[0] != dpi:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        cached = fig._png = (dpi, buf.getvalue())
    return cached[1]


def figure_to_data_uri(fig: Figure, dpi: int = 110) -> str:
    """PNG of ``fig`` as a ``data:image/png;base64,...`` URI; the figure is closed afterwards."""
    png = figure_png(fig, dpi)
    if fig.canvas.manager is not None:  # created through pyplot: release it there
        import matplotlib.pyplot as plt

        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_html(fig: Figure | str, caption: str | None) -> str:
    uri = fig if isinstance(fig, str) else figure_to_data_uri(fig)
    if not uri.startswith("data:image/"):
        raise ValueError(
            "figures must be matplotlib Figures or data:image/... URIs (no external links)."
        )
    alt = html.escape(caption or "figure", quote=True)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{alt}">{cap}</figure>'


def _section_html(section: Section | Mapping[str, Any]) -> str:
    s = section if isinstance(section, Section) else Section(**section)
    parts = [f"<section>\n<h2>{html.escape(s.heading)}</h2>"]
    paragraphs = [s.text] if isinstance(s.text, str) else list(s.text)
    parts += [f"<p>{html.escape(p)}</p>" for p in paragraphs if p]
    if s.table is not None:
        parts.append(html_table(s.table))
    figs = s.figures.items() if isinstance(s.figures, Mapping) else ((None, f) for f in s.figures)
    parts += [_figure_html(f, cap) for cap, f in figs]
    parts.append("</section>")
    return "\n".join(parts)


def html_report(title: str, sections: Sequence[Section | Mapping[str, Any]]) -> str:
    """A complete, self-contained HTML page. Sections are ``Section``s or dicts with its fields."""
    body = "\n".join(_section_html(s) for s in sections)
    t = html.escape(title)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{t}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n{body}\n</body>\n</html>\n"
    )


def markdown_table(rows: Rows, columns: Sequence[str] | None = None) -> str:
    """GitHub-flavoured Markdown table (same cell formatting as the HTML tables; ``|`` escaped)."""
    rows = _as_rows(rows)
    cols = _columns(rows, columns)

    def cell(v: Any) -> str:
        return format_value(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in cols) + " |"]
    lines.append("| " + " | ".join("---:" if _numeric(rows, c) else "---" for c in cols) + " |")
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _numeric(rows: Sequence[Mapping[str, Any]], col: str) -> bool:
    vals = [r.get(col) for r in rows if r.get(col) is not None]
    return bool(vals) and all(
        isinstance(v, numbers.Number) and not isinstance(v, bool) for v in vals
    )
