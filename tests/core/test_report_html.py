"""The HTML report: a page a person reads, self-contained, with figures and real tables."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np

from evalgap.attribution import decompose
from evalgap.diagnosis import Context, InputScale, build_report
from evalgap.keras.remedies import KerasRemedies
from evalgap.recalibration import LayerRecalibration, Recalibration


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
