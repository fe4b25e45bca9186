"""A hub that does not answer costs one short probe, not ~30 s of silent retries, and the
error says the hub could not be reached."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable

import huggingface_hub.constants
import pytest

from worker.gptq import hubstatus
from worker.gptq.errors import CalibrationError, ModelNotFound
from worker.gptq.modelio import load_config


@pytest.fixture
def hub_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Points huggingface_hub at a given URL, online (tests/conftest.py gives each test a
    fresh probe and undoes the offline mode an unreachable hub turns on)."""
    import datasets.config

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return lambda url: monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: a connection is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_a_hub_model_in_seconds_and_says_why(hub_at) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    hub_at(url)
    started = time.monotonic()
    with pytest.raises(ModelNotFound) as info:
        load_config("some-org/not-a-model-anywhere")
    # huggingface_hub alone retries five times with back-off: 23 s on a refused connection
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert f"the hub ({url}) could not be reached (ConnectError" in message, message
    assert "'some-org/not-a-model-anywhere' is not a local directory" in message
    assert "local model directory" in message
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the rest of the process uses the cache


def test_an_unreachable_hub_refuses_a_hub_dataset_before_any_model_is_read(hub_at) -> None:
    from worker.gptq.calibration import check_source

    url = f"http://127.0.0.1:{_closed_port()}"
    hub_at(url)
    started = time.monotonic()
    with pytest.raises(CalibrationError) as info:
        check_source("wikitext:wikitext-2-raw-v1:test", "eval text")
    assert time.monotonic() - started < 10  # datasets alone: ~24 s of retries
    message = str(info.value)
    assert message.startswith("eval text dataset 'wikitext' config 'wikitext-2-raw-v1' split "
                              "'test' could not be loaded"), message
    assert f"the hub ({url}) could not be reached" in message and "'builtin'" in message


def test_a_hub_that_answers_is_left_online(hub_at) -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_address[1]}")
        assert hubstatus.unreachable() is None  # any answer, even 404, is a hub that answers
        assert not huggingface_hub.constants.HF_HUB_OFFLINE
    finally:
        server.shutdown()
