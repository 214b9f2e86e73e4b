"""report.html: self-contained, opens in headless Chromium without errors, every image present, and
every user-controlled string escaped."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dragontrainer import report, train
from dragontrainer.cli import main
from tests.conftest import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<img src=x onerror=alert(1)>"


def open_in_chromium(page_path: Path) -> tuple[list[list], list[str]]:
    """(every image's [complete, naturalWidth], every console error, page error or dialog)."""
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
        browser.close()
    return images, problems


def test_report_opens_in_chromium_with_every_figure(tmp_path: Path) -> None:
    run = train(overrides=[*TINY, "model.name=vgg", "model.widths=[8,8]", "monitor.every=3", f"run.dir={tmp_path}"])
    page = run.run_dir / "report.html"
    text = page.read_text()
    assert text.index("What the dragon tells you") < text.index("<h2>Training</h2>")
    assert "http" not in text.split("<pre>")[0]  # self-contained: nothing to fetch
    images, problems = open_in_chromium(page)
    assert problems == []
    # curves, learning rate, 2 heat maps, dead units, update ratios, filters, confusion, augmented samples,
    # and the suspect-label gallery when confident learning found any
    suspects = 'id="plot-suspects"' in text
    assert len(images) == 9 + suspects and all(complete and width > 0 for complete, width in images)


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
