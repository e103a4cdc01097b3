"""`tuner dashboard`: the real optuna-dashboard on a study made by a real sweep, with its artifact store. Its JSON API
lists the study, the trials, their user attributes and artifacts; headless Chromium renders the trial view with
the scatter chart loaded (checked through the DevTools protocol: the image's decoded width, not just its tag)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tuner_cmd

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def dashboard(swept):
    """`tuner dashboard --port 0` in a subprocess; its URL as printed. Stopped (SIGTERM) at the end."""
    proc = subprocess.Popen(tuner_cmd() + ["dashboard", "--storage", swept.url, "--port", "0"], cwd=swept.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    url, seen, deadline = None, [], time.time() + 120
    while url is None and time.time() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        url = m.group(1) if m else None
    assert url, f"no URL from tuner dashboard: {''.join(seen)} {proc.stderr.read() if proc.poll() is not None else ''}"
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    reader.join(timeout=30)  # every line the command printed before it exited
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert "dashboard stopped" in "".join(rest)


def fetch(url: str) -> tuple[int, dict, bytes]:
    # optuna-dashboard's static bundle answers 500 to a request without Accept-Encoding; browsers always send one.
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=30) as res:
        body = res.read()
        if res.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return res.status, dict(res.headers), body


def _attrs(items: list[dict]) -> dict:
    return {i["key"]: i["value"] for i in items}


def test_api_lists_the_study_trials_attributes_and_artifacts(dashboard, swept):
    from tuner import artifacts

    status, _, body = fetch(dashboard + "api/studies")
    assert status == 200
    [summary] = [s for s in json.loads(body)["study_summaries"] if s["study_name"] == "shared"]
    _, _, body = fetch(dashboard + f"api/studies/{summary['study_id']}")
    detail = json.loads(body)
    study = swept.study()
    assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
    for served, t in zip(detail["trials"], study.trials):
        attrs = _attrs(served["user_attrs"])
        for key in ("mae", "rmsle", "hit_rate", "parse_fail_rate", "r", "alpha", "target_set", "quantization",
                    "wandb_run_id", "adapter_artifact_id", "predictions_artifact_id", "scatter_artifact_id",
                    "duration_s", "device", "trainable_params"):
            assert key in attrs, key
        assert float(attrs["mae"]) == pytest.approx(t.user_attrs["mae"])
        assert attrs["wandb_run_id"] == t.user_attrs["wandb_run_id"] and attrs["device"] == "cpu"
        # The rank is a parameter named `r` with the trained value, in the dashboard's own view too (#16).
        shown = {q["name"]: q["param_external_value"] for q in served["params"]}
        assert "r_exp" not in shown and int(shown["r"]) == t.user_attrs["r"] in (8, 16)
        listed = {a["artifact_id"]: a for a in served["artifacts"]}
        assert set(listed) == {attrs["adapter_artifact_id"], attrs["predictions_artifact_id"],
                               attrs["scatter_artifact_id"]}
        scatter = listed[attrs["scatter_artifact_id"]]
        assert scatter["filename"] == f"trial-{t.number}-scatter.png" and scatter["mimetype"] == "image/png"
        status, headers, png = fetch(dashboard + f"artifacts/{summary['study_id']}/{served['trial_id']}/"
                                                 f"{scatter['artifact_id']}")
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert png == (swept.store / scatter["artifact_id"]).read_bytes()
        assert served["intermediate_values"], "the sweep evaluates every 2 steps"
    baselines = _attrs(detail["user_attrs"])
    assert "baseline_median_mae" in baselines and baselines[artifacts.STORE_ATTR] == str(swept.store)
    status, _, bundle = fetch(dashboard + "static/bundle.js")
    assert status == 200 and len(bundle) > 100_000


# ---------------------------------------------------------------------------------------------------------------
# Headless Chromium, driven through the DevTools protocol (a minimal WebSocket client: nothing to install)


class DevTools:
    def __init__(self, ws_url: str):
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", ws_url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _recv_message(self) -> dict:
        payload = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._recv_exact(2), "big")
            elif n == 127:
                n = int.from_bytes(self._recv_exact(8), "big")
            payload += self._recv_exact(n)
            if b0 & 0x80:
                return json.loads(payload)

    def call(self, method: str, **params):
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81]) + (bytes([0x80 | len(data)]) if len(data) < 126 else
                                  bytes([0x80 | 126]) + len(data).to_bytes(2, "big"))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            msg = self._recv_message()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    return path


def test_trial_view_renders_with_the_scatter_chart(dashboard, swept, tmp_path):
    chromium = _chromium()
    study = swept.study()
    best = study.best_trial
    _, _, body = fetch(dashboard + "api/studies")
    [summary] = [s for s in json.loads(body)["study_summaries"] if s["study_name"] == "shared"]
    page = dashboard + f"dashboard/studies/{summary['study_id']}/trials?numbers={best.number}"
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--window-size=1400,1600", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        tab = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        tab.call("Page.enable")
        tab.call("Page.navigate", url=page)
        scatter = best.user_attrs["scatter_artifact_id"]
        probe = (f"(() => {{ const img = document.querySelector('img[src$=\"{scatter}\"]');"
                 f" return {{text: document.body.innerText,"
                 f" width: img && img.complete ? img.naturalWidth : 0}}; }})()")
        state, deadline = {}, time.time() + 90
        while time.time() < deadline:
            state = tab.evaluate(probe) or {}
            if state.get("width") and "adapter_artifact_id" in state.get("text", ""):
                break
            time.sleep(0.5)
        text = state.get("text", "")
        assert f"Trial {best.number} (trial_id=" in text, text[:2000]
        assert "Best Trial" in text and "Artifacts" in text
        assert f"trial-{best.number}-scatter.png" in text and f"trial-{best.number}-predictions.csv" in text
        assert f"adapter_artifact_id {best.user_attrs['adapter_artifact_id']}" in text
        assert f"learning_rate {best.params['learning_rate']}" in text
        assert state.get("width") == 700, "the scatter chart did not load in the trial view"
        shot = base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "trial-view.png").write_bytes(shot)
        if os.environ.get("TUNER_SCREENSHOT"):  # how docs/dashboard-trial-view.png is made
            Path(os.environ["TUNER_SCREENSHOT"]).write_bytes(shot)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_busy_port_is_a_one_line_error(swept, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(tuner_cmd() + ["dashboard", "--storage", swept.url, "--port", str(port)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
