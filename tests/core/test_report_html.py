"""The HTML report: a page a person reads, self-contained, with figures and real tables."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np

from evalgap.attribution import decompose
from evalgap.diagnosis import Context, InputScale, build_report
from evalgap.keras.remedies import KerasRemedies
from evalgap.recalibration import LayerRecalibration, Recalibration
from evalgap.report_html import recalibration_html, reproduction_html


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.text: dict[str, list[str]] = {}
        self._stack: list[str] = []
        self.tables: list[list[list[str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(k, v or "") for k, v in attrs]
        self._stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])

    def handle_endtag(self, tag):
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_data(self, data):
        if self._stack:
            self.text.setdefault(self._stack[-1], []).append(data)
            if self._stack[-1] in ("td", "th") and self.tables and self.tables[-1]:
                self.tables[-1][-1].append(data)


def seed_like_report():
    """The seed at epoch 7: stale statistics, raw pixels, 53 layers of which one drifts first."""
    d = decompose("accuracy", {"F": 0.7243, "T": 0.74, "Td": 0.74, "P": 0.735, "E": 0.2548})
    layers = []
    for i in range(53):
        shift = 60.0 + i if i >= 3 else 0.01  # from conv3_bn on, growing with depth
        layers.append(LayerRecalibration(
            name=f"conv{i}_bn", kind="BatchNormalization", status="measured", channels=2, eps=1e-3, count=96,
            mean_before=np.array([30.0 + shift, 20.0]), var_before=np.array([300.0, 200.0]),
            mean_after=np.array([30.0, 20.0]), var_after=np.array([300.0, 200.0 * (1 + 0.01 * i)]),
        ))
    recal = Recalibration("keras/jax", layers, batches=22, samples=2100, batch_size=96)
    ctx = Context(
        framework="keras/jax", remedies=KerasRemedies(), samples=2100, batch_size=96, momenta=[0.99] * 53, steps_per_epoch=22, epochs=7,
        input_scale=InputScale.measure(np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3)).astype("float32"), -1),
        probe={"order": "arrays cut into batches of 96 shuffled with seed 0"}, notes=["batch size 96"],
    )
    return build_report({"accuracy": d}, recal, ctx)


def test_page_reads_top_down_and_is_self_contained(tmp_path):
    report = seed_like_report()
    path = report.to_html(tmp_path / "r.html")
    page = open(path, encoding="utf-8").read()
    parsed = _Page()
    parsed.feed(page)
    # first a sentence in words, then the fix to copy
    headline = "".join(parsed.text["p"][1:2])
    assert "Validation accuracy is 47.0 points below training on the same data" in report.headline()
    assert "all of it: the moving statistics are stale" in report.headline() and report.headline() in page
    headings = [h.strip() for h in parsed.text["h2"]]
    assert headings[0] == "The fix" and "evalgap.keras.recalibrate(model, train_data)" in page
    assert {"Metrics by mode", "The gap in accuracy, term by term", "Causes and evidence", "BatchNorm layers",
            "Moving statistics and momentum", "Notes"} <= set(headings)
    assert headline  # the meta line and headline are paragraphs
    # tables are HTML tables: the modes table has one row per mode with its value
    modes = next(t for t in parsed.tables if t and t[0] and t[0][0] == "mode")
    assert [row[0].split(":")[0] for row in modes[1:]] == ["F", "T", "Td", "P", "E"] and modes[-1][1] == "0.2548"
    layers = next(t for t in parsed.tables if t and t[0] and t[0][0].startswith("layer"))
    assert len(layers) == 54 and layers[1][0] == "conv0_bn"  # every layer, forward order
    # four inline SVG figures; the drift figure names layers and marks the first drifting one
    assert page.count("<svg") == 4 and parsed.tags.count("figure") == 4
    drift_svg = page[page.index('aria-label="drift"'):]
    drift_svg = drift_svg[: drift_svg.index("</figure>")]
    assert "▶ conv3_bn" in drift_svg and "conv52_bn" in drift_svg
    assert "weight on the initial values" in page  # the EMA curve
    # nothing outside the file: no script, stylesheet link, image source or URL to fetch
    assert not {"script", "link", "img", "iframe"} & set(parsed.tags)
    for key, value in parsed.attrs:
        if key in ("src", "href"):
            assert not value.startswith(("http:", "https:", "//")), (key, value)
    assert not re.search(r"url\((?!#)|@import", page)  # only in-page references (SVG clip paths)
    assert len(page) < 400_000


def test_healthy_page_says_so(tmp_path):
    d = decompose("accuracy", {"T": 0.95, "Td": 0.95, "P": 0.948, "E": 0.947})
    ctx = Context(framework="torch", remedies=KerasRemedies(), samples=10, batch_size=5)
    report = build_report({"accuracy": d}, None, ctx)
    page = open(report.to_html(tmp_path / "h.html")).read()
    assert "nothing to fix" in report.headline() and "headline healthy" in page and "The fix" not in page


def test_a_metric_that_is_not_finite_is_not_shown_healthy(tmp_path):
    """No cause can be ranked when the loss is NaN in some mode: the headline says so, and is not styled healthy."""
    d = decompose("loss", {"T": float("nan"), "Td": float("nan"), "P": 0.5, "E": 0.6})
    ctx = Context(framework="torch", remedies=KerasRemedies(), samples=10, batch_size=5)
    report = build_report({"loss": d}, None, ctx)
    page = open(report.to_html(tmp_path / "n.html")).read()
    assert "not finite" in report.headline() and "headline healthy" not in page and "class='headline'" in page


# --- layout: figures agree with the table, fit their width, keep legends off the bars; styles stay scoped ---

_SVG_NS = "{http://www.w3.org/2000/svg}"


def _figure_svgs(page: str) -> dict[str, ET.Element]:
    """Each figure's SVG, parsed, by its aria-label."""
    out = {}
    for m in re.finditer(r'<figure aria-label="(\w+)">(<svg.*?</svg>)', page, flags=re.S):
        out[m.group(1)] = ET.fromstring(m.group(2))
    return out


def _texts(svg: ET.Element) -> list[tuple[str, float, float, float, str]]:
    """(text, x, y, font size, anchor) of every horizontal text of ``svg``."""
    out = []
    for t in svg.iter(f"{_SVG_NS}text"):
        if re.search(r"rotate\(-?[1-9]", t.get("transform", "")):
            continue  # an axis label written upwards
        style = t.get("style", "")
        size = float(re.search(r"font-size: ([\d.]+)px", style).group(1))
        anchor = re.search(r"text-anchor: (\w+)", style)
        if t.get("x") is not None:
            x, y = float(t.get("x")), float(t.get("y"))
        else:  # a line of a multi-line text: placed by a translation, anchored at its start
            x, y = (float(v) for v in re.search(r"translate\(([-\d.e]+) ([-\d.e]+)\)", t.get("transform")).groups())
        out.append(("".join(t.itertext()), x, y, size, anchor.group(1) if anchor else "start"))
    return out


def _box(path: ET.Element) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of a path's points."""
    pts = [float(v) for v in re.findall(r"-?[\d.]+(?:e-?\d+)?", path.get("d", ""))]
    xs, ys = pts[0::2], pts[1::2]
    return min(xs), max(xs), min(ys), max(ys)


def _bars(svg: ET.Element, colours=("#4c72b0", "#c44e52", "#55a868", "#8c8c8c")) -> list[tuple[str, tuple]]:
    """The plotted bars (filled, clipped to the axes) as (colour, box)."""
    out = []
    for p in svg.iter(f"{_SVG_NS}path"):
        fill = re.search(r"fill: (#[0-9a-f]{6})", p.get("style", ""))
        if p.get("clip-path") and fill and fill.group(1) in colours:
            out.append((fill.group(1), _box(p)))
    return out


def _visible_text(page: str) -> str:
    parsed = _Page()
    parsed.feed(page)
    return " ".join(" ".join(v) for v in parsed.text.values())


def _css_selectors(page: str) -> list[str]:
    selectors = []
    for css in re.findall(r"<style[^>]*>(.*?)</style>", page, flags=re.S):
        css = re.sub(r"@media[^{]*\{", "", css)
        for sel in re.findall(r"([^{}]+)\{[^{}]*\}", css):
            selectors += [s.strip() for s in sel.strip().lstrip("}").split(",") if s.strip()]
    return selectors


def mixed_signs_report():
    """F above T (a negative epoch_average), a tiny negative term (share -0.01%), an exact zero, a large positive term."""
    d = decompose("accuracy", {"F": 0.9911, "T": 0.9967, "Td": 0.9968, "P": 0.9968, "E": 0.1159})
    ctx = Context(framework="torch", remedies=KerasRemedies(), samples=512, batch_size=64)
    return build_report({"accuracy": d}, None, ctx)


def test_waterfall_labels_have_the_sign_of_the_terms_and_never_minus_zero(tmp_path):
    report = mixed_signs_report()
    page = open(report.to_html(tmp_path / "w.html"), encoding="utf-8").read()
    report.to_json(tmp_path / "w.json")
    terms = json.loads(open(tmp_path / "w.json", encoding="utf-8").read())["metrics"]["accuracy"]["terms"]
    assert terms["epoch_average"] < 0 < terms["stale_moving_statistics"] and terms["batch_statistics"] == 0
    labels = [t for t, *_ in _texts(_figure_svgs(page)["waterfall"]) if re.fullmatch(r"\s*[+-]?\d+\.\d{4}", t)]
    labels = [t.strip() for t in labels if not t.startswith(("F ", "E "))]
    assert labels == ["-0.0056", "-0.0001", "0.0000", "+0.8809"]
    for label, value in zip(labels, terms.values()):
        assert float(label) == round(value, 4) and (value == 0 or (label[0] == "-") == (value < 0))
    assert not re.search(r"-0(\.0*)?(?![.\d])", _visible_text(page))  # no "-0", "-0.0000", "-0%" anywhere


def test_term_table_shares_never_read_minus_zero(tmp_path):
    report = mixed_signs_report()
    page = open(report.to_html(tmp_path / "s.html"), encoding="utf-8").read()
    parsed = _Page()
    parsed.feed(page)
    terms = next(t for t in parsed.tables if t and t[0] and t[0][0] == "term")
    shares = {row[0]: row[2] for row in terms[1:]}
    assert shares["training_only_layers"] == "0%" and shares["batch_statistics"] == "0%" and shares["epoch_average"] == "-1%"
    assert "-0%" not in page
    assert {row[0]: row[1] for row in terms[1:]}["batch_statistics"] == "0.0000"


def test_waterfall_title_is_neutral_and_fits_a_wider_font(tmp_path):
    # a loss (lower is better) and validation data: "down to validation" would be wrong
    d = decompose("loss", {"T": 0.40, "Td": 0.35, "P": 0.30, "E": 1.90, "E_val": 2.40})
    ctx = Context(framework="torch", remedies=KerasRemedies(), samples=512, batch_size=64)
    report = build_report({"loss": d}, None, ctx)
    page = open(report.to_html(tmp_path / "t.html"), encoding="utf-8").read()
    titles = _texts_fit(page)
    assert titles["waterfall"] == "from training mode to evaluation on the validation data, term by term"
    assert titles["modes"] == "loss by mode, same weights (E_val: validation data)"  # E_val is not the same data
    # and every figure of a report with long titles (the drift figure shows 30 of 53 layers)
    titles = _texts_fit(open(seed_like_report().to_html(tmp_path / "s.html"), encoding="utf-8").read())
    assert len(titles) == 4 and "30 of 53 layers" in titles["drift"]


def _texts_fit(page: str) -> dict[str, str]:
    """Check that every text of every figure fits its width in a wider font; the figures' titles."""
    titles = {}
    for name, svg in _figure_svgs(page).items():
        x0, _, width, _ = (float(v) for v in svg.get("viewBox").split())
        axes = next(g for g in svg.iter(f"{_SVG_NS}g") if g.get("id") == "axes_1")
        axes_top = _box(next(axes.iter(f"{_SVG_NS}path")))[2]
        titles[name] = " ".join(t for t, _, y, size, _ in _texts(svg) if y < axes_top and size >= 9)
        for text, x, y, size, anchor in _texts(svg):
            # a browser font 15% wider than the DejaVu Sans matplotlib laid the figure out with; 30% for the title
            wide = (1.3 if y < axes_top and size >= 9 else 1.15) * _dejavu_width(text, size)
            left = {"start": x, "middle": x - wide / 2, "end": x - wide}[anchor]
            assert x0 <= left and left + wide <= x0 + width, (name, text)
    return titles


def _dejavu_width(text: str, size: float) -> float:
    """The width in points of ``text`` in matplotlib's default font."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    return RendererAgg(100, 100, 72).get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0]


def test_drift_legend_is_outside_the_bars(tmp_path):
    report = seed_like_report()
    page = open(report.to_html(tmp_path / "d.html"), encoding="utf-8").read()
    svg = _figure_svgs(page)["drift"]
    legend = next(g for g in svg.iter(f"{_SVG_NS}g") if g.get("id", "").startswith("legend"))
    ys = [y for p in legend.iter(f"{_SVG_NS}path") for y in _box(p)[2:]]
    ys += [v for _, _, y, size, _ in _texts(legend) for v in (y - size, y)]
    top, bottom = min(ys), max(ys)
    bars = _bars(svg)
    assert len(bars) == 2 * 30  # mean and variance bars of the 30 layers shown
    for _, (_, _, y0, y1) in bars:
        assert y1 <= top or y0 >= bottom, (y0, y1, top, bottom)


def test_modes_figure_draws_negative_values_left_of_a_zero_line(tmp_path):
    d = decompose("r2", {"T": 0.9776, "Td": 0.9776, "P": 0.9924, "E": -0.2126})
    ctx = Context(framework="torch", remedies=KerasRemedies(), samples=512, batch_size=64)
    report = build_report({"r2": d}, None, ctx)
    page = open(report.to_html(tmp_path / "r2.html"), encoding="utf-8").read()
    svg = _figure_svgs(page)["modes"]
    red = [box for colour, box in _bars(svg) if colour == "#c44e52"]
    assert len(red) == 1
    x0, x1, _, _ = red[0]
    zero = [_box(p) for p in svg.iter(f"{_SVG_NS}path") if p.get("clip-path") and "stroke: #8c8c8c" in p.get("style", "")]
    assert len(zero) == 1 and zero[0][0] == zero[0][1]  # one vertical zero line
    assert x1 - x0 > 10 and abs(x1 - zero[0][0]) < 0.01  # a real bar ending at zero
    blue = [box for colour, box in _bars(svg) if colour == "#4c72b0"]
    assert all(abs(b[0] - zero[0][0]) < 0.01 for b in blue)  # positive bars start at zero
    # the label of the negative value does not sit over the mode names (right-anchored at the axis)
    texts = _texts(svg)
    label = next(t for t in texts if t[0].strip() == "-0.2126")
    names = [t for t in texts if t[0].startswith("E: ")]
    assert label[1] > max(t[1] for t in names)


def _layers(names, var_before=None):
    layers = []
    for i, name in enumerate(names):
        layers.append(LayerRecalibration(
            name=name, kind="BatchNorm1d", status="measured", channels=2, eps=1e-5, count=64,
            mean_before=np.array([1.0 + i, 0.0]), var_before=np.array([1.0, 1.0]) if var_before is None or i else var_before,
            mean_after=np.array([0.0, 0.0]), var_after=np.array([1.0, 1.0]),
        ))
    return Recalibration("torch", layers, batches=8, samples=512, batch_size=64)


def _stale_report(recal):
    d = decompose("accuracy", {"T": 0.97, "Td": 0.97, "P": 0.98, "E": 0.46})
    ctx = Context(framework="torch", remedies=KerasRemedies(), samples=512, batch_size=64)
    return build_report({"accuracy": d}, recal, ctx)


def test_numeric_layer_names_are_left_aligned(tmp_path):
    recal = _layers(["1", "4"])
    report = _stale_report(recal)
    for page in (open(report.to_html(tmp_path / "n.html"), encoding="utf-8").read(), recalibration_html(recal)):
        table = next(t for t in re.findall(r"<table>.*?</table>", page, flags=re.S) if "<th>layer" in t)
        assert re.search(r"<th>layer[^<]*</th>", table)
        cells = re.findall(r"<tr><td([^>]*)>([^<]*)</td>", table)
        assert [name for _, name in cells] == ["1", "4"] and all(attrs == "" for attrs, _ in cells)
        assert 'class="num"' in table  # the drift columns are still numbers


def test_a_broken_variance_reads_not_finite(tmp_path):
    with np.errstate(invalid="ignore", divide="ignore"):
        recal = _layers(["1", "4"], var_before=np.array([-1.0, 1.0]))
        d = decompose("accuracy", {"T": 0.97, "Td": 0.97, "P": 0.98, "E": 0.46})
        loss = decompose("loss", {"T": 0.11, "Td": 0.11, "P": 0.10, "E": float("nan")})
        ctx = Context(framework="torch", remedies=KerasRemedies(), samples=512, batch_size=64)
        report = build_report({"loss": loss, "accuracy": d}, recal, ctx, primary="accuracy")
        page = open(report.to_html(tmp_path / "nan.html"), encoding="utf-8").read()
    assert not np.isfinite(recal.layers[0].drift.var_max)
    text = _visible_text(page)
    assert not re.search(r"\b(nan|inf)\b", text, flags=re.I), re.findall(r".{40}\bnan\b.{10}", text, flags=re.I)
    parsed = _Page()
    parsed.feed(page)
    layers = next(t for t in parsed.tables if t and t[0] and t[0][0].startswith("layer"))
    assert layers[1][0] == "1" and layers[1][-1] == "not finite"
    assert re.search(r'<td class="num">not finite</td>', page)  # right-aligned with the numbers of its column


def _all_pages(tmp_path):
    report = seed_like_report()
    return {
        "to_html": open(report.to_html(tmp_path / "p.html"), encoding="utf-8").read(),
        "_repr_html_": report._repr_html_(),
        "recalibration": recalibration_html(report.recalibration),
        "reproduction": reproduction_html({"source": "s", "variants": {"v": {"epochs": [
            {"epoch": 1, "accuracy": 0.9, "val_accuracy": 0.5, "val_loss": 1.0}]}}}),
    }


def test_every_style_rule_is_scoped_to_the_wrapper(tmp_path):
    for name, page in _all_pages(tmp_path).items():
        selectors = _css_selectors(page)
        assert selectors, name
        bad = [s for s in selectors if not re.match(r"\.evalgap-report(?![\w-])", s)]
        assert not bad, (name, bad)
        assert re.search(r"<div class=['\"]evalgap-report['\"]>", page), name
        # the content sits inside the wrapper: nothing but the document's closing tags after it
        start = re.search(r"<div class=['\"]evalgap-report['\"]>", page).start()
        assert "<main>" not in page[:start] and "<table>" not in page[:start], name


def test_code_blocks_wrap_long_lines(tmp_path):
    page = _all_pages(tmp_path)["to_html"]
    rules = re.findall(r"([^{}]+)\{([^{}]*)\}", re.sub(r"@media[^{]*\{", "", re.search(r"<style>(.*?)</style>", page, flags=re.S).group(1)))
    pre = [body for sel, body in rules if re.search(r"(^|[\s,}])pre\s*$", sel.strip())]
    assert pre and all("white-space:pre-wrap" in body.replace(" ", "") for body in pre)
    assert not any(re.search(r"white-space:\s*pre\s*[;}]", body + "}") for _, body in rules)
