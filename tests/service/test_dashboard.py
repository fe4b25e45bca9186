"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): submit a
job from the form, watch its progress bar reach succeeded, open its page, see the loss chart."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.service.conftest import Box

pytestmark = pytest.mark.service

CHROMIUM = os.environ.get("GPTQD_CHROMIUM", "/usr/bin/chromium")
# a closed network: background services would only fill the log with refused connections
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        reason = f"chromium not found at {CHROMIUM} (make test installs Debian's chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_submit_watch_and_inspect_a_job_in_the_browser(team_box: Box, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{team_box.url}/")
    page.wait_for_selector("#submit-form")

    form = page.locator("#submit-form")
    form.locator("[name=model_id]").fill("tiny")
    form.locator("[name=name]").fill("browser-job")
    form.locator("[name=group_size]").select_option("32")
    form.locator("[name=dataset]").fill("builtin")
    form.locator("[name=num_samples]").fill("8")
    form.locator("[name=seq_length]").fill("64")
    form.locator("button[type=submit]").click()

    row = page.locator("#jobs tbody tr", has_text="browser-job")
    row.wait_for(timeout=30_000)
    # the row's progress bar follows the event stream until the job is done
    page.wait_for_function(
        "() => [...document.querySelectorAll('#jobs tbody tr')].some("
        "r => r.textContent.includes('browser-job') && r.dataset.status === 'succeeded')",
        timeout=240_000,
    )
    assert row.locator(".progress").get_attribute("data-fraction") == "1"
    assert "succeeded" in row.locator(".status").inner_text()

    row.click()
    page.wait_for_selector("#job-view:not([hidden])")
    # 2 blocks x 7 Llama linears: one bar per module, read from the checkpoint's report
    page.wait_for_function("() => document.querySelectorAll('#loss-chart rect.bar').length === 14",
                           timeout=30_000)
    metrics = page.locator("#job-metrics").inner_text()
    assert "perplexity before" in metrics and "perplexity after" in metrics
    links = page.locator("#artifacts a")
    names = [links.nth(i).inner_text() for i in range(links.count())]
    assert "model.safetensors" in names and "quantize_config.json" in names

    assert page.locator("#job-view .progress .bar").evaluate("b => parseFloat(b.style.width)") == 100
    page.wait_for_timeout(500)  # let the bar's CSS transition finish before the screenshot
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "dashboard-job.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == [], errors
