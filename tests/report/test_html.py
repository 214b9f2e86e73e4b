"""report.html: self-contained, opens in headless Chromium without errors, every image present, and
every user-controlled string escaped."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dragontrainer import report, train
from dragontrainer.cli import main
from tests.conftest import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<img src=x onerror=alert(1)>"


def open_in_chromium(page_path: Path, inspect: Callable[[Any], None] | None = None) -> tuple[list[list], list[str]]:
    """(every image's [complete, naturalWidth], every console error, page error or dialog);
    `inspect(page)` runs on the loaded page (assertions, screenshots)."""
    if CHROMIUM is None:
        if os.environ.get("DRAGON_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(r.url))
        page.goto(page_path.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        if inspect is not None:
            inspect(page)
        browser.close()
    return images, problems


def test_report_opens_in_chromium_with_every_figure(tmp_path: Path) -> None:
    run = train(overrides=[*TINY, "model.name=vgg", "model.widths=[8,8]", "monitor.every=3", f"run.dir={tmp_path}"])
    page = run.run_dir / "report.html"
    text = page.read_text()
    assert text.index("What the dragon tells you") < text.index("<h2>Training</h2>")
    assert "http" not in text.split("<pre>")[0]  # self-contained: nothing to fetch
    shots = tmp_path / "shots"

    def inspect(browser_page: Any) -> None:
        # every figure has its anchor, for findings to link to
        ids = browser_page.eval_on_selector_all("figure[id]", "figures => figures.map(f => f.id)")
        assert ids == [f"plot-{n}" for n in PLOTS] + (["plot-suspects"] if "plot-suspects" in ids else [])
        # the recipe is folded away at the end: closed, its text hidden until the summary is clicked
        assert browser_page.eval_on_selector("details#recipe", "d => d.open") is False
        assert not browser_page.is_visible("details#recipe pre")
        assert browser_page.evaluate("document.body.lastElementChild.id") == "recipe"
        browser_page.screenshot(path=str(shots / "report.png"), full_page=True)
        browser_page.click("details#recipe > summary")
        assert browser_page.is_visible("details#recipe pre")
        browser_page.locator("#plot-activation-heatmap").screenshot(path=str(shots / "heatmap.png"))

    images, problems = open_in_chromium(page, inspect)
    assert problems == []
    # curves, learning rate, 2 heat maps, dead units, update ratios, filters, confusion, augmented samples,
    # and the suspect-label gallery when confident learning found any
    suspects = 'id="plot-suspects"' in page.read_text()
    assert len(images) == 9 + suspects and all(complete and width > 0 for complete, width in images)
    for shot in ("report.png", "heatmap.png"):
        assert (shots / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # heat-map rows are named by type, position and path (the text lives in the PNG: check the labels drawn)
    assert "conv 1 (stem.0)" in readable_labels(run.run_dir) and "relu 1 (stem.2)" in readable_labels(run.run_dir)


PLOTS = ["curves", "learning-rate", "activation-heatmap", "gradient-heatmap", "dead-units", "update-ratios",
         "filters", "confusion", "augmented"]  # fmt: skip


def readable_labels(run_dir: Path) -> list[str]:
    """The row labels the heat maps are drawn with."""
    from dragontrainer.monitor.diagnose import RunRecords
    from dragontrainer.report import plots
    from dragontrainer.report.html import checkpoint_shapes
    from dragontrainer.run import RunDir

    records = RunRecords.load(run_dir)
    labels = []
    for section, shapes in (("params", checkpoint_shapes(RunDir(run_dir))), ("activations", None)):
        names = list(records.layers[-1][section])
        labels += plots.readable_names(names, plots.layer_kinds(records, section, shapes))
    return labels


def test_a_dead_network_gets_hatched_explained_heat_maps(tmp_path: Path) -> None:
    """All-zero weights: nothing to colour. The rows say why instead of leaving a blank picture."""
    from matplotlib.figure import Figure

    from dragontrainer.monitor.diagnose import RunRecords
    from dragontrainer.report import plots

    train(overrides=[*TINY, "model.init=zeros", "monitor.every=5", f"run.dir={tmp_path}", "monitor.report=false"])
    records = RunRecords.load(tmp_path)
    texts: list[str] = []
    original = Figure.savefig

    def capture(figure: Figure, *args: Any, **kwargs: Any) -> None:
        texts.extend(t.get_text() for ax in figure.axes for t in ax.texts)
        original(figure, *args, **kwargs)

    Figure.savefig = capture  # type: ignore[method-assign]
    try:
        assert plots.layer_heatmap(records, "activations", lambda a: a["std"], "activation std", log=True)
        assert plots.layer_heatmap(records, "params", lambda p: p["grad_norm"] / p["weight_norm"]
                                   if p["weight_norm"] else None, "gradient / weight norm", log=True)  # fmt: skip
    finally:
        Figure.savefig = original  # type: ignore[method-assign]
    assert " 0: dead from here" in texts  # zero std: a dead layer, marked where it starts
    assert " no value: zero weights, or never measured" in texts


def test_comparison_page_links_runs_and_shows_findings_and_fixed_settings(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "train.epochs=2", "model.init=zeros,he", "--out", str(out), "--quiet"]) == 0
    page = out / "index.html"
    text = page.read_text()
    assert "model.widths=[64]" in text and "train.epochs=2" in text  # the fixed overrides
    assert "model.init" not in text.split('id="fixed"')[1].split("</p>")[0]  # the swept key is not fixed
    shots = tmp_path / "shots"

    def inspect(browser_page: Any) -> None:
        rows = browser_page.eval_on_selector_all(
            "table#runs tr", "rows => rows.slice(1).map(r => Array.from(r.cells).map(c => c.innerText))"
        )
        assert [row[0] for row in rows] == ["init=zeros", "init=he"]
        assert "bad_init" in rows[0][4] and rows[1][4] != rows[0][4]  # each run's own findings
        links = browser_page.eval_on_selector_all("table#runs a", "links => links.map(a => a.href)")
        assert len(links) == 2
        browser_page.screenshot(path=str(shots / "compare.png"), full_page=True)
        browser_page.click("table#runs a >> nth=1")  # the link opens that run's report
        assert browser_page.title().startswith("dragon report")

    images, problems = open_in_chromium(page, inspect)
    assert problems == [] and len(images) == 1 and images[0][0] and images[0][1] > 0
    assert (shots / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_findings_come_first_ordered_by_severity(tmp_path: Path) -> None:
    run = train(overrides=[*TINY, "preprocess.name=none", "model.init=zeros", f"run.dir={tmp_path}"])
    roots = [f["severity"] for f in run.findings if f["because"] is None]  # causes, each followed by what it explains
    assert roots == sorted(roots, key=["error", "warning", "info"].index)
    text = (tmp_path / "report.html").read_text()
    assert text.index("bad_init") < text.index("unnormalised_inputs") < text.index("<h2>Summary</h2>")
    assert json.loads((tmp_path / "findings.json").read_text()) == run.findings


def test_user_strings_are_escaped(tmp_path: Path) -> None:
    """A class folder and a run folder named like markup become text, never markup."""
    from PIL import Image

    data = tmp_path / "data"
    for name in (HOSTILE, "<script>alert(2)", "plain"):
        folder = data / name
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    run_dir = tmp_path / "<b>run</b>"
    train(overrides=[*TINY, "data.source=image-folder", f"data.path={data}", f"run.dir={run_dir}",
                     "data.val_fraction=0.34"])  # fmt: skip
    text = (run_dir / "report.html").read_text()
    for raw in (HOSTILE, "<script>alert(2)", "<b>run</b>"):
        assert raw not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;b&gt;run&lt;/b&gt;" in text
    assert text.count("<script") == 0
    _, problems = open_in_chromium(run_dir / "report.html")
    assert problems == []


def test_dragon_report_rewrites_findings_and_page(tmp_path: Path, capsys) -> None:
    run = train(overrides=[*TINY, f"run.dir={tmp_path}", "monitor.report=false"])
    assert not (run.run_dir / "report.html").exists() and run.findings == []
    assert main(["report", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "findings.json").read_text())
    page, findings = report(tmp_path)
    assert page == tmp_path / "report.html" and page.exists()
    assert [f.to_dict() for f in findings] == printed


def test_dragon_report_on_a_folder_that_never_trained(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path) in err
