"""Live transcription over WebSocket (/v1/realtime): the real openai SDK's realtime clients
and raw WebSocket clients, in both dialects, on a real server with tiny.en and real speech.

Audio is streamed faster than real time (4x) to keep the suite short; the bench
(bench/realtime.py) streams at real-time pace and measures latency.
"""

from __future__ import annotations

import base64
import importlib
import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from faster_whisper import decode_audio
from faster_whisper.vad import get_vad_model
from openai import OpenAI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from bench.harness import edit_distance
from server.realtime.audio import InputDecoder, Resampler, decode_g711
from server.realtime.events import EventError, parse_client_event
from server.realtime.session_config import SessionConfig, TurnDetection, apply_beta, apply_ga
from server.realtime.turns import StablePrefix, TurnDetector, logprobs_within
from server.request import live_window
from server.transcript import TokenLogprob
from server.whisper.runner import VAD_FRAME, StreamingVad
from tests.conftest import LiveServer, wer, within, words

LEOPARD = "en_leopard_test"  # 5.9 s, one sentence
SENSE = "en_librivox_sense_and_sensibility_01_0870"  # 7.1 s
SPEED = 4.0  # times real time
CHUNK_S = 0.1


# ---- helpers -----------------------------------------------------------------------------------


def pcm24(path: Path, silence_s: float = 1.5) -> bytes:
    """A clip as the Realtime API's PCM (16-bit, 24 kHz, mono), then ``silence_s`` of silence."""
    samples = decode_audio(str(path), sampling_rate=24000)
    samples = np.concatenate([samples, np.zeros(int(silence_s * 24000), np.float32)])
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def ulaw_encode(pcm: bytes) -> bytes:
    """16-bit PCM -> G.711 μ-law (the standard compander, written out for the test)."""
    x = np.frombuffer(pcm, "<i2").astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def chunks(data: bytes, bytes_per_s: int) -> Iterator[str]:
    """Base64 appends of ``CHUNK_S`` of audio each, paced at ``SPEED`` times real time."""
    step = int(bytes_per_s * CHUNK_S)
    for i in range(0, len(data), step):
        yield base64.b64encode(data[i : i + step]).decode()
        time.sleep(CHUNK_S / SPEED)


def ws_url(server: LiveServer, query: str = "intent=transcription") -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime?" + query


def events_until(
    recv: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """Events received until ``done`` says so (inclusive)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = recv()
        seen.append(event)
        if done(event):
            return seen
    raise AssertionError(f"timed out; got {[e['type'] for e in seen]}")


def raw_recv(ws: ClientConnection) -> Callable[[], dict[str, Any]]:
    return lambda: json.loads(ws.recv(timeout=60))


def reference(data_dir: Path, name: str) -> str:
    return (data_dir / f"{name}.txt").read_text()


def check_items(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each item's (joined deltas, completed transcript), checking that every server event has an
    id, transcription events follow their commit, and the deltas are prefix-consistent."""
    committed: list[str] = []
    deltas: dict[str, str] = {}
    items = []
    for e in events:
        assert e["event_id"].startswith("event_")
        if e["type"] == "input_audio_buffer.committed":
            assert e["previous_item_id"] == (committed[-1] if committed else None)
            committed.append(e["item_id"])
        elif e["type"] == "conversation.item.input_audio_transcription.delta":
            assert e["content_index"] == 0
            deltas[e["item_id"]] = deltas.get(e["item_id"], "") + e["delta"]
        elif e["type"] == "conversation.item.input_audio_transcription.completed":
            assert e["item_id"] in committed
            assert e["usage"]["type"] == "duration" and e["usage"]["seconds"] >= 1
            joined = deltas.get(e["item_id"], "")
            final = words(e["transcript"])
            # Sent text is rarely contradicted: a word edit or two at most turns it into a
            # prefix of the final text (a word the final decode adds at the start shifts the
            # rest, and counts once). 0-1 edits over the ten kernel paths of
            # bench/kernel_paths.py; the bound is twice the worst.
            sent = words(joined)
            closest = min(edit_distance(sent, final[:k]) for k in range(len(final) + 1))
            assert within("delta edits vs completed", closest, at_most=2), (joined, e["transcript"])
            items.append((joined, e["transcript"]))
    return items


# ---- pure parts --------------------------------------------------------------------------------


def test_g711_decoding_matches_the_standard() -> None:
    codes = bytes(range(256))
    # Spot values from G.711's tables, and the round trip through the standard μ-law compander.
    assert decode_g711(b"\xff\x80\x00", "g711_ulaw").tolist() == [0, 32124, -32124]
    assert decode_g711(b"\xd5\xaa\x2a", "g711_alaw").tolist() == [8, 32256, -32256]
    assert ulaw_encode(decode_g711(codes, "g711_ulaw").astype("<i2").tobytes()) == codes.replace(
        b"\x7f", b"\xff"
    )  # μ-law has two zeros (0x7f and 0xff); the encoder writes 0xff
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            audioop = importlib.import_module("audioop")  # gone in Python 3.13
        except ImportError:
            return
        ulaw = np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2")
        alaw = np.frombuffer(audioop.alaw2lin(codes, 2), "<i2")
    assert np.array_equal(decode_g711(codes, "g711_ulaw"), ulaw)
    assert np.array_equal(decode_g711(codes, "g711_alaw"), alaw)


def test_resampler_keeps_speech_band_removes_what_would_alias_and_streams() -> None:
    t = np.arange(48000) / 24000

    def gain(freq: float) -> float:
        out = Resampler(24000)(np.sin(2 * np.pi * freq * t).astype(np.float32))
        return float(np.sqrt(2 * np.mean(out[500:-500] ** 2)))

    assert abs(gain(1000) - 1) < 0.01
    assert abs(gain(6500) - 1) < 0.02
    assert gain(9000) < 0.01 and gain(11000) < 0.01  # would fold to 7 and 5 kHz
    x = np.random.default_rng(0).standard_normal(24000).astype(np.float32)
    whole = Resampler(24000)(x)
    stream = Resampler(24000)
    parts = np.concatenate([stream(x[i : i + 333]) for i in range(0, len(x), 333)])
    assert abs(len(whole) - 16000) < 40 and len(parts) == len(whole)
    assert np.allclose(parts, whole, atol=1e-5)


def test_input_decoder_carries_a_sample_split_across_appends() -> None:
    pcm = (np.sin(np.arange(2400) / 5) * 20000).astype("<i2").tobytes()
    whole = InputDecoder("pcm16")(pcm)
    split = InputDecoder("pcm16")
    parts = np.concatenate([split(pcm[:1001]), split(pcm[1001:])])  # 1001: mid-sample
    assert np.allclose(parts, whole, atol=1e-6)


def test_streaming_vad_scores_like_the_whole_array(data_dir: Path) -> None:
    audio = decode_audio(str(data_dir / "jfk.flac"))
    n = len(audio) // VAD_FRAME * VAD_FRAME
    whole = get_vad_model()(audio[:n]).reshape(-1)
    vad = StreamingVad()
    streamed = np.concatenate([vad(audio[i : min(i + 1234, n)]) for i in range(0, n, 1234)])
    assert len(streamed) == len(whole)
    assert np.allclose(streamed, whole, atol=1e-5)


def test_turn_detector_starts_with_padding_and_stops_after_the_silence() -> None:
    detector = TurnDetector(
        TurnDetection(threshold=0.5, prefix_padding_ms=64, silence_duration_ms=96)
    )
    probs = [0.1] * 5 + [0.9, 0.9, 0.4, 0.9] + [0.2] * 2 + [0.9] + [0.1] * 3 + [0.1] * 2
    turns = detector.feed(np.array(probs))
    frame = VAD_FRAME
    # Starts at frame 5, reaching back two frames (64 ms); the dip to 0.4 and the two quiet
    # frames are shorter than 96 ms; the three quiet frames after frame 11 end it.
    assert [(t.kind, t.sample) for t in turns] == [("started", 3 * frame), ("stopped", 15 * frame)]
    assert turns[1].speech_end == 12 * frame  # where the silence that ended it began
    assert not detector.speaking and detector.quiet_since is None
    detector.feed(np.array([0.9, 0.1]))
    assert detector.quiet_since == 18 * frame  # silence under way: a turn may be ending


def test_a_delta_gets_the_tokens_that_spell_it() -> None:
    def tokens(*parts: bytes) -> tuple[TokenLogprob, ...]:
        return tuple(
            TokenLogprob(p.decode(errors="replace"), -0.1 * i, tuple(p))
            for i, p in enumerate(parts)
        )

    english = tokens(b" And", b" so", b" my", b" fellow", b" Americans", b",")
    text = "And so my fellow Americans,"
    spelled = lambda ts: "".join(t.token for t in ts)  # noqa: E731
    assert spelled(logprobs_within(english, text, 0, len("And so my"))) == " And so my"
    assert spelled(logprobs_within(english, text, 9, len(text))) == " fellow Americans,"
    # 我 is three bytes that two tokens share; the converted script (們 for 们) keeps widths.
    mandarin = tokens("我".encode()[:2], "我".encode()[2:] + "们".encode(), "今天".encode())
    first = logprobs_within(mandarin, "我們今天", 0, 2)
    assert [t.bytes for t in first] == [t.bytes for t in mandarin[:2]]
    assert logprobs_within(mandarin, "我們今天", 2, 4) == mandarin[2:]


def test_stable_prefix_sends_only_agreed_words_and_never_contradicts_itself() -> None:
    prefix = StablePrefix()
    assert prefix.interim("And so my fell") is None  # nothing to agree with yet
    assert prefix.interim("And so my fellow Americans") == "And so my"
    assert prefix.interim("And so my fellow Americans, ask") == " fellow"
    assert prefix.interim("And so, my fellow Americans, ask not") is None  # disagrees: waits
    assert prefix.text == "And so my fellow"
    assert prefix.final("And so my fellow Americans, ask not.") == " Americans, ask not."
    assert prefix.text == "And so my fellow Americans, ask not."
    assert prefix.span == (len("And so my fellow"), len(prefix.text))

    other = StablePrefix()
    other.interim("我们今天")
    assert other.interim("我们今天去") == "我们今天"  # scripts without spaces: by character
    assert other.final("我们明天去") is None  # contradicts: completed carries the truth


def test_client_events_parse_and_updates_apply_partially() -> None:
    update = parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcmu"},
                            "transcription": {"language": "en"},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300},
                        }
                    },
                    "include": ["item.input_audio_transcription.logprobs"],
                },
            }
        )
    )
    config = apply_ga(SessionConfig(prompt="keep me"), update)  # type: ignore[arg-type]
    assert (config.format, config.language, config.prompt, config.logprobs) == (
        "g711_ulaw",
        "en",
        "keep me",
        True,
    )
    assert config.turn_detection == TurnDetection(silence_duration_ms=300)
    off = parse_client_event(
        '{"type":"transcription_session.update","session":{"turn_detection":null}}'
    )
    assert apply_beta(config, off).turn_detection is None  # type: ignore[arg-type]
    for bad, param in [
        ("{", None),
        ('{"type":"response.create"}', "type"),
        (
            '{"type":"session.update","session":{"type":"transcription","audio":{"input":{"format":{"type":"audio/pcm","rate":16000}}}}}',
            "session.audio.input.format.rate",
        ),
    ]:
        with pytest.raises(EventError) as err:
            parse_client_event(bad)
        assert err.value.param == param
    assert (
        live_window(16000 * 9) == 10
        and live_window(16000 * 16) == 20
        and live_window(16000 * 31) is None
    )


# ---- over the wire -----------------------------------------------------------------------------


def test_openai_sdk_ga_server_vad_streams_deltas_and_completes(
    tiny_server: LiveServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []  # samples of every decode (interim, early final, final)
    real_run = tiny_server.engine.run

    def counted(job: Any, **kwargs: Any) -> Any:
        decoded.append(len(job.audio))
        return real_run(job, **kwargs)

    monkeypatch.setattr(tiny_server.engine, "run", counted)
    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    audio = pcm24(data_dir / f"{LEOPARD}.wav")
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = conn.recv()
        assert created.type == "session.created"
        assert created.session.type == "transcription"
        conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                    }
                },
            }
        )
        updated = conn.recv()
        assert updated.type == "session.updated"
        for chunk in chunks(audio, 48000):
            conn.input_audio_buffer.append(audio=chunk)

        def recv() -> dict[str, Any]:
            return conn.recv().model_dump()

        events = events_until(recv, lambda e: e["type"].endswith("transcription.completed"))
    kinds = [e["type"] for e in events]
    assert (
        kinds.index("input_audio_buffer.speech_started")
        < kinds.index("input_audio_buffer.speech_stopped")
        < kinds.index("input_audio_buffer.committed")
    )
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    assert started["item_id"] == stopped["item_id"]
    assert 0 <= started["audio_start_ms"] < 1000 and 5000 < stopped["audio_end_ms"] < 7500
    ((_, transcript),) = check_items(events)
    assert within("WER vs reference", wer(reference(data_dir, LEOPARD), transcript), at_most=0.15)
    # The item keeps 250 ms of the 500 ms of silence that ended it, and its final decode ran
    # once: early, while the VAD waited out the silence, or after the commit, never both.
    final = max(decoded)  # the whole item: every interim decode is shorter
    assert 5.0 < final / 16000 < stopped["audio_end_ms"] / 1000 - 0.2
    assert decoded.count(final) == 1, decoded


def test_openai_sdk_beta_manual_commit(tiny_server: LiveServer, data_dir: Path) -> None:
    client = OpenAI(
        api_key="unused",
        base_url=tiny_server.url + "/v1",
        websocket_base_url=tiny_server.url.replace("http://", "ws://") + "/v1",
    )
    audio = pcm24(data_dir / f"{SENSE}.wav", silence_s=0)
    with client.beta.realtime.connect(
        model="whisper-1", extra_query={"intent": "transcription"}
    ) as conn:

        def recv() -> dict[str, Any]:
            return json.loads(conn.recv_bytes())

        assert recv()["type"] == "transcription_session.created"
        conn.transcription_session.update(
            session={"input_audio_format": "pcm16", "turn_detection": None}
        )
        updated = recv()
        assert updated["type"] == "transcription_session.updated"
        assert updated["session"]["turn_detection"] is None
        for chunk in chunks(audio, 48000):
            conn.input_audio_buffer.append(audio=chunk)
        conn.input_audio_buffer.commit()
        events = events_until(recv, lambda e: e["type"].endswith("transcription.completed"))
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.speech_started" not in kinds  # no VAD: the client commits
    ((_, transcript),) = check_items(events)
    assert within("WER vs reference", wer(reference(data_dir, SENSE), transcript), at_most=0.2)


def test_raw_beta_client_ulaw_with_server_vad(tiny_server: LiveServer, data_dir: Path) -> None:
    pcm8k = (
        np.clip(decode_audio(str(data_dir / f"{LEOPARD}.wav"), sampling_rate=8000), -1, 1) * 32767
    ).astype("<i2")
    ulaw = ulaw_encode(np.concatenate([pcm8k, np.zeros(12000, "<i2")]).tobytes())
    with connect(ws_url(tiny_server), additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        recv = raw_recv(ws)
        assert recv()["type"] == "transcription_session.created"
        ws.send(
            json.dumps(
                {
                    "type": "transcription_session.update",
                    "session": {
                        "input_audio_format": "g711_ulaw",
                        "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": {"type": "server_vad", "threshold": 0.5},
                    },
                }
            )
        )
        assert recv()["session"]["input_audio_format"] == "g711_ulaw"
        for chunk in chunks(ulaw, 8000):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        events = events_until(recv, lambda e: e["type"].endswith("transcription.completed"))
    ((_, transcript),) = check_items(events)
    assert within("WER vs reference", wer(reference(data_dir, LEOPARD), transcript), at_most=0.15)


def test_raw_ga_client_logprobs_and_bad_events_keep_the_session_usable(
    tiny_server: LiveServer, data_dir: Path
) -> None:
    with connect(ws_url(tiny_server)) as ws:
        recv = raw_recv(ws)
        assert recv()["type"] == "session.created"
        bad: list[tuple[str, str | None]] = [
            ("not json", "invalid_json"),
            (json.dumps({"type": "response.create", "event_id": "e1"}), "unsupported_event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "@@"}), "invalid_value"),
            (
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"transcription": {"model": "nope"}}},
                        },
                    }
                ),
                "model_not_found",
            ),
            (
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}},
                        },
                    }
                ),
                "invalid_value",
            ),
            (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
        ]
        for message, code in bad:
            ws.send(message)
            event = recv()
            assert event["type"] == "error", event
            assert event["error"]["code"] == code and event["error"]["message"]
            assert event["error"]["type"] == "invalid_request_error"
        assert event["error"]["event_id"] is None
        ws.send(json.dumps({"type": "response.create", "event_id": "e1"}))
        assert recv()["error"]["event_id"] == "e1"
        ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {
                            "input": {"turn_detection": None, "transcription": {"language": "en"}}
                        },
                        "include": ["item.input_audio_transcription.logprobs"],
                    },
                }
            )
        )
        assert recv()["type"] == "session.updated"
        for chunk in chunks(pcm24(data_dir / f"{LEOPARD}.wav", silence_s=0.3), 48000):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = events_until(recv, lambda e: e["type"].endswith("transcription.completed"))
    completed = events[-1]
    assert within(
        "WER vs reference", wer(reference(data_dir, LEOPARD), completed["transcript"]), at_most=0.15
    )
    logprobs = completed["logprobs"]
    assert logprobs and all(p["logprob"] <= 0 and p["bytes"] for p in logprobs)
    assert "".join(p["token"] for p in logprobs).strip() == completed["transcript"]
    # Each delta carries its own tokens (at least the last one, from the final decode).
    deltas = [e for e in events if e["type"].endswith("transcription.delta")]
    assert deltas
    for delta in deltas:
        spelled = "".join(p["token"] for p in delta["logprobs"])
        assert spelled.strip() == delta["delta"].strip(), delta


def test_api_key_header_or_browser_subprotocol(server_factory: Any, tiny_model: Path) -> None:
    server = server_factory(model=str(tiny_model), api_keys="k-one,k-two")
    with connect(ws_url(server)) as ws:
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with connect(ws_url(server), subprotocols=["realtime", "openai-insecure-api-key.wrong"]) as ws:  # type: ignore[list-item]
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_api_key"
    with connect(ws_url(server), subprotocols=["realtime", "openai-insecure-api-key.k-two"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "realtime"
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    client = OpenAI(base_url=server.url + "/v1", api_key="k-one")
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        assert conn.recv().type == "session.created"


def assert_released(server: LiveServer) -> None:
    """Everything the sessions held is given back (within a decode's time)."""
    sessions, engine = server.app.state.realtime, server.engine
    admission = server.app.state.admission
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        sessions.active or admission.depth or engine.reservations.snapshot()
    ):
        time.sleep(0.1)
    assert sessions.active == 0 and admission.depth == 0
    assert not engine.reservations.snapshot()


def test_a_session_the_planner_cannot_fit_is_refused_when_it_opens(
    server_factory: Any, tiny_model: Path
) -> None:
    # The settings of test_ui's refusal test (one server for both): 1 MiB of host RAM.
    server = server_factory(model=str(tiny_model), host_memory_limit="1MiB", max_memory_wait=0)
    with connect(ws_url(server)) as ws:
        refused = json.loads(ws.recv(timeout=10))
        assert refused["type"] == "error", refused
        assert refused["error"]["code"] == "insufficient_memory"
        assert "try again in" in refused["error"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert_released(server)


def test_limits_and_a_client_that_vanishes_mid_utterance(
    server_factory: Any, tiny_model: Path, data_dir: Path
) -> None:
    server = server_factory(
        model=str(tiny_model),
        realtime_max_sessions=1,
        realtime_max_item_seconds=3,
        realtime_idle_timeout=2,
    )
    audio = pcm24(data_dir / f"{SENSE}.wav", silence_s=0)
    with connect(ws_url(server)) as first:
        assert json.loads(first.recv(timeout=10))["type"] == "session.created"
        # One session at most: the next is refused, clearly.
        with connect(ws_url(server)) as second:
            refused = json.loads(second.recv(timeout=10))
            assert refused["error"]["code"] == "session_limit_reached"
            assert "WHISPER_REALTIME_MAX_SESSIONS" in refused["error"]["message"]
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        # Without VAD the buffer holds at most 3 s: the append past it is refused.
        first.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"turn_detection": None}},
                    },
                }
            )
        )
        assert json.loads(first.recv(timeout=10))["type"] == "session.updated"
        four_s = base64.b64encode(audio[: 4 * 48000]).decode()
        first.send(json.dumps({"type": "input_audio_buffer.append", "audio": four_s}))
        full = json.loads(first.recv(timeout=10))
        assert full["error"]["code"] == "input_audio_buffer_full"
        # The connection stays usable: speech, then the client vanishes mid-utterance (no
        # close handshake) while its item is decoding.
        for chunk in islice(chunks(audio, 48000), 25):  # paced as sent, not all first
            first.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        first.send(json.dumps({"type": "input_audio_buffer.commit"}))
        first.socket.close()
    assert_released(server)
    # With server VAD: the client vanishes while it is still speaking (interim decodes running).
    with connect(ws_url(server)) as third:
        assert json.loads(third.recv(timeout=10))["type"] == "session.created"
        for chunk in islice(chunks(audio, 48000), 30):
            third.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        third.socket.close()
    assert_released(server)
    # The place is free and the server still serves: a new session transcribes.
    with connect(ws_url(server)) as ws:
        recv = raw_recv(ws)
        assert recv()["type"] == "session.created"
        for chunk in chunks(pcm24(data_dir / f"{LEOPARD}.wav")[: 3 * 48000], 48000):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = events_until(recv, lambda e: e["type"].endswith("transcription.completed"))
        assert "quilter" in events[-1]["transcript"].lower()
        # A session left idle is closed (WHISPER_REALTIME_IDLE_TIMEOUT=2).
        idle = events_until(recv, lambda e: e["type"] == "error", timeout=10)
        assert idle[-1]["error"]["code"] == "session_idle_timeout"

    # A session is counted as ended once its handler returns, just after its last event. The
    # two clients that vanished end as "disconnected", or as "idle" when the idle timer (2 s)
    # fires before the dead socket is noticed (both free everything, as checked above).
    def ended(outcome: str, text: str) -> float:
        prefix = f'whisper_realtime_sessions_ended_total{{outcome="{outcome}"}} '
        return sum(
            float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)
        )

    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(server.url + "/metrics").text
        total = ended("idle", metrics) + ended("disconnected", metrics)
        if total == 3 and "whisper_realtime_sessions_active 0.0" in metrics:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    assert ended("idle", metrics) >= 1  # the last one, at least
    count = next(
        line
        for line in metrics.splitlines()
        if line.startswith("whisper_realtime_completion_seconds_count")
    )
    assert float(count.split()[-1]) >= 1


def test_a_live_turn_is_not_stuck_behind_a_long_upload(
    tiny_server: LiveServer, data_dir: Path
) -> None:
    """A turn ends while the server decodes a 231 s file (word timestamps, in batches of its
    own windows): its final decode goes before the file's windows (server/batching/policy.py)."""
    long = "en_ljspeech_LJ001-0001_to_0032_concat.flac"
    upload: dict[str, Any] = {}

    def send() -> None:
        upload["response"] = httpx.post(
            tiny_server.url + "/v1/audio/transcriptions",
            files={"file": (long, (data_dir / long).read_bytes())},
            data={
                "model": "whisper-1",
                "response_format": "verbose_json",
                "timestamp_granularities[]": "word",
            },
            timeout=300,
        )

    uploading = threading.Thread(target=send)
    uploading.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the file's windows are queued
            memory = httpx.get(tiny_server.url + "/v1/memory", timeout=10).json()
            if memory["scheduling"]["classes"]["long"]["queued_windows"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the upload's windows were never queued")
        audio = pcm24(data_dir / f"{LEOPARD}.wav")
        with connect(ws_url(tiny_server)) as ws:
            recv = raw_recv(ws)
            assert recv()["type"] == "session.created"
            for chunk in chunks(audio, 48000):
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            events_until(recv, lambda e: e["type"] == "input_audio_buffer.speech_stopped")
            stopped = time.monotonic()
            events = events_until(recv, lambda e: e["type"].endswith("transcription.completed"))
            latency = time.monotonic() - stopped
        beside = uploading.is_alive()
    finally:
        uploading.join(timeout=300)
    transcript = events[-1]["transcript"]
    assert within("WER vs reference", wer(reference(data_dir, LEOPARD), transcript), at_most=0.15)
    assert beside, "the upload ended before the turn: nothing was measured beside it"
    # Alone the final decode ends about 0.2 s after speech stops; behind a batch of the file's
    # windows it would wait for them.
    assert within("stop->completed beside a long upload (s)", latency, at_most=1.5), latency
    assert upload["response"].status_code == 200
    assert len(upload["response"].json()["words"]) > 500
