"""The lines `gptqd submit --wait` prints when a job ends (app/commands/service.summary)."""

from __future__ import annotations

from app.commands.service import summary


def _job(evaluation: dict) -> dict:
    return {
        "id": "job_1", "status": "succeeded", "error": None, "artifacts": ["a", "b"],
        "links": {"archive": "/jobs/job_1/archive"},
        "metrics": {"perplexity_before": 12.5, "perplexity_after": 12.75, "evaluation": evaluation},
    }


def test_samples_or_why_there_are_none() -> None:
    shown = summary(_job({"source": "builtin-heldout", "held_out": True, "samples_after": ["Once upon a hill"]}))
    assert shown.splitlines() == [
        "job job_1: succeeded",
        "perplexity: 12.500 before, 12.750 after quantization on builtin-heldout",
        "sample: 'Once upon a hill'",
        "artifacts: 2 files, GET /jobs/job_1/archive",
    ]
    why = "greedy samples need the whole model: lazy loading was asked for"
    assert f"no samples: {why}" in summary(_job({"samples_skipped": why})).splitlines()
