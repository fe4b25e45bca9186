"""GET /metrics on a live box: the Prometheus numbers agree with what the API says of the jobs."""

from __future__ import annotations

import pytest

from tests.service.conftest import Box, tiny_spec, wait_status
from tests.service.helpers import scrape

pytestmark = pytest.mark.service


def count(box: Box, status: str) -> int:
    n, cursor = 0, None
    with box.http as http:
        while True:
            page = http.get("/jobs", params={"status": status, "limit": 200,
                                             **({"cursor": cursor} if cursor else {})}).json()
            n += len(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return n


def test_metrics_follow_the_jobs(team_box: Box) -> None:
    with team_box.http as http:
        job = http.post("/jobs", json=tiny_spec(verify={"perplexity": False,
                                                        "max_new_tokens": 0})).json()
        done = wait_status(http, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]

    m = scrape(team_box.url)
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert m[("gptqd_jobs", (("status", status),))] == count(team_box, status), status
    assert m[("gptqd_queue_depth", ())] == count(team_box, "queued")
    succeeded = count(team_box, "succeeded")
    assert m[("gptqd_job_duration_seconds_count", ())] == succeeded
    assert m[("gptqd_job_duration_seconds_bucket", (("le", "+Inf"),))] == succeeded
    assert m[("gptqd_job_duration_seconds_sum", ())] > 0
    stages = {labels[0][1]: v for (name, labels), v in m.items()
              if name == "gptqd_stage_seconds_total"}
    assert stages and all(v >= 0 for v in stages.values()) and sum(stages.values()) > 0
    assert ("gptqd_busy_workers", ()) in m
