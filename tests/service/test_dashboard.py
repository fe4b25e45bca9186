"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): submit a
job from the form (with per-layer rules), watch its progress bar reach succeeded, open its page, see the loss chart
drawn to the scale of its data; a failed job says why, once, in the list and on its page."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from tests.service.conftest import NO_VERIFY, TERMINAL, Box, start_box, tiny_spec, wait_status
from tests.service.helpers import verify_stored

pytestmark = pytest.mark.service

SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts"


# one layer left unquantized, the output projections at 8 bits (the job's verification then
# reads a mixed checkpoint)
RULES = {r"-:model\.layers\.1\.mlp\.down_proj$": {}, r"+:.*\.o_proj": {"bits": 8}}


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
    # per-layer rules: text that is not JSON is refused on the page, before any request
    rules = form.locator("[name=dynamic]")
    rules.fill("{down_proj: 8}")
    form.locator("button[type=submit]").click()
    assert "Per-layer rules: not JSON" in page.locator("#submit-error").inner_text()
    # the server's refusal is shown as it says it: rules match module names, which the
    # "names for vLLM" box (tensor_names "original") would change
    rules.fill(json.dumps(RULES))
    form.locator("[name=original_names]").check()
    form.locator("button[type=submit]").click()
    page.wait_for_function("() => document.querySelector('#submit-error').textContent.includes('module')")
    assert "tensor_names 'module'" in page.locator("#submit-error").inner_text()
    form.locator("[name=original_names]").uncheck()
    form.locator("button[type=submit]").click()

    row = page.locator("#jobs tbody tr", has_text="browser-job")
    row.wait_for(timeout=30_000)
    [job] = [j for j in team_box.http.get("/jobs").json()["items"] if j["name"] == "browser-job"]
    assert job["spec"]["dynamic"] == RULES and job["spec"]["tensor_names"] == "module"
    assert "+2 rules" in row.inner_text()
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
    # 2 blocks x 7 Llama linears but the one a rule skipped: a bar per module, from the report
    page.wait_for_function("() => document.querySelectorAll('#loss-chart rect.bar').length === 13",
                           timeout=30_000)
    check_chart_scale(page)
    metrics = page.locator("#job-metrics").inner_text()
    assert "perplexity before" in metrics and "perplexity after" in metrics
    job = next(j for j in team_box.http.get("/jobs").json()["items"] if j["name"] == "browser-job")
    agreement = re.search(r"top-1 agreement\s+([\d.]+)%", metrics).group(1)
    assert agreement == f"{100 * job['metrics']['top1_agreement']:.1f}", metrics
    kl = float(re.search(r"KL to the original\s+([\d.e-]+) nats/token", metrics).group(1))
    assert kl == pytest.approx(job["metrics"]["kl_divergence"], rel=5e-3), metrics
    assert re.search(r"scored on\s+builtin-heldout", metrics), metrics  # not the calibration text
    links = page.locator("#artifacts a")
    names = [links.nth(i).inner_text() for i in range(links.count())]
    assert "model.safetensors" in names and "quantize_config.json" in names

    assert page.locator("#job-view .progress .bar").evaluate("b => parseFloat(b.style.width)") == 100
    assert page.locator("#samples-panel").is_visible()

    # verify the stored checkpoint from the page: a worker measures it, the row shows the result
    page.locator("#verify-button").click()
    done = page.locator("#verifications tr.verification[data-status=succeeded]")
    done.wait_for(timeout=240_000)
    assert re.search(r"perplexity [\d.]+ on builtin-heldout", done.inner_text()), done.inner_text()
    page.wait_for_timeout(500)  # let the bar's CSS transition finish before the screenshot
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "dashboard-job.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == [], errors


# the bars and the y-axis as drawn: [{loss, height}], and the decades the ticks name
READ_CHART = """(svg) => ({
  bars: [...svg.querySelectorAll('rect.bar')].map(
    (r) => ({loss: Number(r.dataset.loss), height: Number(r.getAttribute('height'))})),
  ticks: [...svg.querySelectorAll('text.tick')].map((t) => Number(t.textContent.slice(2))),
})"""


def check_chart_scale(page, svg: str = "#loss-chart") -> None:
    """The axis spans the data (bottom tick <= smallest loss, top tick >= largest) and a bigger
    loss never has a shorter bar, nor do two different losses get the same one at the top."""
    chart = page.locator(svg).evaluate(READ_CHART)
    losses = [b["loss"] for b in chart["bars"]]
    assert chart["ticks"], chart
    assert 10.0 ** min(chart["ticks"]) <= min(losses), chart
    assert 10.0 ** max(chart["ticks"]) >= max(losses), chart
    ordered = sorted(chart["bars"], key=lambda b: b["loss"])
    heights = [b["height"] for b in ordered]
    assert heights == sorted(heights), ordered
    tallest = [b for b in chart["bars"] if b["height"] == max(heights)]
    assert len({b["loss"] for b in tallest}) == 1, tallest


# the losses of issue 14: 11 of these 12 bars were pinned to the top of a 1e-4..1e-3 axis
ISSUE_LOSSES = [1.4e-4, 3.1e-4, 2.2e-3, 5.5e-3, 1.2e-2, 3.3e-2, 0.071, 0.12, 0.25, 0.38, 0.55, 0.79]


def test_the_loss_chart_scale_fits_losses_below_one(team_box: Box, browser) -> None:
    page = browser.new_page()
    page.goto(f"{team_box.url}/")
    page.wait_for_selector("#submit-form")
    page.evaluate("""(losses) => {
      const svg = document.getElementById('loss-chart');
      drawLossChart(svg, losses.map((loss, i) => ({name: `model.layers.${i}.mlp`, block: i, loss})));
    }""", ISSUE_LOSSES)
    check_chart_scale(page)
    ticks = page.locator("#loss-chart").evaluate(READ_CHART)["ticks"]
    assert (min(ticks), max(ticks)) == (-4, 0)


def test_a_failed_job_says_why_once(team_box: Box, browser) -> None:
    http = team_box.http
    name = f"doomed-{uuid.uuid4().hex[:6]}"  # the box is shared: the CLI test has its own
    job = http.post("/jobs", json=tiny_spec(model_id="no-such-model", name=name,
                                            verify=NO_VERIFY)).json()
    job = wait_status(http, job["id"], TERMINAL)
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_found"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{team_box.url}/")
    row = page.locator("#jobs tbody tr", has_text=name)
    row.wait_for(timeout=30_000)
    assert "model_not_found" in row.locator(".status .why").inner_text()
    assert row.locator("td.created").inner_text() in ("just now", "1 min ago", "2 min ago", "3 min ago")

    row.click()
    page.wait_for_selector("#job-view:not([hidden])")
    page.wait_for_function("() => document.querySelector('#job-error').textContent !== ''")
    shown = page.locator("#job-view").inner_text()
    assert shown.count(job["error"]["message"]) == 1, shown
    assert page.locator("#downloads").is_hidden()
    assert page.locator("#samples-panel").is_hidden()


def test_upload_a_calibration_file_from_the_form(team_box: Box, browser, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Text to calibrate a model with.\n" * 20)
    page = browser.new_page()
    page.goto(f"{team_box.url}/")
    page.wait_for_selector("#submit-form")
    page.locator("#dataset-file").set_input_files(str(corpus))
    select = page.locator("#submit-form [name=dataset_id]")
    page.wait_for_function("() => document.querySelector('[name=dataset_id]').value.startsWith('ds_')")
    chosen = select.evaluate("s => s.selectedOptions[0].textContent")
    assert chosen.startswith("corpus.txt"), chosen
    listed = {d["id"] for d in team_box.http.get("/datasets").json()["items"]}
    assert select.input_value() in listed


@pytest.fixture(scope="module")
def streaming_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """Workers told a whole model may take none of the memory: every job streams its model."""
    box = start_box(tmp_path_factory.mktemp("streaming"), models_dir,
                    {"GPTQD_WHOLE_MODEL_SHARE": "0", "HF_HUB_OFFLINE": "1"}, workers=1)
    try:
        yield box
    finally:
        box.close()


def test_a_streamed_job_scores_perplexity_and_says_why_it_has_no_samples(streaming_box: Box, browser) -> None:
    """Samples are asked for (tiny_spec), but the model may not be held whole: the worker reads
    it block by block, measures perplexity on the way, and the job and its page say why there
    is no sample text."""
    http = streaming_box.http
    job = http.post("/jobs", json=tiny_spec(name="streamed")).json()
    job = wait_status(http, job["id"], TERMINAL, timeout=240)
    assert job["status"] == "succeeded", job
    metrics = job["metrics"]
    assert metrics["perplexity_before"] > 1 and metrics["perplexity_after"] > 1
    assert metrics["kl_divergence"] > 0 and 0 < metrics["top1_agreement"] < 1  # carried along too
    evaluation = metrics["evaluation"]
    assert "samples_after" not in evaluation
    why = evaluation["samples_skipped"]
    assert why.startswith("greedy samples need the whole model: the whole model (")
    assert why.endswith("so it was read block by block")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{streaming_box.url}/")
    row = page.locator("#jobs tbody tr", has_text="streamed")
    row.wait_for(timeout=30_000)
    row.click()
    page.wait_for_selector("#job-view:not([hidden])")
    page.wait_for_selector("#samples-panel:not([hidden])")
    assert page.locator("#samples").inner_text() == f"No samples: {why}."
    assert "perplexity after" in page.locator("#job-metrics").inner_text()

    # a verification of the stored checkpoint reads it block by block too, to the same number
    result = verify_stored(http, job)
    assert result["samples"] == []
    assert result["samples_skipped"].startswith("greedy samples need the whole model: the checkpoint (")
