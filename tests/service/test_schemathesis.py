"""Schemathesis against the live server's OpenAPI: hundreds of generated requests (valid and
invalid, derandomized so every run sends the same ones) and not one 5xx. The server runs on
its embedded defaults with no worker: jobs it accepts just stay queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from tests.service.conftest import Box, start_box

pytestmark = pytest.mark.service

EXAMPLES_PER_OPERATION = 40  # per operation and per mode (valid / invalid data)
SENT: list[tuple[str, str, int]] = []


@pytest.fixture(scope="module")
def fuzz_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    box = start_box(tmp_path_factory.mktemp("fuzz"), models_dir,
                    {"GPTQD_MAX_QUEUED_PER_KEY": "20"}, workers=0)
    yield box
    box.close()


def operations(url: str) -> list:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def fuzz(operation, mode: GenerationMode) -> None:
    """EXAMPLES_PER_OPERATION requests of one operation, each checked for a 5xx."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
              database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def one(case) -> None:
        response = case.call(timeout=15)
        SENT.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, (case.method, case.formatted_path, case.body,
                                            response.text[:500])
        assert "Traceback" not in response.text

    try:
        one()
    except Unsatisfiable:
        # nothing in this operation can be made invalid (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE


def test_no_generated_request_gets_a_5xx(fuzz_box: Box) -> None:
    ops = operations(fuzz_box.url)
    assert len(ops) >= 10
    for operation in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    print(f"{len(SENT)} generated requests, none answered 5xx")
    assert len(SENT) >= 500, len(SENT)
    assert {code // 100 for _, _, code in SENT} >= {2, 4}  # both accepted and refused ones
