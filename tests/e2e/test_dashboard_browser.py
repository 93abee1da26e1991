"""The live dashboard in a real browser: `tinyfleet serve --dashboard` with two `device-agent` processes through
Mosquitto, headless Chromium driven over the DevTools protocol. The device table fills and rounds close on the
page without a reload; off loopback the token is required. Screenshots are kept in the test's tmp dir."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, require_cmd


@pytest.fixture
def broker():
    require_cmd("mosquitto")
    from fleet.sim.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


class Browser:
    """Headless Chromium and one page, driven by DevTools protocol commands over its WebSocket."""

    def __init__(self, tmp: Path):
        require_cmd("chromium")
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-port=0", f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,1400",
             "about:blank"], stderr=subprocess.PIPE, text=True)
        ws_url = None
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
                break
        assert ws_url, "chromium did not start its DevTools endpoint"
        self.ws = connect(ws_url, max_size=None).__enter__()
        self.ids = itertools.count(1)
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params) -> dict:
        i = next(self.ids)
        msg = {"id": i, "method": method, "params": params}
        if session or getattr(self, "session", None):
            msg["sessionId"] = session or self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == i:
                assert "error" not in reply, reply
                return reply["result"]

    def go(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def js(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True)
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60.0):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expr}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.__exit__(None, None, None)
        self.proc.terminate()
        self.proc.wait(10)


def _fleet(tmp: Path, port: int, dashboard: str, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    from device_agent.wire.plan import plan_to_bytes
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    (tmp / "plan.ttp").write_bytes(plan_to_bytes(tiny_plan()))
    (tmp / "fleet.yaml").write_text(f"name: dash\nbroker: mqtt://127.0.0.1:{port}\ndevices: 2\nlocal_steps: 5\n"
                                    "deadline: 30\n")
    for i in range(2):
        x, y = tiny_dataset(32, seed=i)
        np.savez(tmp / f"d{i}.npz", x=x, y=y)
    serve = subprocess.Popen([sys.executable, "-m", "fleet.cli", "serve", str(tmp / "fleet.yaml"), "--store",
                              str(tmp / "store.sqlite"), "--plan", str(tmp / "plan.ttp"), "--rounds", "0",
                              "--dashboard", dashboard, *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in serve.stderr:
        m = re.search(r"dashboard at (\S+)", line)
        if m:
            return serve, m.group(1)
    raise AssertionError(f"serve printed no dashboard address (rc {serve.wait()})")


def _agents(tmp: Path, port: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{port}",
                              "--id", f"d{i}", "--fleet", "dash", "--data", str(tmp / f"d{i}.npz"),
                              "--pubkey", f"{tmp / 'store.sqlite'}.key.pem.pub"], cwd=ROOT,
                             stderr=subprocess.DEVNULL) for i in range(2)]


def _stop(*procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(10)


def test_device_table_fills_and_rounds_close_live(broker, tmp_path):
    serve, url = _fleet(tmp_path, broker.port, "127.0.0.1:0")
    browser = Browser(tmp_path)
    agents = []
    try:
        browser.go(url)
        browser.wait("document.getElementById('live').textContent === 'live'")
        browser.js("window.__loaded = performance.timeOrigin")
        assert browser.js("document.querySelectorAll('#devices tbody tr').length") == 0
        agents = _agents(tmp_path, broker.port)

        browser.wait("document.querySelectorAll('#devices tbody tr').length === 2")
        browser.wait("document.querySelectorAll('#rounds tbody tr').length >= 2", timeout=90)
        browser.wait("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        browser.wait("document.querySelector('#devices tbody tr').children[4].textContent.startsWith('v')")
        browser.screenshot(tmp_path / "dashboard.png")
        first = browser.js("[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device)")
        result = browser.js("document.querySelector('#rounds tbody tr').children[1].textContent")
        same_page = browser.js("window.__loaded === performance.timeOrigin")
        browser.go(url.rstrip("/") + "/device/d0")
        browser.wait("document.querySelectorAll('#devtable tr').length > 5")
        browser.screenshot(tmp_path / "device.png")
        board = browser.js("[...document.querySelectorAll('#devtable tr')].find(r => r.cells[0] && "
                           "r.cells[0].textContent === 'board').cells[1].textContent")
    finally:
        browser.close()
        _stop(serve, *agents)

    assert first == ["d0", "d1"] and result == "committed"
    assert same_page is True  # updates arrived over the event stream, not by reloading
    assert board == "host"
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_off_loopback_the_token_is_required(broker, tmp_path):
    serve, url = _fleet(tmp_path, broker.port, "0.0.0.0:0")
    try:
        token = re.search(r"token=(\S+)", url).group(1)
        port = re.search(r":(\d+)/", url).group(1)
        base = f"http://127.0.0.1:{port}"
        try:
            urllib.request.urlopen(f"{base}/api/summary", timeout=10)
            code = 200
        except urllib.error.HTTPError as e:
            code = e.code
        ok = json.loads(urllib.request.urlopen(f"{base}/api/summary?token={token}", timeout=10).read())
    finally:
        _stop(serve)

    assert code == 401
    assert ok["fleet"] == "dash"


def test_simulate_serves_the_dashboard_with_the_accuracy_curve(tmp_path):
    require_cmd("mosquitto")
    sim = subprocess.Popen([sys.executable, "-m", "fleet.cli", "simulate", "configs/quickstart.yaml", "--devices", "3",
                            "--rounds", "4", "--quiet", "--json", "--dashboard", "127.0.0.1:0"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    browser = None
    try:
        url = next(m.group(1) for line in sim.stderr if (m := re.search(r"dashboard at (\S+)", line)))
        browser = Browser(tmp_path)
        browser.go(url)
        browser.wait("document.querySelectorAll('#devices tbody tr').length === 3", timeout=120)
        browser.wait("document.querySelectorAll('#rounds tbody tr').length >= 1", timeout=120)
        t_end, curves = time.monotonic() + 60, {"accuracy": {}}
        while not curves["accuracy"] and time.monotonic() < t_end:  # evaluated after the round closes
            curves = json.loads(urllib.request.urlopen(url + "api/curves", timeout=10).read())
            time.sleep(0.2)
        browser.screenshot(tmp_path / "simulate.png")
        out, _ = sim.communicate(timeout=300)
    finally:
        if browser is not None:
            browser.close()
        _stop(sim)

    assert sim.returncode == 0
    final = json.loads(out.strip().splitlines()[-1])
    got = curves["accuracy"]["global"]
    assert got and got[0][0] == 1 and round(got[0][1], 4) == final["accuracy_per_round"][0]  # the run's own number
