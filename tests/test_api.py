"""The HTTP API end to end: real server on loopback, real tiny.en model, real audio, and the
clients users have (the official openai SDK, requests, httpx)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import requests
from opencc import OpenCC

from tests.conftest import LiveServer, cer, wer, within

JFK = "jfk.flac"


def _post(
    server: LiveServer,
    fields: dict | list,
    *,
    file: str | bytes | None = JFK,
    data_dir: Path | None = None,
    filename: str = "audio",
    headers: dict | None = None,
    path: str = "/v1/audio/transcriptions",
) -> requests.Response:
    files = None
    if file is not None:
        content = file if isinstance(file, bytes) else (data_dir / file).read_bytes()
        files = {"file": (filename, content)}
    return requests.post(server.url + path, data=fields, files=files, headers=headers, timeout=120)


def _assert_envelope(
    resp: requests.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers.get("x-request-id")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# ---- the openai SDK ------------------------------------------------------------------------------


def test_openai_sdk_json(tiny_server: LiveServer, data_dir: Path) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    with open(data_dir / JFK, "rb") as fh:
        result = client.audio.transcriptions.create(model="whisper-1", file=fh)
    reference = (data_dir / "jfk.txt").read_text()
    assert within("WER vs reference", wer(reference, result.text), at_most=0.15), result.text


def test_openai_sdk_verbose_words(tiny_server: LiveServer, data_dir: Path) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    result = client.audio.transcriptions.create(
        model="whisper",
        file=(data_dir / JFK).read_bytes(),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert result.language == "english"
    assert result.duration == pytest.approx(11.0, abs=0.1)
    assert result.words and result.segments
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= result.duration + 0.5 for w in result.words)
    assert "country" in " ".join(w.word.lower() for w in result.words)


def test_openai_sdk_async_concurrent(tiny_server: LiveServer, data_dir: Path) -> None:
    clips = ["en_librivox_sense_and_sensibility_01_0870.wav", "en_leopard_test.wav", JFK]

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
        calls = [
            client.audio.transcriptions.create(
                model="whisper-1", file=(data_dir / c).read_bytes(), response_format="text"
            )
            for c in clips
        ]
        return list(await asyncio.gather(*calls))

    texts = asyncio.run(main())
    # each result belongs to its own request
    for clip, text in zip(clips, texts, strict=True):
        reference = (data_dir / clip.rsplit(".", 1)[0]).with_suffix(".txt").read_text()
        assert within(f"WER vs reference ({clip})", wer(reference, text), at_most=0.3), (clip, text)


def test_openai_sdk_stream(tiny_server: LiveServer, data_dir: Path) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    stream = client.audio.transcriptions.create(
        model="whisper-1", file=(data_dir / JFK).read_bytes(), stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    assert "transcript.text.delta" in kinds
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas.strip() == events[-1].text
    assert "country" in events[-1].text.lower()


def test_openai_sdk_translation(tiny_server: LiveServer, data_dir: Path) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    result = client.audio.translations.create(
        model="whisper-1", file=(data_dir / JFK).read_bytes(), response_format="verbose_json"
    )
    assert result.task == "translate"
    assert result.language == "english"
    assert "country" in result.text.lower()


def test_openai_sdk_models(tiny_server: LiveServer, tiny_model: Path) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == tiny_model.name
    assert {"whisper-1", "whisper"} <= set(ids)
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


# ---- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("json", "application/json"),
        ("text", "text/plain"),
        ("srt", "text/plain"),
        ("vtt", "text/plain"),
        ("verbose_json", "application/json"),
    ],
)
def test_response_formats(
    tiny_server: LiveServer, data_dir: Path, fmt: str, content_type: str
) -> None:
    resp = _post(tiny_server, {"model": "whisper-1", "response_format": fmt}, data_dir=data_dir)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(content_type)
    body = resp.text
    if fmt == "json":
        parsed = resp.json()
        assert set(parsed) == {"text", "languages", "usage"}
        assert parsed["languages"] == [{"code": "en"}]
        assert parsed["usage"] == {"type": "duration", "seconds": 11}
    elif fmt == "verbose_json":
        parsed = resp.json()
        assert parsed["task"] == "transcribe" and parsed["language"] == "english"
        assert "words" not in parsed
        seg = parsed["segments"][0]
        assert set(seg) >= {
            "id",
            "seek",
            "start",
            "end",
            "text",
            "tokens",
            "temperature",
            "avg_logprob",
            "compression_ratio",
            "no_speech_prob",
        }
    elif fmt == "srt":
        assert body.startswith("1\n00:00:00,000 --> ")
    elif fmt == "vtt":
        assert body.startswith("WEBVTT\n")
        assert "00:00:00.000 --> " in body
    else:
        assert "country" in body.lower() and body.endswith("\n")


def test_granularities_field_spellings(tiny_server: LiveServer, data_dir: Path) -> None:
    """`timestamp_granularities[]` repeated, without brackets, and as the requests seed sends."""
    for fields in (
        [
            ("model", "whisper"),
            ("response_format", "verbose_json"),
            ("timestamp_granularities[]", "word"),
            ("timestamp_granularities[]", "segment"),
        ],
        [
            ("model", "whisper"),
            ("response_format", "verbose_json"),
            ("timestamp_granularities", "word"),
        ],
    ):
        resp = _post(tiny_server, fields, data_dir=data_dir)
        assert resp.status_code == 200, resp.text
        assert resp.json()["words"]


def test_requests_seed_call_mandarin(server_factory, data_dir: Path) -> None:
    """The issue's `requests` call with language=zh, on the embedded default (multilingual)."""
    server = server_factory()
    data = (data_dir / "zh_aishell_BAC009S0724W0121.wav").read_bytes()
    resp = requests.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("rec.webm", data)},
        data={
            "model": "whisper",
            "language": "zh",
            "response_format": "verbose_json",
            "timestamp_granularities[]": "word",
        },
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["language"] == "chinese"
    reference = (data_dir / "zh_aishell_BAC009S0724W0121.txt").read_text().strip()
    # Whisper often writes Mandarin in traditional characters; compare in simplified.
    hyp = OpenCC("t2s").convert(body["text"])
    assert within("CER vs reference", cer(reference, hyp), at_most=0.35), hyp
    assert body["words"]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "file", "status", "param", "code"),
    [
        ({"model": "whisper-1"}, b"", 400, "file", "empty_file"),
        (
            {"model": "whisper-1"},
            b"hello, this is a text file\n" * 20,
            400,
            "file",
            "invalid_audio",
        ),
        ({"model": "whisper-1"}, None, 400, "file", None),
        ({}, JFK, 400, "model", None),
        ({"model": "no-such-model"}, JFK, 404, "model", "model_not_found"),
        ({"model": "../../etc/passwd"}, JFK, 404, "model", "model_not_found"),
        ({"model": "whisper-1", "response_format": "xml"}, JFK, 400, "response_format", None),
        (
            {"model": "whisper-1", "timestamp_granularities[]": "word"},
            JFK,
            400,
            "timestamp_granularities",
            None,
        ),
        (
            {
                "model": "whisper-1",
                "response_format": "verbose_json",
                "timestamp_granularities[]": "sentence",
            },
            JFK,
            400,
            "timestamp_granularities",
            None,
        ),
        ({"model": "whisper-1", "temperature": "3"}, JFK, 400, "temperature", None),
        ({"model": "whisper-1", "temperature": "hot"}, JFK, 400, "temperature", None),
        ({"model": "whisper-1", "beam_size": "1000"}, JFK, 400, "beam_size", None),
        ({"model": "whisper-1", "language": "klingon"}, JFK, 400, "language", "invalid_language"),
        (
            {"model": "whisper-1", "chunking_strategy": "{bad json"},
            JFK,
            400,
            "chunking_strategy",
            None,
        ),
        ({"model": "whisper-1", "prompt": "x" * 5000}, JFK, 400, "prompt", None),
    ],
)
def test_bad_requests(
    tiny_server: LiveServer,
    data_dir: Path,
    fields: dict,
    file: str | bytes | None,
    status: int,
    param: str,
    code: str | None,
) -> None:
    resp = _post(tiny_server, fields, file=file, data_dir=data_dir)
    _assert_envelope(resp, status, param=param, code=code)
    assert requests.get(tiny_server.url + "/health", timeout=5).status_code == 200


BAD_FILES = {
    "empty_upload.wav": "empty_file",
    "not_audio.mp3": "invalid_audio",
    "garbage.wav": "invalid_audio",
    "video_only.mp4": "no_audio_stream",
    "zero_seconds.wav": "empty_audio",
    "en_leopard_test_truncated.mp3": "truncated_audio",
    "en_leopard_test_truncated.flac": "truncated_audio",
    "en_leopard_test_truncated.wav": "truncated_audio",
    "header_claims_90min.wav": "truncated_audio",
    "silence_3h.flac": "audio_too_long",
}


@pytest.mark.parametrize(("name", "code"), sorted(BAD_FILES.items()))
def test_bad_audio_files(tiny_server: LiveServer, data_dir: Path, name: str, code: str) -> None:
    resp = _post(
        tiny_server, {"model": "whisper-1"}, file=(data_dir / name).read_bytes(), filename=name
    )
    _assert_envelope(resp, 400, param="file", code=code)
    assert requests.get(tiny_server.url + "/health", timeout=5).status_code == 200


def test_framework_errors_use_envelope(tiny_server: LiveServer) -> None:
    _assert_envelope(requests.get(tiny_server.url + "/v1/nope", timeout=5), 404)
    _assert_envelope(requests.get(tiny_server.url + "/v1/audio/transcriptions", timeout=5), 405)
    _assert_envelope(
        requests.post(tiny_server.url + "/v1/audio/transcriptions", json={"model": "x"}, timeout=5),
        400,
        param="file",
    )


def test_upload_limit_413_before_body(server_factory, tiny_model: Path) -> None:
    server = server_factory(model=str(tiny_model), max_upload_size="64KiB")
    resp = requests.post(
        server.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("a.wav", b"\0" * 200_000)},
        timeout=30,
    )
    _assert_envelope(resp, 413, code="file_too_large")

    def chunks():  # no Content-Length: the limit applies while streaming
        # A well-formed start, so that size is the only fault: a malformed body may be refused
        # as 400 before the limit is reached, depending on how the chunks arrive.
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(100):
            yield b"\0" * 8192

    resp = requests.post(
        server.url + "/v1/audio/transcriptions",
        data=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=x"},
        timeout=30,
    )
    _assert_envelope(resp, 413, code="file_too_large")


# ---- auth ----------------------------------------------------------------------------------------


def test_api_keys(server_factory, tiny_model: Path, data_dir: Path) -> None:
    server = server_factory(model=str(tiny_model), api_keys="key-one,key-two")
    _assert_envelope(
        _post(server, {"model": "whisper-1"}, data_dir=data_dir), 401, code="invalid_api_key"
    )
    _assert_envelope(
        _post(
            server,
            {"model": "whisper-1"},
            data_dir=data_dir,
            headers={"Authorization": "Bearer wrong"},
        ),
        401,
    )
    ok = _post(
        server,
        {"model": "whisper-1"},
        data_dir=data_dir,
        headers={"Authorization": "Bearer key-two"},
    )
    assert ok.status_code == 200
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert requests.get(server.url + "/ready", timeout=5).status_code == 200
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="key-one")
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope").models.list()


# ---- health, readiness, concurrency ------------------------------------------------------------


def test_ready_reports_device(tiny_server: LiveServer) -> None:
    body = requests.get(tiny_server.url + "/ready", timeout=5).json()
    assert body["ready"] is True
    assert body["device"] == "cpu"  # no GPU on the test machines
    assert body["device_reason"]


def test_health_answers_while_transcribing(tiny_server: LiveServer, data_dir: Path) -> None:
    long_audio = (data_dir / "en_ljspeech_LJ001-0001_to_0032_concat.flac").read_bytes()
    result: dict[str, int] = {}

    def transcribe() -> None:
        resp = requests.post(
            tiny_server.url + "/v1/audio/transcriptions",
            data={"model": "whisper-1", "response_format": "text"},
            files={"file": ("long.flac", long_audio)},
            timeout=600,
        )
        result["status"] = resp.status_code

    worker = threading.Thread(target=transcribe)
    worker.start()
    time.sleep(2.0)  # decode done, inference under way
    latencies = []
    while worker.is_alive() and len(latencies) < 20:
        started = time.perf_counter()
        assert httpx.get(tiny_server.url + "/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.1)
    worker.join()
    assert result["status"] == 200
    assert latencies, "transcription finished before /health was probed"
    # the event loop is never blocked by inference: well under a second even at the worst
    assert max(latencies) < 1.0, latencies


def test_request_id_echo(tiny_server: LiveServer) -> None:
    resp = requests.get(tiny_server.url + "/health", headers={"x-request-id": "abc-123"}, timeout=5)
    assert resp.headers["x-request-id"] == "abc-123"
    generated = requests.get(tiny_server.url + "/ready", timeout=5).headers["x-request-id"]
    assert generated.startswith("req_")


def test_file_name_does_not_matter(tiny_server: LiveServer, data_dir: Path) -> None:
    """The SDK names raw bytes 'upload'; detection is by content."""
    for name in ("upload", "speech.wav", "x.txt"):
        resp = _post(
            tiny_server,
            {"model": "whisper-1", "response_format": "text"},
            data_dir=data_dir,
            filename=name,
        )
        assert resp.status_code == 200 and "country" in resp.text.lower()


def test_curl_style_multipart(tiny_server: LiveServer, data_dir: Path) -> None:
    """What `curl -F file=@audio.webm -F model=whisper` sends: httpx builds the same body."""
    body = io.BytesIO((data_dir / "es_mls_13697_11991_000000.opus").read_bytes())
    resp = httpx.post(
        tiny_server.url + "/v1/audio/transcriptions",
        files={"file": ("audio.webm", body, "audio/webm")},
        data={"model": "whisper"},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"]
