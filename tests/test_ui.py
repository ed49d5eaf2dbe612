"""The page at /ui in a real browser: Debian's Chromium driven by Playwright, against live
servers on tiny.en, with real audio (a file, and Chromium's fake microphone playing a real
recording).

The screenshots land in pytest's temporary folder; ``WHISPER_UI_SCREENSHOTS=<dir>`` also copies
the two the README shows there (``ui-try.png``, ``ui-watch.png``).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient

from server.app import create_app
from server.audio.upload import temp_dir_in_ram
from server.config import Settings
from tests.conftest import LiveServer, free_port, pin_footprint_to_weights, run_server, wer, within
from tests.test_engine import host_limit_for, job_for, only_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 60_000  # a transcription on a busy CI machine


# ---- without a browser: what is served, and WHISPER_UI ---------------------------------------


def test_page_is_served_and_root_redirects(tmp_path: Path) -> None:
    # No lifespan: the page needs no model, and the routes answer without one.
    client = TestClient(create_app(Settings(models_dir=tmp_path)))
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        assert f"/ui/{asset}" in page.text
        served = client.get(f"/ui/{asset}")
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
    assert client.get("/ui/../server/config.py").status_code == 404
    # The page is not part of the API's schema (the fuzzer and the SDKs see only the API).
    assert not any(path.startswith("/ui") for path in client.get("/openapi.json").json()["paths"])


def test_page_can_be_turned_off(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(models_dir=tmp_path, ui=False)))
    for path in ("/", "/ui", "/ui/app.js"):
        resp = client.get(path, follow_redirects=False)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_memory_report_has_what_the_page_draws(tiny_server: LiveServer, data_dir: Path) -> None:
    resp = requests.post(
        tiny_server.url + "/v1/audio/transcriptions",
        files={"file": ("a.flac", (data_dir / "jfk.flac").read_bytes())},
        data={"model": "whisper-1"},
        timeout=120,
    )
    assert resp.status_code == 200
    report = requests.get(tiny_server.url + "/v1/memory", timeout=5).json()
    requests_now = report["requests"]
    assert requests_now["max_queue"] == tiny_server.settings.max_queue
    assert requests_now["in_flight"] == requests_now["running"] == 0
    assert requests_now["waiting_for_memory"] == 0 and requests_now["queued_windows"] == 0
    cpu = next(d for d in report["devices"] if d["device"] == "cpu")
    weights = sum(m["weights_bytes"] for m in report["models"] if m["device"] == "cpu")
    assert cpu["resident_bytes"] == weights > 0
    assert 0 <= cpu["others_bytes"] <= cpu["used_bytes"]
    mine = [
        d for d in report["recent_decisions"] if d["request_id"] == resp.headers["x-request-id"]
    ]
    assert mine and all(d["outcome"] == "ok" for d in mine)
    assert mine[-1]["model"] == tiny_server.engine.served.id
    assert mine[-1]["task"] == "transcribe" and mine[-1]["audio_seconds"] > 10


# ---- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def microphone_wav(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jfk.flac as the 16-bit PCM WAV Chromium's fake microphone plays (in a loop)."""
    samples = []
    with av.open(str(data_dir / "jfk.flac")) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for frame in container.decode(audio=0):
            samples.extend(f.to_ndarray().ravel() for f in resampler.resample(frame))
    path = tmp_path_factory.mktemp("mic") / "jfk.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(np.concatenate(samples).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def browser(microphone_wav: Path) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        message = "Chromium is not installed (.ci/run installs Debian's: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone_wav}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Open the page of a server at a viewport size; every page fails the test on a script
    error."""
    contexts = []
    errors: list[str] = []

    def open_(server: LiveServer, viewport: dict[str, int] = DESKTOP) -> Any:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        assert page.url.endswith("/ui")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], Path]:
    folder = tmp_path_factory.mktemp("screenshots")
    publish = os.environ.get("WHISPER_UI_SCREENSHOTS")

    def shoot(target: Any, name: str) -> Path:
        path = folder / f"{name}.png"
        target.screenshot(path=str(path), **({"full_page": True} if name == "phone" else {}))
        if publish and name in ("ui-try", "ui-watch"):
            shutil.copy(path, Path(publish) / path.name)
        return path

    return shoot


def _transcribe(page: Any, audio: Path | None = None, **choices: str) -> Any:
    """Choose the audio and options, press Transcribe; returns the API's response."""
    if audio is not None:
        page.set_input_files("#file", str(audio))
    for field, value in choices.items():
        locator = page.locator(f"#{field}")
        if locator.evaluate("e => e.tagName") == "SELECT":
            locator.select_option(value)
        else:
            locator.fill(value)
    with page.expect_response(re.compile(r"/v1/audio/(transcriptions|translations)$")) as info:
        page.get_by_role("button", name="Transcribe").click()
    return info.value


def _play_at_word(page: Any, index: int) -> None:
    """Move the player into the ``index``-th word, paused, for a screenshot with it lit."""
    start = float(page.locator(".word").nth(index).get_attribute("data-start"))
    page.wait_for_function("() => document.querySelector('#player').readyState >= 1")
    page.locator("#player").evaluate("(p, t) => { p.pause(); p.currentTime = t; }", start + 0.05)
    page.locator(".word.now").wait_for()
    assert page.locator(".word").nth(index).evaluate("w => w.classList.contains('now')")


def _decision_row(page: Any, request_id: str) -> Any:
    row = page.locator("#decisions tbody tr", has_text=request_id)
    row.first.wait_for()
    return row.first


def test_upload_shows_words_in_time_and_the_planner(
    open_page: Callable[..., Any],
    tiny_server: LiveServer,
    data_dir: Path,
    shots: Callable[[Any, str], Path],
) -> None:
    page = open_page(tiny_server)
    page.locator("#model option", has_text="whisper-1").wait_for(state="attached")
    response = _transcribe(page, data_dir / "jfk.flac")
    assert response.status == 200
    # verbose_json with word timestamps: one clickable word per word, and the segments table.
    page.locator(".word", has_text="Americans").wait_for()
    words = page.locator(".word").all_inner_texts()
    assert "country" in " ".join(words).lower() and len(words) >= 20
    assert page.locator("#segments tbody tr").count() >= 1
    assert page.locator("#degraded").is_hidden()

    # A click on a word seeks the audio there, and that word is the one lit.
    target = page.locator(".word", has_text="country").first
    start = float(target.get_attribute("data-start"))
    target.click()
    page.wait_for_function(
        "s => Math.abs(document.querySelector('#player').currentTime - s) < 1.0", arg=start
    )
    page.locator("#player").evaluate("p => p.pause()")
    page.wait_for_function("() => document.querySelector('.word.now') !== null")
    assert abs(float(page.locator(".word.now").get_attribute("data-start")) - start) < 1.0

    # Downloads are rendered from verbose_json.
    with page.expect_download() as download:
        page.get_by_role("button", name="srt", exact=True).click()
    srt = Path(download.value.path()).read_text()
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:\d\d,\d{3}\nAnd so my fellow", srt), srt

    # The planner's panel: this device, and this request's decision with its outcome.
    request_id = response.headers["x-request-id"]
    row = _decision_row(page, request_id)
    assert "ok" in row.inner_text() and "beam 5" in row.inner_text()
    assert page.locator("#devices article[data-device=cpu] svg path.s-free").count() == 1
    assert "Free:" in page.locator("#devices").inner_text()
    _play_at_word(page, 8)
    shots(page.locator("#try"), "ui-try-plain")
    shots(page, "desktop")


def test_streamed_json_shows_deltas(
    open_page: Callable[..., Any], tiny_server: LiveServer, data_dir: Path
) -> None:
    page = open_page(tiny_server)
    # Count the deltas as they are added, before the done event replaces them with the text.
    page.evaluate(
        """() => { window.deltas = 0; new MutationObserver(ms => ms.forEach(m =>
            m.addedNodes.forEach(n => { if (n.classList && n.classList.contains('delta'))
            window.deltas += 1; }))).observe(document.querySelector('#transcript'),
            {childList: true}); }"""
    )
    response = _transcribe(
        page, data_dir / "en_librispeech_61-70968-0000.flac", format="json", language="en"
    )
    assert response.status == 200 and response.headers["content-type"].startswith(
        "text/event-stream"
    )
    page.get_by_text("Done in").wait_for()
    assert page.evaluate("window.deltas") >= 1
    text = page.locator("#transcript").inner_text()
    expected = (data_dir / "en_librispeech_61-70968-0000.txt").read_text()
    assert within("WER vs reference", wer(expected, text), at_most=0.3), text
    with page.expect_download() as download:
        page.get_by_role("button", name="txt", exact=True).click()
    assert Path(download.value.path()).read_text().strip() == text.strip()
    # A streamed answer has no segments: the srt is asked of the server.
    with (
        page.expect_response(re.compile(r"/v1/audio/transcriptions$")) as srt_response,
        page.expect_download() as download,
    ):
        page.get_by_role("button", name="srt", exact=True).click()
    assert srt_response.value.status == 200
    srt = Path(download.value.path()).read_text()
    cue_text = " ".join(
        line for line in srt.splitlines() if "-->" not in line and not line.strip().isdigit()
    )
    assert srt.startswith("1\n00:00:") and wer(expected, cue_text) < 0.3, srt


def test_microphone_recording_is_transcribed(
    open_page: Callable[..., Any], tiny_server: LiveServer, shots: Callable[[Any, str], Path]
) -> None:
    page = open_page(tiny_server, PHONE)
    record = page.get_by_role("button", name="Record from the microphone")
    record.click()
    page.get_by_text("Recording…").wait_for()
    page.wait_for_timeout(7000)  # "And so my fellow Americans, ask not what your country ..."
    page.get_by_role("button", name="Stop recording").click()
    recorded = page.get_by_text("Recorded")
    recorded.wait_for()
    assert "audio/webm;codecs=opus" in recorded.inner_text()  # what the founding client sent
    response = _transcribe(page)
    assert response.status == 200
    page.locator(".word").first.wait_for()
    heard = " ".join(page.locator(".word").all_inner_texts()).lower()
    assert "fellow" in heard or "americans" in heard or "country" in heard, heard
    shots(page, "phone")
    # Readable at phone width: nothing wider than the screen.
    wide = page.evaluate(
        """w => [...document.querySelectorAll('body *')].filter(e =>
            e.getBoundingClientRect().right > w + 1).map(e => e.tagName + '#' + e.id + '.'
            + e.className)""",
        PHONE["width"],
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], wide


def test_live_captions_stream_the_microphone(
    open_page: Callable[..., Any], tiny_server: LiveServer, shots: Callable[[Any, str], Path]
) -> None:
    """The page as a Realtime client: the fake microphone (JFK, in a loop) streamed as 24 kHz
    PCM over /v1/realtime with server VAD, lines settled at each pause."""
    sessions = tiny_server.app.state.realtime
    page = open_page(tiny_server)
    page.get_by_role("button", name="Live captions").click()
    page.wait_for_function(
        """() => [...document.querySelectorAll('#live-captions li.done')]
            .some(line => /country|americans|fellow/i.test(line.textContent))""",
        timeout=90_000,
    )
    shots(page, "live")
    page.get_by_role("button", name="Stop live captions").click()
    page.get_by_text(re.compile(r"Stopped: \d+ lines")).wait_for(timeout=30_000)
    assert page.get_by_role("button", name="Live captions").get_attribute("aria-pressed") == "false"
    assert page.locator("#error").is_hidden()
    deadline = time.monotonic() + 10
    while sessions.active and time.monotonic() < deadline:  # the server saw the close
        time.sleep(0.1)
    assert sessions.active == 0


def test_api_errors_are_shown(
    open_page: Callable[..., Any], tiny_server: LiveServer, data_dir: Path
) -> None:
    page = open_page(tiny_server)
    response = _transcribe(page, data_dir / "not_audio.mp3")
    assert response.status == 400
    error = page.get_by_role("alert").filter(has_text="Error 400")
    error.wait_for()
    assert "invalid_audio" in error.inner_text()
    assert page.locator("#result").is_hidden()


def test_upload_over_the_limit_is_explained(
    open_page: Callable[..., Any],
    server_factory: Callable[..., LiveServer],
    tiny_model: Path,
    data_dir: Path,
) -> None:
    # The same settings as test_api's 413 test: one server for both. The browser gets the 413
    # the server sends from Content-Length, before the body.
    server = server_factory(model=str(tiny_model), max_upload_size="64KiB")
    page = open_page(server)
    response = _transcribe(page, data_dir / "jfk.flac")
    assert response.status == 413
    alert = page.get_by_role("alert").filter(has_text="Error 413 (file_too_large)")
    alert.wait_for()
    assert "WHISPER_MAX_UPLOAD_SIZE" in alert.inner_text()


def test_api_key_is_asked_for_and_kept_in_the_tab(
    open_page: Callable[..., Any], server_factory: Callable[..., LiveServer], tiny_model: Path
) -> None:
    # The same settings as test_api's key test: one server for both.
    server = server_factory(model=str(tiny_model), api_keys="key-one,key-two")
    page = open_page(server)
    error = page.locator("#watch-error")
    error.get_by_text("Error 401").wait_for()
    assert "API key at the top" in error.inner_text()
    page.get_by_label("API key").fill("key-two")
    page.get_by_role("button", name="Use key").click()
    page.locator("#devices article").first.wait_for()
    assert error.is_hidden()
    assert page.evaluate("sessionStorage.getItem('whisper-api-key')") == "key-two"
    assert page.evaluate("localStorage.length") == 0
    # Live captions carry the key as a WebSocket subprotocol (browsers cannot set headers).
    page.get_by_role("button", name="Live captions").click()
    page.locator("#live-captions li.done").first.wait_for(timeout=90_000)
    page.get_by_role("button", name="Stop live captions").click()
    page.get_by_text(re.compile(r"Stopped: \d+ lines")).wait_for(timeout=30_000)
    assert error.is_hidden() and page.locator("#error").is_hidden()


def test_refusal_for_memory_says_when_to_retry(
    open_page: Callable[..., Any],
    server_factory: Callable[..., LiveServer],
    tiny_model: Path,
    data_dir: Path,
) -> None:
    server = server_factory(model=str(tiny_model), host_memory_limit="1MiB", max_memory_wait=0)
    page = open_page(server)
    response = _transcribe(page, data_dir / "jfk.flac")
    assert response.status == 503
    alert = page.get_by_role("alert").filter(has_text="insufficient_memory")
    alert.wait_for()
    assert "Try again in 5 s." in alert.inner_text()
    row = _decision_row(page, response.headers["x-request-id"])
    assert "reject" in row.inner_text() and "insufficient_memory" in row.inner_text()


@pytest.fixture(scope="module")
def squeezed_server(
    tiny_server: LiveServer, tiny_model: Path, data_dir: Path, tmp_path_factory: Any
) -> Iterator[LiveServer]:
    """A server whose host limit holds jfk.flac with word timestamps only at 10 s greedy
    windows: the planner must step down to fit, and keeps the words."""
    engine = tiny_server.engine
    job = job_for(engine, data_dir, "jfk.flac", word_timestamps=True)
    asked = engine.planner.requested_shape(only_model(engine), job)
    smallest = replace(asked, chunk_length=10, beam_size=1)
    # An upload is counted against host RAM while it is held when it is in memory: under the
    # 1 MiB past which the form parser spools it to disk (jfk.flac is just over), or on tmpfs.
    size = (data_dir / "jfk.flac").stat().st_size
    upload = size if size <= 1 << 20 or temp_dir_in_ram() else 0
    settings = Settings(
        model=str(tiny_model),
        models_dir=tmp_path_factory.mktemp("models"),
        port=free_port(),
        host_memory_limit=str(host_limit_for(engine, smallest, 11.0) + upload),
    )
    with run_server(settings, prepare=lambda app: pin_footprint_to_weights(app.state.engine)) as s:
        yield s


def test_degradation_is_shown_with_its_reason(
    open_page: Callable[..., Any],
    squeezed_server: LiveServer,
    data_dir: Path,
    shots: Callable[[Any, str], Path],
) -> None:
    page = open_page(squeezed_server)
    response = _transcribe(page, data_dir / "jfk.flac", language="en")
    assert response.status == 200 and response.headers["x-whisper-degraded"]
    notice = page.locator("#degraded")
    notice.wait_for()
    kinds = response.headers["x-whisper-degraded"].split(",")
    for kind in kinds:
        assert kind in notice.inner_text()
    assert "needs" in notice.inner_text()  # the planner's reason, with its numbers
    page.locator(".word").first.wait_for()  # words kept: the cheaper steps were enough
    row = _decision_row(page, response.headers["x-request-id"])
    assert "ok" in row.inner_text() and "· 10 s ·" in row.inner_text()  # the shorter windows
    why = row.locator("xpath=following-sibling::tr[1]").inner_text()
    assert all(kind in why for kind in kinds) and "needs" in why
    _play_at_word(page, 5)
    shots(page.locator("#try"), "ui-try")
    # Scaled to this server's share, the chart's top is MiB (the weights), not the host's GiB.
    top_tick = "document.querySelector('#devices svg text').textContent"
    assert page.evaluate(top_tick).endswith("GiB")
    page.get_by_label("Scale the charts to this server's memory").check()
    page.wait_for_function(f"() => {top_tick}.endsWith('MiB')")
    shots(page.locator("#watch"), "ui-watch")


def test_controls_have_labels(open_page: Callable[..., Any], tiny_server: LiveServer) -> None:
    page = open_page(tiny_server)
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button')].filter(e =>
            !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
            && !e.textContent.trim()).map(e => e.outerHTML)"""
    )
    assert unlabelled == []
    # Keyboard: Tab reaches the file input and the Transcribe button, with a visible focus.
    reached = set()
    for _ in range(25):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    assert {"api-key", "file", "record", "model", "go"} <= reached
