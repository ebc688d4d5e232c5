"""Render reports/index.html in headless Chromium (Debian `chromium`) over the DevTools protocol: every image
loads (naturalWidth > 0), no console error or exception, no request leaves the page, the hostile caption is text.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dinoflow import paths
from dinoflow.report import html as report_html
from report_fixtures import HOSTILE_CAPTION, chdir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]

websockets = pytest.importorskip("websockets", reason="the `websockets` package drives Chromium over CDP")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian package `chromium` not installed "
                                                         "(apt-get install -y chromium)")

PAGE_CHECK = """JSON.stringify({
  images: Array.from(document.images).map(i => ({complete: i.complete, w: i.naturalWidth, alt: i.alt})),
  captions: Array.from(document.querySelectorAll('p.caption')).map(p => p.textContent),
  scripts: document.scripts.length,
})"""


class CDP:
    """Minimal DevTools client over one browser websocket (flattened target sessions)."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def send(self, method, params=None, session=None, timeout=60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    async def wait_event(self, method, timeout=60):
        for ev in self.events:
            if ev["method"] == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic())))
            if "method" in ev:
                self.events.append(ev)
                if ev["method"] == method:
                    return ev


async def _render(url: str, port_file: Path) -> tuple[dict, list[dict]]:
    deadline = time.monotonic() + 60
    while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium did not open its DevTools port")
        await asyncio.sleep(0.1)
    port, path = port_file.read_text().splitlines()[:2]
    async with websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
        cdp = CDP(ws)
        target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await cdp.send(f"{domain}.enable", session=session)
        await cdp.send("Page.navigate", {"url": url}, session=session)
        await cdp.wait_event("Page.loadEventFired")
        await asyncio.sleep(0.5)  # late console messages / requests
        result = await cdp.send("Runtime.evaluate", {"expression": PAGE_CHECK, "returnByValue": True},
                                session=session)
        try:
            await cdp.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - the socket may close before the reply
            pass
        return json.loads(result["result"]["value"]), cdp.events


def test_report_renders_in_headless_chromium(report_ws, tmp_path):
    ws, params = report_ws
    with chdir(ws):
        report_html.main(params)
        page = (ws / paths.REPORT_HTML).resolve()
    user_dir = tmp_path / "chromium-profile"
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state, events = asyncio.run(asyncio.wait_for(_render(page.as_uri(), user_dir / "DevToolsActivePort"), 120))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    assert len(state["images"]) >= 10
    broken = [i["alt"] for i in state["images"] if not i["complete"] or i["w"] <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert state["scripts"] == 0
    assert HOSTILE_CAPTION in state["captions"]  # rendered as text, not run

    errors = [e for e in events if
              (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, json.dumps(errors, indent=1)[:2000]
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    external = [u for u in requests if not u.startswith(("data:", page.as_uri()))]
    assert not external, f"the page made requests: {external}"
