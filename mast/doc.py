"""A tiny document model (headings, paragraphs, tables, images, code) rendered to Markdown and
self-contained HTML, and the one set of number formatters every table of the platform uses
(the report's and ``mast stats seeds``' text tables), so a p-value reads the same everywhere.
"""

from __future__ import annotations

import base64
import html
import math
import re
import statistics
from pathlib import Path

# --------------------------------------------------------------------------- numbers


def fmt_pp(x: float | None, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = 100.0 * x
    if abs(v) < 0.05:
        v = 0.0
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    if p == 0:
        return "0"
    return f"{p:.1e}" if p < 0.001 else f"{p:.4f}".rstrip("0").rstrip(".") if p < 1 else "1"


def fmt_ci(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"[{fmt_pp(lo)}, {fmt_pp(hi)}]"


def fmt_count(vals: list[int | None], n: int) -> str:
    """'37/150' for one value (or equal values); '37.3/150 (36–39)' for the mean and range over seeds."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(set(vals)) == 1:
        return f"{vals[0]}/{n}"
    return f"{statistics.mean(vals):.1f}/{n} ({min(vals)}–{max(vals)})"


def fmt_pvals(ps: list[float]) -> str:
    if len(ps) == 1:
        return fmt_p(ps[0])
    sig = sum(p < 0.05 for p in ps)
    return f"{fmt_p(statistics.median(ps))} (median; {sig}/{len(ps)} < 0.05)"



# --------------------------------------------------------------------------- document model


class Doc:
    """A tiny document (headings, paragraphs, tables, images, code) rendered to Markdown and HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]], bold: set[tuple[int, int]] | None = None) -> None:
        self.blocks.append(("table", headers, rows, bold or set()))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(("code", text, summary))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                _, headers, rows, bold = b

                def cell(t: str) -> str:
                    return str(t).replace("|", "\\|").replace("\n", " ")

                out.append("| " + " | ".join(cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                for i, r in enumerate(rows):
                    out.append("| " + " | ".join(f"**{cell(c)}**" if (i, j) in bold and c else cell(c)
                                                 for j, c in enumerate(r)) + " |")
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})")
            elif b[0] == "code":
                fence = "```"
                out.append((f"{b[2]}:\n\n" if b[2] else "") + f"{fence}\n{b[1].rstrip()}\n{fence}")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>", f"<style>{_CSS}</style>",
               "</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                _, headers, rows, bold = b
                out.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in headers) + "</tr></thead><tbody>")
                for i, r in enumerate(rows):
                    cells = "".join(f"<td class='hit'>{e(str(c))}</td>" if (i, j) in bold else f"<td>{e(str(c))}</td>"
                                    for j, c in enumerate(r))
                    out.append(f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{e(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(b[2])}</figcaption></figure>")
            elif b[0] == "code":
                pre = f"<pre>{e(b[1])}</pre>"
                out.append(f"<details><summary>{e(b[2])}</summary>{pre}</details>" if b[2] else pre)
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown **bold** and `code` in a paragraph -> HTML (everything else escaped)."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}td.hit{font-weight:bold;background:#eaf6ea}img{max-width:100%}
figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}pre{background:#f7f7f7;padding:0.8em;overflow:auto}
code{background:#f3f3f3;padding:0 3px}"""

