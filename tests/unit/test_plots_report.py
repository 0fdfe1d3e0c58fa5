"""Plots run on small random data and are labelled; HTML reports are self-contained."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from dl_uncertainty.reports import plots as P
from dl_uncertainty.reports import render as R
from dl_uncertainty.uncertainty import metrics as M

K = 8


def fake_log_probs(seed, t=4, n=120, k=K, scale=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, (n, k))[None] + rng.normal(0, scale / 2, (t, n, k))
    return z - np.log(np.exp(z).sum(-1, keepdims=True)), rng.integers(0, k, n)


def assert_labelled(fig):
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert axes, "no visible axes"
    for ax in axes:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel() or ax.get_xlabel()
            continue
        assert ax.get_xlabel() or ax.get_ylabel(), f"unlabelled axes: {ax}"
        assert ax.has_data()
    assert any(ax.get_xlabel() for ax in axes) and any(ax.get_ylabel() for ax in axes)
    titles = [ax.get_title() for ax in fig.axes] + [
        fig._suptitle.get_text() if fig._suptitle else ""
    ]
    assert any(titles), "figure has no title"
    fig.canvas.draw()  # renders without error


@pytest.fixture
def two_models():
    out = {}
    for seed, name in enumerate(["bnn", "mc_dropout_dnn"]):
        lp, y = fake_log_probs(seed)
        out[name] = (M.mean_probs(lp), y)
    return out


def test_reliability_diagram(two_models):
    fig = P.reliability_diagram(two_models)
    assert_labelled(fig)
    top = fig.axes[0]
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert any(lbl.startswith("bnn (ECE") for lbl in labels)
    assert any(lbl.startswith("mc_dropout_dnn (ECE") for lbl in labels)
    # ECE in the legend is the metrics module's ECE
    p, y = two_models["bnn"]
    assert f"{M.ece(np.log(p)[None], y):.3f}" in labels[1]


def test_risk_coverage_plot(two_models):
    fig = P.risk_coverage_plot(two_models)
    assert_labelled(fig)
    assert len(fig.axes[0].get_lines()) == 2


def test_uncertainty_histograms():
    sc = [
        M.uncertainty_scores(fake_log_probs(s, scale=c)[0]) for s, c in [(0, 3), (1, 1), (2, 0.2)]
    ]
    assert_labelled(P.uncertainty_histograms(sc[0], sc[1], sc[2]))
    fig = P.uncertainty_histograms(sc[0], sc[1])
    assert_labelled(fig)
    assert [ax.get_title() for ax in fig.axes] == [
        "total uncertainty",
        "epistemic uncertainty",
    ]


def test_shift_plot():
    rng = np.random.default_rng(0)
    rows = [
        {"model": m, "kind": "clean", "severity": 0, "acc": 0.9, "ece": 0.05}
        for m in ("bnn", "mc_dropout_dnn")
    ]
    rows += [
        {
            "model": m,
            "kind": k,
            "severity": s,
            "acc": 0.9 - 0.1 * s + rng.normal(0, 0.01),
            "ece": 0.05 + 0.03 * s,
        }
        for m in ("bnn", "mc_dropout_dnn")
        for k in M.CORRUPTIONS
        for s in range(1, 6)
    ]
    fig = P.shift_plot(rows)
    assert_labelled(fig)
    assert len(fig.axes) == 2 * len(M.CORRUPTIONS)
    assert all(len(line.get_xdata()) == 6 for ax in fig.axes for line in ax.get_lines())


def test_most_uncertain_inputs():
    lp, y = fake_log_probs(0, n=30)
    images = np.random.default_rng(0).random((30, 8, 8))
    scores = M.uncertainty_scores(lp)["entropy"]
    fig = P.most_uncertain_inputs(images, M.mean_probs(lp), y, scores, k=7)
    assert_labelled(fig)
    img_axes = [ax for ax in fig.axes if ax.images]
    assert len(img_axes) == 7 and len(fig.axes) == 14
    # the first image shown is the most uncertain one
    np.testing.assert_array_equal(img_axes[0].images[0].get_array(), images[np.argmax(scores)])


def test_confusion_matrix_plot():
    rng = np.random.default_rng(0)
    y, yhat = rng.integers(0, 8, 100), rng.integers(0, 8, 100)
    fig = P.confusion_matrix_plot(y, yhat)
    assert_labelled(fig)
    cells = fig.axes[0].images[0].get_array()
    assert cells.shape == (8, 8) and cells.sum() == 100
    assert cells[y[0], yhat[0]] >= 1
    norm = P.confusion_matrix_plot(y, yhat, class_names=[str(i) for i in range(8)], normalize=True)
    np.testing.assert_allclose(norm.axes[0].images[0].get_array().sum(1), 1.0)


def test_training_curves():
    hist = {"train_loss": [2.0, 1.2, 0.8], "val_loss": [2.1, 1.4, 1.1], "val_acc": [0.3, 0.6, 0.7]}
    fig = P.training_curves(hist)
    assert_labelled(fig)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss", "acc"]
    assert len(visible[0].get_lines()) == 2


# --------------------------------------------------------------------------- report


def test_figure_to_data_uri_is_png():
    fig = P.training_curves({"loss": [1, 0.5]})
    uri = R.figure_to_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_report_is_self_contained_and_escaped(two_models):
    metrics = {"acc": 0.91234567, "nll": 0.3, "n": 120, "tiny": 1.5e-7}
    html = R.html_report(
        "Report <bnn> & co",
        [
            R.Section("Metrics", text="Scores for <script>alert(1)</script>", table=metrics),
            {
                "heading": "Comparison",
                "table": [{"model": "bnn", "acc": 0.9}, {"model": "dnn", "nll": 0.2}],
                "text": ["first paragraph", "second paragraph"],
            },
            R.Section(
                "Figures",
                figures={
                    "Reliability": P.reliability_diagram(two_models),
                    "Risk": P.risk_coverage_plot(two_models),
                },
            ),
            R.Section(
                "More", figures=[R.figure_to_data_uri(P.training_curves({"loss": [1, 0.5]}))]
            ),
        ],
    )
    assert html.startswith("<!DOCTYPE html>")
    assert html.count('<img src="data:image/png;base64,') == 3
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Report &lt;bnn&gt; &amp; co" in html
    assert '<td class="num">0.9123</td>' in html and "1.500e-07" in html and ">120<" in html
    assert html.count("<table>") == 2 and html.count("<p>") == 3
    assert "<figcaption>Reliability</figcaption>" in html


def test_html_report_rejects_external_figure_links():
    with pytest.raises(ValueError):
        R.html_report("x", [R.Section("s", figures=["https://example.com/a.png"])])


def parse_markdown(md):
    lines = md.splitlines()
    split = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in lines]
    header = [c.strip() for c in split[0]]
    assert all(set(c.strip()) <= set("-:") for c in split[1])
    return header, [[c.strip().replace("\\|", "|") for c in row] for row in split[2:]]


def test_markdown_table_round_trip():
    rows = [{"model": "bnn", "acc": 0.91234, "n": 10}, {"model": "a|b", "acc": 0.5, "note": "x"}]
    md = R.markdown_table(rows, ["model", "acc", "n", "note"])
    header, body = parse_markdown(md)
    assert header == ["model", "acc", "n", "note"]
    assert body == [["bnn", "0.9123", "10", ""], ["a|b", "0.5000", "", "x"]]
    assert md.splitlines()[1] == "| --- | ---: | ---: | --- |"
    # default columns: union in first-seen order; a dict becomes metric/value rows
    assert parse_markdown(R.markdown_table(rows))[0] == ["model", "acc", "n", "note"]
    header, body = parse_markdown(R.markdown_table({"acc": 1.0, "ece": 0.01}))
    assert header == ["metric", "value"] and body == [["acc", "1.0000"], ["ece", "0.0100"]]


def test_reliability_diagram_shows_each_bins_count_and_sets_sparse_bins_apart():
    # 40 examples in the 0.93-1.0 bin, 3 in the 0.33-0.40 bin
    probs = np.array([[0.95, 0.03, 0.02]] * 40 + [[0.35, 0.33, 0.32]] * 3)
    labels = np.array([0] * 38 + [1] * 2 + [0, 1, 1])
    fig = P.reliability_diagram({"m": (probs, labels)}, min_count=10)
    top, bottom = fig.axes[:2]
    assert sorted(r.get_height() for r in bottom.patches) == [3, 40]
    assert sorted(t.get_text() for t in bottom.texts) == ["3", "40"]  # the counts, written on the bars
    line, hollow = top.get_lines()[1:3]
    assert line.get_xdata() == pytest.approx([29 / 30]) and line.get_ydata() == pytest.approx([38 / 40])
    assert hollow.get_mfc() == "none" and hollow.get_linestyle() == "None"
    assert hollow.get_xdata() == pytest.approx([11 / 30]) and hollow.get_ydata() == pytest.approx([1 / 3])
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert f"m (ECE {M.ece(np.log(probs)[None], labels):.3f})" in legend and "bin with < 10 examples" in legend


def test_a_wide_table_scrolls_in_its_own_box_instead_of_widening_the_page():
    page = R.html_report("wide", [R.Section("s", table=[{f"metric_{i}": 1e-4 for i in range(30)}])])
    assert page.count('<div class="table"><table>') == 1
    assert "div.table { overflow-x: auto;" in page and "white-space: nowrap" in page
