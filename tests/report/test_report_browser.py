"""The report in a real headless browser (Debian's Chromium, driven by playwright).

Checks that the page loads with no console errors and no network requests, that every plot
draws the expected number of points, and writes screenshots for a person to look at (into
``$LMFORGE_SCREENSHOT_DIR`` when set, else the test's tmp folder; the path is printed).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lmforge.report import write_report

from ._runs import make_run

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium; "
                                                "`make test` does it when run as root)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], timeout=60_000)
        yield b
        b.close()


def _open(browser, page_file: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    console, requests = [], []
    page.on("console", lambda m: console.append((m.type, m.text)))
    page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_file.as_uri(), wait_until="load", timeout=30_000)
    return page, console, requests


def _points(page) -> dict[str, list[int]]:
    """data-series -> [declared points, coordinates drawn] for every line/scatter/bar series."""
    return page.evaluate("""() => {
        const out = {};
        for (const el of document.querySelectorAll('.series')) {
            const plot = el.closest('svg').dataset.plot, key = plot + '|' + el.dataset.series;
            const drawn = el.tagName === 'path' ? (el.getAttribute('d').match(/[ML]/g) || []).length
                        : el.querySelectorAll('circle, rect').length;
            out[key] = [Number(el.dataset.points), drawn];
        }
        return out;
    }""")


def _shot(page, tmp_path: Path, name: str) -> Path:
    target = Path(os.environ.get("LMFORGE_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    print(f"screenshot: {path}")
    return path


def test_single_run_page_in_chromium(browser, tmp_path):
    run = make_run(tmp_path, "demo-run", steps=80, eval_every=10, spike_at=50, kl=True)
    out = write_report([run])
    page, console, requests = _open(browser, out)
    assert console == []
    assert requests == [out.as_uri()]  # the page itself and nothing else
    assert page.evaluate("window.lmforgeData['demo-run'].train.length") == 80
    pts = _points(page)
    assert pts["train:loss|loss (raw)"] == [80, 80]
    assert pts["train:loss|loss (smoothed)"] == [80, 80]
    assert pts["train:lr|lr"] == [80, 80]
    assert pts["train:grad_norm|grad_norm (raw)"] == [80, 80]
    assert pts["eval:accuracy|accuracy"] == [8, 8]
    assert pts["train:kl|kl (raw)"] == [80, 80]
    assert pts["scatter:sts|points"] == [4, 4]
    assert pts["ner_f1|bars"] == [2, 2]
    assert page.locator("svg[data-plot=confusion] rect.cell").count() == 4
    assert page.locator("svg[data-plot='eval:accuracy'] g.marker").count() == 1
    warnings = page.locator("#warnings li").all_inner_texts()
    assert any("loss spike" in w for w in warnings) and any("negative KL" in w for w in warnings)
    _shot(page, tmp_path, "report_single.png")
    page.close()


def test_compare_page_in_chromium(browser, tmp_path):
    a = make_run(tmp_path, "lr-1e-3", lr=1e-3, seed=1, steps=60)
    b = make_run(tmp_path, "lr-3e-3", lr=3e-3, seed=2, steps=45, peak_early=True)
    out = write_report([a, b], tmp_path / "compare.html")
    page, console, requests = _open(browser, out)
    assert console == [] and requests == [out.as_uri()]
    pts = _points(page)
    assert pts["train:loss|lr-1e-3: loss (raw)"] == [60, 60]
    assert pts["train:loss|lr-3e-3: loss (raw)"] == [45, 45]
    assert pts["eval:accuracy|lr-3e-3: accuracy"] == [4, 4]
    assert page.locator("svg[data-plot='eval:accuracy'] g.marker").count() == 2
    table = page.locator("#compare + h3 + table").inner_text()
    assert "train.lr" in table and "train.max_steps" in table and "model.name" not in table
    _shot(page, tmp_path, "report_compare.png")
    if os.environ.get("LMFORGE_SCREENSHOT_DIR"):
        shutil.copy(out, Path(os.environ["LMFORGE_SCREENSHOT_DIR"]) / "report_compare.html")
    page.close()


def test_stopped_run_with_samples_in_chromium(browser, tmp_path):
    run = make_run(tmp_path, "stopped-run", steps=80, eval_every=10, stop_at=37)
    out = write_report([run])
    page, console, requests = _open(browser, out)
    assert console == [] and requests == [out.as_uri()]
    assert _points(page)["train:loss|loss (raw)"] == [36, 36]  # the logged steps before the stop
    warnings = page.locator("#warnings li").all_inner_texts()
    assert warnings[0] == "stopped at step 37: non-finite loss (the last good checkpoint is kept)"
    assert not any("did not finish" in w for w in warnings)
    assert "stopped at step 37: non-finite loss" in page.locator("#summary + table").inner_text()
    heads = page.locator("table.samples th").all_inner_texts()
    assert heads == ["input", "before", "after", "reference"]
    assert page.locator("table.samples tr").count() == 3
    assert page.get_by_text("Sample generations before and after training").count() == 1
    _shot(page, tmp_path, "report_stopped_samples.png")
    page.close()
