"""sf-serve in real headless Chromium (Debian's package, driven by Playwright): the live view shows
what the prompt asks, a prompt switch shows up, two pages stream at once, a stopped server shows
"disconnected". Pixels are read from the page's canvas."""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_util import ServerProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")

# Mean colour and centre of the bright pixels of the live view.
SAMPLE_JS = """() => {
  const c = document.getElementById('view'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, r = 0, g = 0, b = 0, x = 0, y = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.max(d[i], d[i + 1], d[i + 2]) > 90) {
      const p = i / 4; n++; r += d[i]; g += d[i + 1]; b += d[i + 2]; x += p % c.width; y += Math.floor(p / c.width);
    }
  }
  return n ? {n, r: r / n, g: g / n, b: b / n, x: x / n, y: y / n, frames: window.sfState.frames} : {n: 0, frames: window.sfState.frames};
}"""


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-sessions", "3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _open(browser, url: str, prompt: str, seed: int = 0, frames: int = 12):
    page = browser.new_page()
    page.goto(f"{url}?prompt={prompt.replace(' ', '+')}&seed={seed}&autostart=1")
    page.wait_for_function(f"window.sfState && window.sfState.frames > {frames}", timeout=30_000)
    return page


def _track(page, seconds: float, every: float = 0.2) -> list[dict]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(page.evaluate(SAMPLE_JS))
        page.wait_for_timeout(every * 1000)
    return [s for s in out if s["n"] > 0]


def _moving_right(samples: list[dict]) -> float:
    """Share of steps between samples (that moved) going right."""
    steps = [b["x"] - a["x"] for a, b in zip(samples, samples[1:]) if abs(b["x"] - a["x"]) > 0.3]
    return sum(dx > 0 for dx in steps) / max(1, len(steps))


def test_page_streams_a_red_object_moving_right_then_switches_to_green(server, browser) -> None:
    page = _open(browser, server.url, "a red circle moving right", frames=0)
    samples = _track(page, 2.0, every=0.1)
    assert len(samples) >= 12
    assert all(s["r"] > 1.5 * max(s["g"], s["b"]) for s in samples), samples[:3]  # red
    # It moves right from the start (later it bounces off the right border, as the domain does).
    assert _moving_right(samples[:5]) >= 0.75, [round(s["x"], 1) for s in samples]
    assert page.evaluate("window.sfState.fps") >= 12
    assert page.text_content("#status") == "streaming"
    page.fill("#next", "a green circle moving right")
    page.select_option("#transition", "recache")
    page.click("#switch")
    page.wait_for_function("window.sfState.switchLatency !== null", timeout=15_000)
    page.wait_for_timeout(1500)
    after = _track(page, 1.0)
    assert after and all(s["g"] > 1.5 * max(s["r"], s["b"]) for s in after), after[:3]  # green
    assert 0 < page.evaluate("window.sfState.switchLatency") < 10_000
    page.close()


def test_two_pages_stream_at_once(server, browser) -> None:
    pages = [_open(browser, server.url, "a red circle moving right", 0),
             _open(browser, server.url, "a blue square moving up", 1)]
    start = [p.evaluate("window.sfState.frames") for p in pages]
    pages[0].wait_for_timeout(3000)
    gained = [p.evaluate("window.sfState.frames") - s for p, s in zip(pages, start)]
    assert all(g >= 36 for g in gained), gained  # about real time (16 FPS) for both
    colours = [p.evaluate(SAMPLE_JS) for p in pages]
    assert colours[0]["r"] > 1.5 * colours[0]["b"] and colours[1]["b"] > 1.5 * colours[1]["r"], colours
    for p in pages:
        p.close()


def test_stopping_the_server_shows_disconnected(browser) -> None:
    srv = ServerProcess("--max-sessions", "1")
    page = _open(browser, srv.url, "a red circle moving right")
    assert srv.stop() == 0
    page.wait_for_function("document.getElementById('status').textContent.includes('disconnected')", timeout=15_000)
    page.close()
