"""The report as one self-contained HTML page: a sentence, the fix, figures (inline SVG) and tables.

No external URL, script or font: the page opens offline, prints, and reads at 420 px as well
as at 1280 px (figures scale to the width, wide tables scroll).
"""

from __future__ import annotations

import html
import io
import math
import re
from typing import Any

from .attribution import MODE_NAMES, TERMS
from .plots import _pyplot
from .report_figures import figures, number

#: The class of the element that wraps every page and fragment; every style rule is scoped to it, so a
#: report shown in a notebook restyles nothing of the notebook's own cells.
WRAPPER = "evalgap-report"

_RULES = """
{--fg:#1d1d1f;--muted:#5f6368;--line:#d9d9de;--accent:#4c72b0;--bad:#c44e52;--good:#55a868;--code:#f5f5f7;
color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
, *{box-sizing:border-box}
 main{max-width:1080px;margin:0 auto;padding:1.2rem}
 h1{font-size:1.6rem;margin:.2rem 0}
 h2{font-size:1.15rem;margin:1.6rem 0 .5rem;border-bottom:1px solid var(--line);padding-bottom:.2rem}
 .meta{color:var(--muted);font-size:.85rem;margin:.2rem 0 1rem}
 .headline{font-size:1.2rem;font-weight:600;background:#fff6e5;border-left:4px solid #e0a000;padding:.6rem .9rem;margin:.8rem 0}
 .healthy{background:#eaf6ec;border-left-color:var(--good)}
 pre{background:var(--code);padding:.6rem .8rem;border-radius:6px;overflow-x:auto;font-size:.85rem;white-space:pre-wrap;overflow-wrap:anywhere}
 figure{margin:.6rem 0}
 figure svg{width:100%;height:auto;max-width:760px;display:block}
 figure svg *{stroke-linejoin:round;stroke-linecap:butt}
 figcaption{color:var(--muted);font-size:.8rem}
 .scroll{overflow-x:auto;max-height:32rem;overflow-y:auto;border:1px solid var(--line);border-radius:6px}
 table{border-collapse:collapse;width:100%;font-size:.85rem}
 th, td{padding:.3rem .5rem;border-bottom:1px solid var(--line);text-align:left}
 .num{text-align:right;font-variant-numeric:tabular-nums}
 thead th{background:#fafafa;position:sticky;top:0}
 .finding{border:1px solid var(--line);border-radius:6px;padding:.5rem .8rem;margin:.5rem 0}
 .badge{display:inline-block;font-size:.72rem;font-weight:600;padding:.05rem .45rem;border-radius:9px;margin-right:.4rem;color:#fff}
 .cause{background:var(--bad)}
 .warning{background:#e0a000}
 .info{background:var(--muted)}
 .sig{font-weight:600}
 .dim{color:var(--muted)}
"""
_SMALL = """
{font-size:14px}
 main{padding:.6rem}
 .headline{font-size:1.05rem}
"""
_PRINT = """
 .scroll{max-height:none;overflow:visible}
 figure{break-inside:avoid}
 .finding{break-inside:avoid}
"""


def _scoped(rules: str) -> str:
    """``rules`` (selectors relative to the wrapper, an empty one for the wrapper itself) with every
    selector prefixed by the wrapper class."""
    out = []
    for rule in re.findall(r"[^{}]*\{[^{}]*\}", rules):
        selectors, body = rule.split("{", 1)
        scoped = ",".join(f".{WRAPPER} {sel.strip()}".rstrip() for sel in selectors.split(","))
        out.append(f"{scoped}{{{body.replace(chr(10), '')}")
    return "".join(out)


_CSS = (_scoped(_RULES) + "@media (max-width:600px){" + _scoped(_SMALL) + "}"
        + "@media print{" + _scoped(_PRINT) + "}")


def _svg(fig) -> str:
    """The figure as inline SVG, text kept as text (selectable, searchable, small), no metadata."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # matplotlib's own style sheet (``*{stroke-linejoin...}``) would apply to the whole page; the page's
    # scoped style sheet carries its rule for the figures instead
    text = re.sub(r"<style[^>]*>.*?</style>", "", text, flags=re.S)
    return _widen(text, _SVG_MARGIN)


#: Points of room added left and right of each figure: the browser draws the SVG text with its own
#: font, which may be wider than the one matplotlib laid the figure out with.
_SVG_MARGIN = 16.0


def _widen(svg: str, margin: float) -> str:
    """``svg`` with ``margin`` points more on its left and right (its viewBox and width)."""
    head = re.match(r"<svg[^>]*>", svg)
    box = re.search(r'viewBox="([-\d.]+) ([-\d.]+) ([\d.]+) ([\d.]+)"', head.group(0)) if head else None
    if box is None:
        return svg
    x, y, w, h = (float(v) for v in box.groups())
    tag = head.group(0).replace(box.group(0), f'viewBox="{x - margin:g} {y:g} {w + 2 * margin:g} {h:g}"')
    tag = re.sub(r'width="[\d.]+pt"', f'width="{w + 2 * margin:g}pt"', tag, count=1)
    return tag + svg[head.end():]


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*(e[+-]?\d+)?|-|not finite)%?$")


def _table(headers: list[str], rows: list[list[Any]], classes: list[str] | None = None, labels: int = 1) -> str:
    """An HTML table; numeric columns right-aligned (cells and header), text left-aligned. The first
    ``labels`` columns are names (layers, modes, terms) and stay left-aligned whatever they look like
    (torch names layers "1", "4")."""
    numeric = [j >= labels and bool(rows) and all(_NUMBER.match(str(r[j])) for r in rows) for j in range(len(headers))]
    num = ' class="num"'
    head = "".join(f"<th{num if numeric[j] else ''}>{html.escape(h)}</th>" for j, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td{num if numeric[j] else ''}>{html.escape(str(c))}</td>" for j, c in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _drift(value: Any) -> str:
    return number(value, 3, style="g")


def _figure(figs: dict, name: str, caption: str) -> str:
    if name not in figs:
        return ""
    return f'<figure aria-label="{name}">{_svg(figs.pop(name))}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _modes_section(report, figs) -> str:
    main = report.main
    if main is None:
        return ""
    all_modes = [m for m in ("F", "T", "Td", "P", "E", "E_val") if any(m in d.values for d in report.decompositions.values())]
    rows = [[f"{m}: {MODE_NAMES[m]}", *[number(d.values[m]) if m in d.values else "-" for d in report.decompositions.values()]] for m in all_modes]
    table = _table(["mode", *report.decompositions], rows)
    caption = ("Same weights; E_val on the validation data, every other mode on the training data." if "E_val" in main.values
               else "Same data, same weights; only the mode differs.")
    return "<section><h2>Metrics by mode</h2>" + _figure(figs, "modes", caption) + table + "</section>"


def _terms_section(report, figs) -> str:
    main = report.main
    if main is None:
        return ""
    meanings = {name: meaning for name, _, _, meaning in TERMS}
    meanings["data"] = "the validation data differ from the training data"
    significant = main.significant()
    rows, classes = [], []
    for name, value in main.terms.items():
        share = number(100 * value / main.total, 0) + "%" if main.total and math.isfinite(main.total) and math.isfinite(value) else "-"
        rows.append([name, number(value, sign=True), share, meanings[name]])
        classes.append("sig" if name in significant else "dim")
    title = f"The gap in {report.primary}, term by term"
    caption = (f"Each term is the mode above it minus the mode below it, as in the table; they add up to {number(main.total, sign=True)}; below {main.threshold():.3g} a term is noise (grey).")
    return f"<section><h2>{html.escape(title)}</h2>" + _figure(figs, "waterfall", caption) + _table(["term", "value", "share", "meaning"], rows, classes) + "</section>"


def _findings_section(report) -> str:
    if not report.findings:
        return ""
    items = []
    for f in report.findings:
        remedy = f"<pre><code>{html.escape(f.remedy)}</code></pre>" if f.remedy else ""
        items.append(f'<div class="finding"><span class="badge {f.severity}">{f.severity}</span><strong>{html.escape(f.kind)}</strong>'
                     f"<p>{html.escape(f.message)}</p>{remedy}</div>")
    return "<section><h2>Causes and evidence</h2>" + "".join(items) + "</section>"


def _layers_section(report, figs) -> str:
    recal = report.recalibration
    if recal is None or not recal.layers:
        return ""
    rows = []
    for lr in recal.layers:
        d = lr.drift
        rows.append([lr.name, lr.status, lr.channels, "-" if d is None else _drift(d.mean_max), "-" if d is None else _drift(d.var_max)])
    first = recal.first_drifting()
    caption = f"First drifting layer: {first.name} (later layers inherit its error)." if first is not None else "No layer drifts beyond 0.5."
    table = '<div class="scroll">' + _table(["layer (forward order)", "status", "channels", "mean drift max", "var drift max"], rows) + "</div>"
    return "<section><h2>BatchNorm layers</h2>" + _figure(figs, "drift", caption) + table + "</section>"


def _ema_caption(report) -> str:
    finding = report.finding("stale_moving_statistics") or report.finding("ema")
    n = finding.numbers if finding is not None else {}
    if "momentum" not in n:
        return ""
    model = "momentum None (a cumulative average)" if n["momentum"] is None else f"momentum {n['momentum']} ({n.get('convention')} convention)"
    return (f"With {model} and {n.get('steps_per_epoch')} steps per epoch: how much of the moving statistics is still their "
            f"initial value, epoch by epoch, beside the advised momentum {n.get('advised_momentum')}.")


def render(report) -> str:
    """The whole page (see the module docstring): its content in the wrapper element, styled by rules
    scoped to that element, so that the same page inserted into a notebook's output restyles nothing else."""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>evalgap: {html.escape(report.primary or 'report')}</title><style>{_CSS}</style></head>"
            f"<body style='margin:0'><div class='{WRAPPER}'>{_content(report)}</div></body></html>")


def fragment(report) -> str:
    """The page as a fragment for a notebook cell (no document, head or body): the wrapper element with
    its scoped style sheet and the content."""
    return f"<div class='{WRAPPER}'><style>{_CSS}</style>{_content(report)}</div>"


def _headline_class(report) -> str:
    """' healthy' (green) only where no cause was found and the primary metric is finite in every mode: a metric that is
    NaN somewhere ranks no cause, and that is not health."""
    main = report.decompositions.get(report.primary) if report.primary else None
    if report.causes or (main is not None and main.non_finite_modes()):
        return ""
    return " healthy"


def _content(report) -> str:
    figs = figures(report)
    top = next((f for f in report.findings if f.severity == "cause" and f.remedy), None)
    fix = f"<section><h2>The fix</h2><pre><code>{html.escape(top.remedy)}</code></pre></section>" if top is not None else ""
    probe = report.probe.get("order") if report.probe else None
    meta = f"{html.escape(report.framework)} · {report.samples} samples · batch {report.batch_size}" + (f" · {html.escape(probe)}" if probe else "")
    ema = _figure(figs, "ema", _ema_caption(report))
    parts = [
        "<main>",
        "<h1>Training vs evaluation: the gap explained</h1>",
        f"<p class='meta'>{meta}</p>",
        f"<p class='headline{_headline_class(report)}'>{html.escape(report.headline())}</p>",
        fix, _modes_section(report, figs), _terms_section(report, figs), _findings_section(report), _layers_section(report, figs),
        f"<section><h2>Moving statistics and momentum</h2>{ema}</section>" if ema else "",
        "<section><h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul></section>" if report.notes else "",
        "</main>",
    ]
    return "".join(parts)


def recalibration_html(result) -> str:
    """A :class:`evalgap.Recalibration` as a fragment for a notebook cell: the summary, the layers, the notes."""
    rows = []
    for lr in result.layers:
        d = lr.drift
        rows.append([lr.name, lr.kind, lr.status, lr.channels, lr.samples, "-" if d is None else _drift(d.mean_max), "-" if d is None else _drift(d.var_max)])
    table = _table(["layer", "type", "status", "channels", "samples", "mean drift max", "var drift max"], rows)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    return (f"<div class='{WRAPPER}'><style>{_CSS}</style><p><strong>{html.escape(result.summary())}</strong></p>"
            f"<div class='scroll'>{table}</div>{f'<ul>{notes}</ul>' if notes else ''}</div>")


def reproduction_html(data: dict) -> str:
    """The result of ``evalgap reproduce`` as a fragment: per variant and epoch, training vs validation."""
    rows = []
    for name, variant in data.get("variants", {}).items():
        for r in variant["epochs"]:
            rows.append([name, r["epoch"], number(r["accuracy"]), number(r["val_accuracy"]),
                         number(r["precise_val_accuracy"]) if "precise_val_accuracy" in r else "-", number(r["val_loss"], 4, style="g")])
    table = _table(["variant", "epoch", "accuracy", "val_accuracy", "precise_val_accuracy", "val_loss"], rows)
    return f"<div class='{WRAPPER}'><style>{_CSS}</style><p><strong>{html.escape(str(data.get('source', '')))}</strong></p><div class='scroll'>{table}</div></div>"
