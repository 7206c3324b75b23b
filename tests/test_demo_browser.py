"""The demo in a real browser: ``tokreduce demo`` in a subprocess, driven by headless Chromium (Playwright).

Skips when Gradio, the Playwright package or a Chromium binary is missing. Never downloads a browser:
set CHROMIUM_PATH to use a Chromium other than /usr/bin/chromium.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 90  # seconds; the toy model starts in well under 15 s on an idle CPU
RUN_TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen) -> float:
    """Seconds until ``url`` answers 200; fails early with the server's output if it exits."""
    start = time.perf_counter()
    while time.perf_counter() - start < START_TIMEOUT:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with code {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"the demo did not answer at {url} within {START_TIMEOUT} s")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    pytest.importorskip("gradio", reason='the demo needs Gradio: pip install "tokreduce[demo]"')
    from tokreduce import toy

    if not (toy.path() / "config.json").is_file():
        pytest.skip(f"no toy checkpoint at {toy.path()}")
    port = free_port()
    # started from an empty folder, as a user would run the installed command
    cwd = tmp_path_factory.mktemp("demo_cwd")
    command = [sys.executable, "-m", "tokreduce.cli", "demo", "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        seconds = wait_until_up(url, proc)
        print(f"demo answered after {seconds:.1f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (set CHROMIUM_PATH)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def choose(page, method: str, keep: float) -> None:
    page.locator("#method input").click()
    page.get_by_role("option", name=method, exact=True).click()
    box = page.locator("#keep input[type=number]")
    box.fill(str(keep))
    box.press("Enter")


def test_run_an_example_and_see_tokens_answers_and_savings(browser, demo_url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(demo_url)
    page.get_by_text("img-00000:").click()  # an image example from the toy test split
    page.wait_for_function("document.querySelector('#question textarea').value.includes('circle')")
    choose(page, "divprune", 0.25)
    page.locator("#run").click()

    page.wait_for_selector("#overlay img", timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(
        "document.querySelector('#numbers').innerText.includes('visual tokens')", timeout=RUN_TIMEOUT_MS
    )
    numbers = page.locator("#numbers").inner_text()
    assert "divprune" in numbers and "speed-up" in numbers and "FLOPs" in numbers
    row = next(line for line in numbers.splitlines() if line.startswith("visual tokens"))
    assert row.split()[2:4] == ["72", "18"]  # 36 + 36 tokens in, 25 % of each span kept
    assert page.locator("#answer-reduced textarea").input_value().strip()
    assert page.locator("#answer-full textarea").input_value().strip()
    overlay = page.locator("#overlay img")
    assert overlay.evaluate("img => img.complete && img.naturalWidth") > 0
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_video_example_with_an_in_llm_method(browser, demo_url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(demo_url)
    page.get_by_text("vid-00000:").click()
    page.wait_for_function("document.querySelector('#question textarea').value.includes('move')")
    choose(page, "fastv", 0.5)
    page.locator("#layer").wait_for(state="visible", timeout=10_000)  # the layer knob appears for in-LLM methods
    page.locator("#run").click()
    page.wait_for_function("document.querySelector('#numbers').innerText.includes('fastv')", timeout=RUN_TIMEOUT_MS)
    numbers = page.locator("#numbers").inner_text()
    assert "layer=2" in numbers and "stage llm" in numbers
    row = next(line for line in numbers.splitlines() if line.startswith("visual tokens"))
    assert row.split()[2:4] == ["72", "36"]
    page.screenshot(path=str(tmp_path / "demo_video.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'demo_video.png'}")
