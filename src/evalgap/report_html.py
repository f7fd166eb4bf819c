"""The report as one self-contained HTML page: a sentence, the fix, figures (inline SVG) and tables.

No external URL, script or font: the page opens offline, prints, and reads at 420 px as well
as at 1280 px (figures scale to the width, wide tables scroll).
"""

from __future__ import annotations

import html
import io
import re
from typing import Any

from .attribution import MODE_NAMES, TERMS
from .plots import _pyplot
from .report_figures import figures

_CSS = """
:root{--fg:#1d1d1f;--muted:#5f6368;--line:#d9d9de;--accent:#4c72b0;--bad:#c44e52;--good:#55a868;--code:#f5f5f7}
*{box-sizing:border-box}body{margin:0;color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1080px;margin:0 auto;padding:1.2rem}h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .5rem;
border-bottom:1px solid var(--line);padding-bottom:.2rem}.meta{color:var(--muted);font-size:.85rem;margin:.2rem 0 1rem}
.headline{font-size:1.2rem;font-weight:600;background:#fff6e5;border-left:4px solid #e0a000;padding:.6rem .9rem;margin:.8rem 0}
.healthy{background:#eaf6ec;border-left-color:var(--good)}
pre{background:var(--code);padding:.6rem .8rem;border-radius:6px;overflow-x:auto;font-size:.85rem;white-space:pre}
figure{margin:.6rem 0}figure svg{width:100%;height:auto;max-width:760px;display:block}figcaption{color:var(--muted);font-size:.8rem}
.scroll{overflow-x:auto;max-height:32rem;overflow-y:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{padding:.3rem .5rem;border-bottom:1px solid var(--line);text-align:left}
.num{text-align:right;font-variant-numeric:tabular-nums}thead th{background:#fafafa;position:sticky;top:0}
.finding{border:1px solid var(--line);border-radius:6px;padding:.5rem .8rem;margin:.5rem 0}
.badge{display:inline-block;font-size:.72rem;font-weight:600;padding:.05rem .45rem;border-radius:9px;margin-right:.4rem;color:#fff}
.cause{background:var(--bad)}.warning{background:#e0a000}.info{background:var(--muted)}.sig{font-weight:600}.dim{color:var(--muted)}
@media (max-width:600px){body{font-size:14px}main{padding:.6rem}.headline{font-size:1.05rem}}
@media print{.scroll{max-height:none;overflow:visible}figure{break-inside:avoid}.finding{break-inside:avoid}}
"""


def _svg(fig) -> str:
    """The figure as inline SVG, text kept as text (selectable, searchable, small), no metadata."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*(e[+-]?\d+)?|-)%?$")


def _cell(value: Any, tag: str = "td") -> str:
    text = str(value)
    cls = ' class="num"' if _NUMBER.match(text) else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def _table(headers: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    """An HTML table; numbers right-aligned (and their column headers), text left-aligned."""
    numeric = [bool(rows) and all(_NUMBER.match(str(r[j])) for r in rows) for j in range(len(headers))]
    num = ' class="num"'
    head = "".join(f"<th{num if numeric[j] else ''}>{html.escape(h)}</th>" for j, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(_cell(c) for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(figs: dict, name: str, caption: str) -> str:
    if name not in figs:
        return ""
    return f'<figure aria-label="{name}">{_svg(figs.pop(name))}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _modes_section(report, figs) -> str:
    main = report.main
    if main is None:
        return ""
    all_modes = [m for m in ("F", "T", "Td", "P", "E", "E_val") if any(m in d.values for d in report.decompositions.values())]
    rows = [[f"{m}: {MODE_NAMES[m]}", *[f"{d.values[m]:.4f}" if m in d.values else "-" for d in report.decompositions.values()]] for m in all_modes]
    table = _table(["mode", *report.decompositions], rows)
    return "<section><h2>Metrics by mode</h2>" + _figure(figs, "modes", "Same data, same weights; only the mode differs.") + table + "</section>"


def _terms_section(report, figs) -> str:
    main = report.main
    if main is None:
        return ""
    meanings = {name: meaning for name, _, _, meaning in TERMS}
    meanings["data"] = "the validation data differ from the training data"
    significant = main.significant()
    rows, classes = [], []
    for name, value in main.terms.items():
        share = f"{100 * value / main.total:.0f}%" if main.total else "-"
        rows.append([name, f"{value:+.4f}", share, meanings[name]])
        classes.append("sig" if name in significant else "dim")
    title = f"The gap in {report.primary}, term by term"
    caption = f"The terms add up to {main.total:+.4f}; below {main.threshold():.3g} a term is noise (grey)."
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
        rows.append([lr.name, lr.status, lr.channels, "-" if d is None else f"{d.mean_max:.3g}", "-" if d is None else f"{d.var_max:.3g}"])
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
    """The whole page (see the module docstring)."""
    figs = figures(report)
    top = next((f for f in report.findings if f.severity == "cause" and f.remedy), None)
    fix = f"<section><h2>The fix</h2><pre><code>{html.escape(top.remedy)}</code></pre></section>" if top is not None else ""
    probe = report.probe.get("order") if report.probe else None
    meta = f"{html.escape(report.framework)} · {report.samples} samples · batch {report.batch_size}" + (f" · {html.escape(probe)}" if probe else "")
    ema = _figure(figs, "ema", _ema_caption(report))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>evalgap: {html.escape(report.primary or 'report')}</title><style>{_CSS}</style></head><body><main>",
        "<h1>Training vs evaluation: the gap explained</h1>",
        f"<p class='meta'>{meta}</p>",
        f"<p class='headline{'' if report.causes else ' healthy'}'>{html.escape(report.headline())}</p>",
        fix, _modes_section(report, figs), _terms_section(report, figs), _findings_section(report), _layers_section(report, figs),
        f"<section><h2>Moving statistics and momentum</h2>{ema}</section>" if ema else "",
        "<section><h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul></section>" if report.notes else "",
        "</main></body></html>",
    ]
    return "".join(parts)


def recalibration_html(result) -> str:
    """A :class:`evalgap.Recalibration` as a fragment for a notebook cell: the summary, the layers, the notes."""
    rows = []
    for lr in result.layers:
        d = lr.drift
        rows.append([lr.name, lr.kind, lr.status, lr.channels, lr.samples, "-" if d is None else f"{d.mean_max:.3g}", "-" if d is None else f"{d.var_max:.3g}"])
    table = _table(["layer", "type", "status", "channels", "samples", "mean drift max", "var drift max"], rows)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    return (f"<div><style>{_CSS}</style><p><strong>{html.escape(result.summary())}</strong></p>"
            f"<div class='scroll'>{table}</div>{f'<ul>{notes}</ul>' if notes else ''}</div>")


def reproduction_html(data: dict) -> str:
    """The result of ``evalgap reproduce`` as a fragment: per variant and epoch, training vs validation."""
    rows = []
    for name, variant in data.get("variants", {}).items():
        for r in variant["epochs"]:
            rows.append([name, r["epoch"], f"{r['accuracy']:.4f}", f"{r['val_accuracy']:.4f}",
                         f"{r['precise_val_accuracy']:.4f}" if "precise_val_accuracy" in r else "-", f"{r['val_loss']:.4g}"])
    table = _table(["variant", "epoch", "accuracy", "val_accuracy", "precise_val_accuracy", "val_loss"], rows)
    return f"<div><style>{_CSS}</style><p><strong>{html.escape(str(data.get('source', '')))}</strong></p><div class='scroll'>{table}</div></div>"
