"""The search page (GET /) in headless Chromium: type a query, get tiles of playable clips.

Debian's Chromium (`apt-get install -y chromium`, what .ci/run installs) is driven over the
Chrome DevTools Protocol with a few lines of `websockets` (dev extra): no chromedriver, no
browser download. The query is typed with real key events (Input.insertText + an Enter key
press). Skipped, with the reason, when Chromium or websockets is missing. The app is the
session's shared one (test_serve.shared_app). A screenshot is saved in the test's tmp dir.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from test_serve import release_app, shared_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--no-first-run", "--mute-audio",
         "--metrics-recording-only", "--autoplay-policy=no-user-gesture-required",
         "--window-size=1200,900", "--remote-debugging-port=0")


class Chromium:
    """Headless Chromium + one page, driven over CDP (only the calls these tests need)."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        # websockets >= 17.1 wants its connection opened as a context manager
        self.session = contextlib.ExitStack()
        self.ws = self.session.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None,
                                                     open_timeout=30))
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def until(self, expr: str, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.25)
        raise TimeoutError(f"never true: {expr}")

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.until("document.readyState === 'complete' && !!document.getElementById('q')")

    def type_and_enter(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def app(ray_local, synth_small, tmp_path_factory, request):
    yield shared_app(tmp_path_factory, synth_small)
    release_app(request)


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM:
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    pytest.importorskip("websockets.sync.client", reason="websockets not installed (dev extra)")
    b = Chromium(tmp_path / "profile")
    yield b
    b.close()


VIDEOS = ("Array.from(document.querySelectorAll('#results video')).map(v => "
          "({ready: v.readyState, error: v.error ? v.error.code : 0, duration: v.duration, "
          "time: v.currentTime, src: v.currentSrc}))")


def test_typed_query_shows_playable_clips(app, browser, synth_small, tmp_path):
    from clipray.manifest import read_manifest

    row = next(r for r in read_manifest(synth_small["manifest"]).to_pylist() if ", then" not in r["caption"])
    browser.open(app["url"] + "/")
    browser.type_and_enter("#q", row["caption"])
    browser.until("document.querySelectorAll('#results .tile').length > 0")
    labels = browser.js("Array.from(document.querySelectorAll('#results .tile .meta')).map(m => m.textContent)")
    assert len(labels) == 8  # the page asks for k=8
    assert any(row["video_id"] in s for s in labels[:3]), labels
    # each tile's <video> fetched /clips/{id} (Range requests) and parsed the mp4
    browser.until(f"{VIDEOS}.every(v => v.ready >= 1)")
    browser.until(f"{VIDEOS}.some(v => v.time > 0)", timeout_s=30)  # clips play in place
    for v in browser.js(VIDEOS):
        assert v["error"] == 0 and v["duration"] > 0 and "/clips/" in v["src"], v
    assert "8 clips" in browser.js("document.getElementById('status').textContent")
    shot = tmp_path / "search_page.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 10_000


def test_page_shows_api_errors(app, browser):
    browser.open(app["url"] + "/")
    browser.type_and_enter("#q", "a red square " * 30)
    status = browser.until("(s => s.includes('error') && s)(document.getElementById('status').textContent)", 30)
    assert "max_text_chars" in status
    # the number box takes "1e1" as 10: the page read it with parseInt, as 1
    browser.open(app["url"] + "/")
    browser.js("document.getElementById('k').value = '1e1'; true")
    browser.type_and_enter("#q", "a red square")
    browser.until("document.getElementById('status').textContent.includes('clips in')", 30)
    assert browser.js("document.querySelectorAll('#results .tile').length") == 10


def test_page_shows_the_status_of_an_error_that_is_not_json(app, browser):
    """A proxy or server error whose body is not JSON (Serve's plain-text 500/503, a load
    balancer's HTML 502) was shown as the browser's JSON parse error ("Unexpected token '<'
    ..."), not as the HTTP status. The response is made here by replacing window.fetch: the
    running app answers every bad request with JSON."""
    browser.open(app["url"] + "/")
    browser.js("window.fetch = async () => new Response('<html><body>upstream down</body></html>', "
               "{status: 502, statusText: 'Bad Gateway', headers: {'Content-Type': 'text/html'}}); true")
    browser.type_and_enter("#q", "a red square")
    status = browser.until("(s => s.includes('error') && s)(document.getElementById('status').textContent)", 30)
    assert "502" in status and "Bad Gateway" in status and "JSON" not in status, status
    assert browser.js("document.querySelectorAll('#results .tile').length") == 0


def test_an_earlier_search_answering_late_does_not_replace_the_newest(app, browser):
    """Two searches in a row whose answers come back in the other order (batching, replicas):
    the page showed whichever answered last, the first query's clips under the second query's
    text. window.fetch is replaced by one that answers the first call 1.5 s late."""
    browser.open(app["url"] + "/")
    browser.js("""(() => { let n = 0; window.fetch = async (url, init) => {
        const q = JSON.parse(init.body).text, late = ++n === 1;
        if (late) await new Promise(r => setTimeout(r, 1500));
        return new Response(JSON.stringify({results: [{clip_id: 0, video_id: q, score: 0.5, start: null, end: null}]}),
                            {status: 200, headers: {'Content-Type': 'application/json'}}); }; return true; })()""")
    browser.type_and_enter("#q", "first query")
    browser.js("document.getElementById('q').value = ''; true")
    browser.type_and_enter("#q", "second query")
    browser.until("document.querySelectorAll('#results .tile').length > 0")
    time.sleep(2.5)  # the first answer has come by now
    labels = browser.js("Array.from(document.querySelectorAll('#results .tile .meta')).map(m => m.textContent)")
    assert labels == ["#1 second query0.500"], labels
    assert browser.js("document.getElementById('status').textContent").startswith("1 clips")


def test_a_clip_window_loops_in_its_tile(app, browser):
    """A tile plays its clip's window over and over. The `#t=start,end` media fragment pauses the
    player at the window's end; the page sought back to the start but left it paused, so a
    window that ends before its file did played once and then stood still. The answer (clip 0,
    the window [0.5, 1.5] s of a 2-4 s video) is made by replacing window.fetch."""
    browser.open(app["url"] + "/")
    browser.js("""window.fetch = async () => new Response(JSON.stringify({results: [
        {clip_id: 0, video_id: 'synth00000', score: 0.5, start: 0.5, end: 1.5}]}),
        {status: 200, headers: {'Content-Type': 'application/json'}}); true""")
    browser.type_and_enter("#q", "a red square")
    browser.until(f"{VIDEOS}.length === 1 && {VIDEOS}[0].time > 0.5")
    states = []
    for _ in range(12):  # 3 s: two passes over the 1 s window and more
        time.sleep(0.25)
        states.append(browser.js("(v => [v.paused, v.currentTime])(document.querySelector('#results video'))"))
    assert not states[-1][0] and not states[-2][0], states  # still playing
    # inside the window, give or take a timeupdate (every 15-250 ms): never back at the file's start
    assert all(0.4 <= t <= 2.0 for _, t in states) and any(b < a for (_, a), (_, b) in zip(states, states[1:])), states
    assert browser.js("document.querySelector('#results video').src").endswith("/clips/0#t=0.5,1.5")


def test_a_long_video_id_stays_inside_its_tile(browser, tmp_path):
    """A video id with no space to break at (a long file name): its label ran across the next
    tiles and pushed its score out of its own, beside another clip. The page is opened from a
    file with window.fetch answering: no app is needed."""
    from serve.app import page_html

    (tmp_path / "index.html").write_text(page_html(8))
    browser.open((tmp_path / "index.html").as_uri())
    long_id = "a_very_long_video_file_name_with_no_space_in_it_" * 3
    browser.js("""(() => { window.fetch = async () => new Response(JSON.stringify({results: [
        {clip_id: 0, video_id: %s, score: 0.5, start: 1.0, end: 2.0},
        {clip_id: 1, video_id: "short", score: 0.4, start: null, end: null}]}),
        {status: 200, headers: {'Content-Type': 'application/json'}}); return true; })()""" % json.dumps(long_id))
    browser.type_and_enter("#q", "a red square")
    browser.until("document.querySelectorAll('#results .tile').length === 2")
    boxes = browser.js("""Array.from(document.querySelectorAll('#results .tile')).map(t => {
        const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.right]; };
        return {tile: box(t), label: box(t.querySelector('.meta span')), score: box(t.querySelector('.score'))}; })""")
    for b in boxes:
        (left, right), label, score = b["tile"], b["label"], b["score"]
        assert left <= label[0] < label[1] <= score[0] < score[1] <= right, boxes
    assert browser.js("document.querySelector('#results .meta span').textContent") == f"#1 {long_id} [1.0s-2.0s]"


def test_a_new_search_stops_the_last_ones_players_loading(browser, tmp_path):
    """A new search removed the last one's tiles but left their players loading: a player keeps
    its connection open as it buffers ahead, and Chromium opens 6 to a server over HTTP/1.1, so
    with 8 tiles of long videos (15 MB, 5 min each) the next search's request waited 15 s for a
    connection (measured against the app's own /clips under uvicorn). Each removed player is now
    emptied (no src, load()), which closes its connection. The page is opened from a file with
    window.fetch answering: no app is needed."""
    from serve.app import page_html

    (tmp_path / "index.html").write_text(page_html(8))
    browser.open((tmp_path / "index.html").as_uri())
    browser.js("""(() => { window.fetch = async () => new Response(JSON.stringify({results: [0, 1, 2].map(i =>
        ({clip_id: i, video_id: "v" + i, score: 0.5, start: null, end: null}))}),
        {status: 200, headers: {'Content-Type': 'application/json'}}); return true; })()""")
    browser.type_and_enter("#q", "a red square")
    browser.until("document.querySelectorAll('#results .tile').length === 3")
    browser.js("window.before = Array.from(document.querySelectorAll('#results video')); true")
    browser.js("document.getElementById('q').value = ''; true")
    browser.type_and_enter("#q", "a blue circle")
    browser.until("document.querySelectorAll('#results .tile').length === 3 && "
                  "!document.querySelector('#results video').isSameNode(window.before[0])")
    # NETWORK_EMPTY (0): no resource, nothing loading
    assert browser.js("window.before.map(v => [v.hasAttribute('src'), v.networkState])") == [[False, 0]] * 3
    assert browser.js("Array.from(document.querySelectorAll('#results video')).every(v => v.src.includes('/clips/'))")
