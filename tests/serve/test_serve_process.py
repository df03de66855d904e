"""`persrec serve` as a real uvicorn process: answers on loopback, then SIGTERM ends it cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

from tests.serve.conftest import free_port
from tests.serve.model_dirs import ITEM_IDS


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_serve_answers_and_shuts_down_on_sigterm(model_dirs, tmp_path):
    port = free_port()
    store = tmp_path / "store.db"
    command = [sys.executable, "-m", "persrec.cli", "serve", str(model_dirs["PersonalizedSASRec"])]
    command += ["--port", str(port), "--store", f"sqlite:///{store}", "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as answer:
                    assert json.loads(answer.read())["status"] == "ok"
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.05)
        _post(f"{base}/events", {"user_id": "u1", "items": ITEM_IDS[:9]})
        assert len(_post(f"{base}/recommend", {"user_id": "u1", "k": 3})["items"]) == 3
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    # uvicorn drains the requests, runs the app's shutdown, then re-raises the signal for the parent to see
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output and "Traceback" not in output
    assert "127.0.0.1" in output  # bound to loopback by default
    from persrec.serve.store import open_store

    reopened = open_store(str(store))  # the store outlives the server
    assert reopened.history("u1").items == ITEM_IDS[:9]
    reopened.close()
