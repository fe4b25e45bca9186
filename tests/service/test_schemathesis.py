"""Schemathesis against the live server's OpenAPI: hundreds of generated requests (valid and
invalid, derandomized so every run sends the same ones, NULs included) and not one 5xx nor a
status the description does not list for the operation, with
the store on SQLite and on PostgreSQL (which refuses text that SQLite stores). The server has
no worker: jobs it accepts just stay queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.case import Case
from schemathesis.generation.modes import GenerationMode

from tests.service.conftest import STORES, Box, start_box, store_env

pytestmark = pytest.mark.service

EXAMPLES_PER_OPERATION = 30  # per operation and per mode (valid / invalid data)
SENT: list[tuple[str, str, int]] = []


@pytest.fixture(scope="module", params=STORES)
def fuzz_box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             models_dir: Path) -> Iterator[Box]:
    with store_env(request.param) as store:
        box = start_box(tmp_path_factory.mktemp("fuzz"), models_dir,
                        {"GPTQD_MAX_QUEUED_PER_KEY": "20", **store}, workers=0)
        yield box
        box.close()


def operations(url: str) -> list:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def with_nul(value: Any) -> Any:
    """value with a NUL in the middle of every string in it (not in keys: those name the
    parameters and fields, which must stay known for the NUL to reach deep)."""
    if isinstance(value, str):
        return value[: len(value) // 2] + "\x00" + value[len(value) // 2:]
    if isinstance(value, list):
        return [with_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: with_nul(v) for k, v in value.items()}
    return value


def nul_variant(case: Case) -> Case:
    """The case with a NUL in each string of its path, query and JSON body: a generated
    request rarely holds one, and PostgreSQL refuses NUL in text where SQLite stores it."""
    variant = case.derive(query=with_nul(case.query), keep_auth=True)
    variant.path_parameters = with_nul(case.path_parameters)
    if case.media_type == "application/json":
        variant.body = with_nul(case.body)
    return variant


def send(case: Case) -> None:
    response = case.call(timeout=15)
    SENT.append((case.method, case.path, response.status_code))
    assert response.status_code < 500, (case.method, case.formatted_path, case.body,
                                        response.text[:500])
    assert "Traceback" not in response.text


def fuzz(operation, mode: GenerationMode) -> None:
    """EXAMPLES_PER_OPERATION requests of one operation, and as many with NULs, each checked
    for a 5xx."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
              database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def one(case: Case) -> None:
        send(case)
        send(nul_variant(case))

    try:
        one()
    except Unsatisfiable:
        # nothing in this operation can be made invalid (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE


def test_no_generated_request_gets_a_5xx(fuzz_box: Box) -> None:
    SENT.clear()  # once per store
    ops = operations(fuzz_box.url)
    assert len(ops) >= 10
    for operation in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    print(f"{len(SENT)} generated requests, none answered 5xx")
    # and every answer is one the description promises for that operation
    described = fuzz_box.http.get("/openapi.json").json()["paths"]
    undocumented = {(method, path, code) for method, path, code in SENT
                    if str(code) not in described[path][method.lower()]["responses"]}
    assert not undocumented, sorted(undocumented)
    assert len(SENT) >= 1000, len(SENT)
    assert {code // 100 for _, _, code in SENT} >= {2, 4}  # both accepted and refused ones
