"""The lines `gptqd submit --wait` prints when a job ends (app/commands/service.summary)."""

from __future__ import annotations

from app.commands.service import summary


def _job(evaluation: dict) -> dict:
    return {
        "id": "job_1", "status": "succeeded", "error": None, "artifacts": ["a", "b"],
        "links": {"archive": "/jobs/job_1/archive"},
        "metrics": {"perplexity_before": 12.5, "perplexity_after": 12.75, "evaluation": evaluation,
                    "kl_divergence": 0.01234, "top1_agreement": 0.96875},
    }


def test_samples_or_why_there_are_none() -> None:
    shown = summary(_job({"source": "builtin-heldout", "held_out": True, "samples_after": ["Once upon a hill"]}))
    assert shown.splitlines() == [
        "job job_1: succeeded",
        "perplexity: 12.500 before, 12.750 after quantization on builtin-heldout",
        "agreement with the original: top-1 token 96.9%, KL 0.0123 nats per token",
        "sample: 'Once upon a hill'",
        "artifacts: 2 files, GET /jobs/job_1/archive",
    ]
    why = "greedy samples need the whole model: lazy loading was asked for"
    assert f"no samples: {why}" in summary(_job({"samples_skipped": why})).splitlines()


def test_a_waited_verification_shows_its_progress_and_lists_how_far_it_is(capsys) -> None:
    """`gptqd verify --wait` draws the verification's polled progress (one line a poll off a
    terminal); `gptqd verifications` says how far a running one is."""
    from app.client import Client
    from app.commands.manage import _verification_row
    from app.commands.service import follow_verification

    def running(stage: str, fraction: float, block: int | None) -> dict:
        return {"id": "ver_1", "status": "running", "created_at": "2026-11-30T00:00:00+00:00",
                "progress": {"stage": stage, "fraction": fraction, "block": block,
                             "num_blocks": 4 if block else None, "module": None,
                             "eta_seconds": 3.0 if block else None, "message": ""}}

    answers = iter([running("loading", 0.0, None), running("evaluating", 0.55, 2),
                    {"id": "ver_1", "status": "succeeded", "result": {"perplexity": 3.5}}])

    class Polled(Client):
        def verification(self, job_id: str, verification_id: str) -> dict:
            return next(answers)

    ended = follow_verification(Polled("http://127.0.0.1:9"), "job_1", "ver_1")
    assert ended["status"] == "succeeded"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("loading       0%")
    assert lines[1].startswith("evaluating   55%  block 2/4 |") and lines[1].endswith("ETA 00:03")
    row = _verification_row(running("evaluating", 0.55, 2))
    assert row[:2] == ["ver_1", "running (evaluating 55%)"] and row[3] == "-"
