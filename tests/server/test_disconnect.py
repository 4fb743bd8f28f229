"""Clients that go away (a stream closed mid-way, a plain request whose socket closes) have their rows retired by
the serving loop at once, while other requests keep decoding — against a real server process."""

import socket
import threading
import time

import httpx
import pytest

from bench.serving_http import free_port, start_server
from tests.server.conftest import metric, metric_values

LONG = {"max_new_tokens": 256, "ignore_eos": True}


def running_rows(base: str) -> float:
    return metric(metric_values(httpx.get(f"{base}/metrics").text), "mhr_running_rows")


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_rows_of_clients_that_disconnect_are_retired_while_others_decode(printable_bundle, tmp_path):
    """(printable_bundle: every token is one visible character, so a stream sends text from the first step.)"""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(printable_bundle / "model", printable_bundle / "inventory", tmp_path / "adapted", port, 1,
                        extra_env={"MHR_MAX_NEW_TOKENS": "256"})
    try:
        finished = []
        other = threading.Thread(target=lambda: finished.append(httpx.post(
            f"{base}/generate", json={"task": "beta", "inputs": "keeps going", **LONG}, timeout=120)))
        with httpx.Client(timeout=120) as http, http.stream(
                "POST", f"{base}/generate", json={"task": "alpha", "inputs": "streamed", "stream": True, **LONG}) as s:
            lines = s.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # the stream is decoding
            other.start()
            assert wait_until(lambda: running_rows(base) == 2)
        # the streaming client closed: its row leaves while the other request still decodes
        assert wait_until(lambda: running_rows(base) == 1 or finished), "the closed stream's row kept running"
        assert not finished, "the other request finished first: nothing shows the row was retired early"
        other.join()
        assert finished[0].status_code == 200 and finished[0].json()["outputs"][0]["completion_tokens"] == 256

        # a plain (non-streaming) request whose client closes its socket
        raw = socket.create_connection(("127.0.0.1", port))
        body = b'{"task": "gamma", "inputs": "plain", "max_new_tokens": 256, "ignore_eos": true}'
        raw.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: running_rows(base) == 1)
        raw.close()
        assert wait_until(lambda: running_rows(base) == 0, timeout=5), "the disconnected request kept decoding"
        # the server is fine afterwards
        ok = httpx.post(f"{base}/generate", json={"task": "alpha", "inputs": "after", "max_new_tokens": 4})
        assert ok.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
