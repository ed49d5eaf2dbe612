"""Every language in a file (issue 26): the language of each stretch of speech, with hysteresis,
and each decoded in its own; forced and restricted languages; the fields that say it (json and
the stream's ``languages``, verbose_json's and diarized_json's segment ``language``, realtime's
``languages`` per item).

The choice of languages is a pure function, tested on synthetic detections; the rest runs the
embedded multilingual model on recordings joined from real clips in six languages, through the
``openai`` SDK, ``requests`` and a raw realtime socket.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import requests
from faster_whisper import decode_audio
from websockets.sync.client import connect

from bench.harness import MIXED, ONE_WINDOW, Clip, join_clips, wav_bytes
from server.batching import languages
from server.batching.languages import Stretch, choose, runs, stretches
from server.languages import language_name
from tests.conftest import LiveServer, wer, within

# ---- choosing languages (pure) -------------------------------------------------------------


def sure(language: str, p: float = 0.95, other: str = "en") -> dict[str, float]:
    """A detection sure of ``language`` at ``p``: ``other`` gets 0.02 (as a sure detection
    leaves the language around it), and the rest goes to a third."""
    if language == other:
        other = "de"
    return {language: p, other: 0.02, "nn": 1 - p - 0.02}


def test_stretches_join_speech_between_pauses_to_two_seconds() -> None:
    found = stretches([0.5, 1.2, 4.0, 4.5, 9.0, 9.8], 10.0)
    # A short tail joins the stretch before it; no pause gives one stretch; pauses outside the
    # window are ignored.
    assert found == [Stretch(0.0, 4.0), Stretch(4.0, 10.0)]
    assert stretches([], 7.0) == [Stretch(0.0, 7.0)]
    assert stretches([-1.0, 0.0, 7.0, 8.0], 7.0) == [Stretch(0.0, 7.0)]
    assert stretches([0.4], 1.0) == [Stretch(0.0, 1.0)]


def test_a_stretch_is_detected_on_its_middle_in_whole_quanta() -> None:
    first, end = Stretch(1.0, 4.33).frames()
    assert (end - first) % languages.QUANTUM_FRAMES == 0
    assert 50 <= first and end <= round(4.33 * 50)
    first, end = Stretch(0.0, 30.0).frames()
    assert end - first == languages.MAX_DETECT_S * 50 and first == 500  # the middle 10 s
    first, end = Stretch(2.0, 2.1).frames()  # shorter than a quantum: one quantum
    assert end - first == languages.QUANTUM_FRAMES


def test_one_unsure_stretch_does_not_flip_a_paragraph() -> None:
    english = [(5.0, sure("en")) for _ in range(4)]
    unsure = [(2.5, {"nl": 0.4, "en": 0.3, "de": 0.3})]
    chosen = choose(english[:2] + unsure + english[2:])
    assert [c for c, _ in chosen] == ["en"] * 5
    # Even a sure stretch flips nothing when it is short: 2 s of a confident other language.
    short = [(2.0, sure("fr", 0.9))]
    assert [c for c, _ in choose(english[:2] + short + english[2:])] == ["en"] * 5


def test_a_few_seconds_of_sure_speech_switch_and_switch_back() -> None:
    evidence = [
        (5.0, sure("en")),
        (5.0, sure("en")),
        (4.0, sure("es", 0.9)),
        (3.0, sure("es", 0.8)),
        (5.0, sure("en")),
    ]
    chosen = choose(evidence)
    assert [c for c, _ in chosen] == ["en", "en", "es", "es", "en"]
    assert chosen[2][1] == pytest.approx(0.9)
    joined = runs([Stretch(5.0 * i, 5.0 * i + 5.0) for i in range(5)], chosen)
    assert [(r.language, r.start, r.end) for r in joined] == [
        ("en", 0.0, 10.0),
        ("es", 10.0, 20.0),
        ("en", 20.0, 25.0),
    ]
    assert joined[1].probability == pytest.approx(0.85)


def test_a_window_is_decoded_in_at_most_six_parts() -> None:
    """Speech switching language every few seconds, each stretch sure of its own: the shortest
    runs join their longer neighbour until six are left."""
    codes = ["en", "de", "fr", "es", "it", "ru", "ja", "zh", "ko", "pt"]
    bounds = np.cumsum([0.0] + [2.5 + 0.1 * i for i in range(10)])
    found = [Stretch(float(a), float(b)) for a, b in itertools.pairwise(bounds)]
    evidence = [(s.seconds, sure(code, 0.999, "xx")) for s, code in zip(found, codes, strict=True)]
    joined = runs(found, choose(evidence))
    assert len(joined) == 10  # every 2.5 s stretch that sure is a run of its own
    kept = languages.at_most(joined)
    assert len(kept) == languages.MAX_PARTS
    assert kept[0].start == 0.0 and kept[-1].end == found[-1].end
    assert all(a.end == b.start for a, b in itertools.pairwise(kept))
    assert languages.at_most(joined[:3]) == joined[:3]


def test_the_language_before_a_window_holds_unless_the_window_says_otherwise() -> None:
    weak = [(3.0, {"de": 0.45, "en": 0.35, "nl": 0.2})]
    assert choose(weak, previous="en") == [("en", 0.35)]
    assert choose(weak) == [("de", 0.45)]
    assert choose([(8.0, sure("de"))], previous="en")[0][0] == "de"


def test_restricted_languages_choose_among_the_allowed_renormalised() -> None:
    evidence = [(5.0, {"de": 0.7, "fr": 0.2, "en": 0.1})]
    ((language, probability),) = choose(evidence, allowed=("en", "fr"))
    assert language == "fr" and probability == pytest.approx(2 / 3)
    # An allowed language the detector never named is still a choice.
    assert choose(evidence, allowed=("ja",)) == [("ja", 1.0)]
    assert choose([]) == []


# ---- recordings in several languages, end to end ------------------------------------------------

CASES = {"seven clips in six languages": MIXED, "three languages in one window": ONE_WINDOW}


@pytest.fixture(scope="module")
def server(server_factory: Any) -> LiveServer:
    """The embedded multilingual model, default settings (WHISPER_LANGUAGE_DETECTION=region)."""
    return server_factory()


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def alone(server: LiveServer, data_dir: Path, clip: Clip) -> str:
    """The clip sent on its own, with its language."""
    with open(data_dir / clip.file, "rb") as fh:
        result = client(server).audio.transcriptions.create(
            model="whisper-1", file=fh, language=clip.language
        )
    return result.text


def covering(clip: Clip, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segments whose middle lies in the clip."""
    return [s for s in segments if clip.start <= (s["start"] + s["end"]) / 2 <= clip.end]


@pytest.mark.parametrize("case", list(CASES))
def test_every_clip_comes_back_in_its_language(
    server: LiveServer, data_dir: Path, case: str
) -> None:
    audio, clips = join_clips(data_dir, CASES[case])
    result = client(server).audio.transcriptions.create(
        model="whisper-1",
        file=("mixed.wav", wav_bytes(audio)),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    body = result.model_dump()
    segments = body["segments"]
    for clip in clips:
        mine = covering(clip, segments)
        assert mine, (clip.file, segments)
        assert {s["language"] for s in mine} == {language_name(clip.language)}, (clip, mine)
        assert mine[0]["start"] >= clip.start - 0.5 and mine[-1]["end"] <= clip.end + 0.5
        text = "".join(s["text"] for s in mine)
        extra = clip.error(text) - clip.error(alone(server, data_dir, clip))
        # Within +0.10 of the clip alone, or one word: in the nine words of the Russian clip,
        # a third of a second more of the pause around it turns "должен" into "должно" alone
        # too (base model), and one word there is 0.11.
        bound = max(0.10, clip.one_error + 1e-9)
        assert within(f"{clip.file}: error joined minus alone", extra, at_most=bound), text
    # Nothing is written over the pauses, and every word lies in a clip.
    assert sum(len(covering(c, segments)) for c in clips) == len(segments)
    for word in body["words"]:
        middle = (word["start"] + word["end"]) / 2
        assert any(c.start - 0.3 <= middle <= c.end + 0.3 for c in clips), word
    # The top-level language is the one spoken longest (its segments' seconds).
    seconds: dict[str, float] = {}
    for s in segments:
        seconds[s["language"]] = seconds.get(s["language"], 0.0) + s["end"] - s["start"]
    assert body["language"] == max(seconds, key=lambda c: seconds[c])


def test_one_voice_switching_language_mid_window(server: LiveServer, data_dir: Path) -> None:
    """faster-whisper's multilingual.mp3: one reader, the MIT licence in English then German,
    the switch inside a window and no pause longer than the reader's own."""
    reference = (data_dir / "multilingual.txt").read_text()
    english, german = (part.strip() for part in reference.split("\n", 1))
    with open(data_dir / "multilingual.mp3", "rb") as fh:
        result = client(server).audio.transcriptions.create(
            model="whisper-1", file=fh, response_format="verbose_json"
        )
    segments = result.model_dump()["segments"]
    spoken = [s["language"] for s in segments]
    switch = spoken.index("german")
    assert spoken == ["english"] * switch + ["german"] * (len(spoken) - switch), spoken
    # The reference is whisper-tiny's own output (it has errors): these bound losing a half.
    said = [
        "".join(s["text"] for s in segments[:switch]),
        "".join(s["text"] for s in segments[switch:]),
    ]
    assert within("WER of the English half", wer(english, said[0]), at_most=0.3), said[0]
    assert within("WER of the German half", wer(german, said[1]), at_most=0.4), said[1]


def test_json_and_the_stream_list_the_languages_in_order(
    server: LiveServer, data_dir: Path
) -> None:
    audio, clips = join_clips(data_dir, MIXED)
    order = list(dict.fromkeys(c.language for c in clips))
    result = client(server).audio.transcriptions.create(
        model="whisper-1", file=("mixed.wav", wav_bytes(audio))
    )
    assert [lang.code for lang in result.languages or []] == order
    stream = client(server).audio.transcriptions.create(
        model="whisper-1", file=("mixed.wav", wav_bytes(audio)), stream=True
    )
    events = list(stream)
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert [lang.code for lang in done.languages or []] == order
    assert done.text == result.text


def test_a_client_leaving_mid_switches_leaves_nothing_held(
    server: LiveServer, data_dir: Path
) -> None:
    """A stream of the seven clips, left after its first event: the windows being decoded in
    parts stop, and every reservation and queued window is given back."""
    audio, _ = join_clips(data_dir, MIXED)
    with httpx.stream(
        "POST",
        server.url + "/v1/audio/transcriptions",
        files={"file": ("mixed.wav", wav_bytes(audio))},
        data={"model": "whisper-1", "stream": "true"},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert any(line.startswith("data:") for line in response.iter_lines())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        memory = httpx.get(server.url + "/v1/memory", timeout=10).json()
        requests_ = memory["requests"]
        settled = not memory["reservations"] and requests_["in_flight"] == 0
        if settled and requests_["running"] == 0 and requests_["queued_windows"] == 0:
            break
        time.sleep(0.2)
    assert settled, memory
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_diarized_segments_say_their_language(server: LiveServer, data_dir: Path) -> None:
    audio, clips = join_clips(data_dir, ONE_WINDOW)
    response = requests.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("mixed.wav", wav_bytes(audio))},
        data={"model": "whisper-1", "response_format": "diarized_json"},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    for clip in clips:
        assert {s["language"] for s in covering(clip, segments)} == {clip.language}


def test_a_given_language_forces_one(server: LiveServer, data_dir: Path) -> None:
    audio, _ = join_clips(data_dir, ONE_WINDOW)
    result = client(server).audio.transcriptions.create(
        model="whisper-1",
        file=("mixed.wav", wav_bytes(audio)),
        response_format="verbose_json",
        language="fr",
    )
    body = result.model_dump()
    assert body["language"] == "french"
    assert {s["language"] for s in body["segments"]} == {"french"}


def test_languages_restrict_detection(server: LiveServer, data_dir: Path) -> None:
    audio, _ = join_clips(data_dir, ONE_WINDOW)
    result = client(server).audio.transcriptions.create(
        model="whisper-1", file=("mixed.wav", wav_bytes(audio)), languages=["fr", "en"]
    )
    codes = [lang.code for lang in result.languages or []]
    assert codes and set(codes) <= {"fr", "en"}
    # A name or a tag is accepted; an unknown language is a 400 naming the field.
    response = requests.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("mixed.wav", wav_bytes(audio))},
        data={"model": "whisper-1", "languages[]": ["German", "xx-nope"]},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "languages" and "xx-nope" in error["message"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_a_translation_translates_every_language(server: LiveServer, data_dir: Path) -> None:
    audio, clips = join_clips(data_dir, ONE_WINDOW)
    result = client(server).audio.translations.create(
        model="whisper-1", file=("mixed.wav", wav_bytes(audio)), response_format="verbose_json"
    )
    body = result.model_dump()
    assert body["language"] == "english"
    for clip in clips:
        mine = covering(clip, body["segments"])
        assert {s["language"] for s in mine} == {language_name(clip.language)}
    text = body["text"]
    ascii_share = sum(ch.isascii() for ch in text) / max(1, len(text))
    assert ascii_share > 0.97, text  # French and German came back in English


def test_file_mode_keeps_one_language_for_the_file(server_factory: Any, data_dir: Path) -> None:
    server = server_factory(language_detection="file")
    audio, _ = join_clips(data_dir, ONE_WINDOW)
    result = client(server).audio.transcriptions.create(
        model="whisper-1", file=("mixed.wav", wav_bytes(audio))
    )
    assert len(result.languages or []) == 1


def test_realtime_items_each_get_their_language(server: LiveServer, data_dir: Path) -> None:
    url = server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    found = []
    with connect(url) as ws:

        def recv() -> dict[str, Any]:
            return json.loads(ws.recv(timeout=120))

        assert recv()["type"] == "session.created"
        ws.send(
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
        assert recv()["type"] == "session.updated"
        for name in ("es_mls_13697_11991_000000.opus", "de_leopard_test_de.wav"):
            samples = decode_audio(str(data_dir / name), sampling_rate=24000)
            pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
            for at in range(0, len(pcm), 48000):
                chunk = base64.b64encode(pcm[at : at + 48000]).decode()
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while (event := recv())["type"] != (
                "conversation.item.input_audio_transcription.completed"
            ):
                assert event["type"] != "error", event
            found.append([lang["code"] for lang in event["languages"]])
    assert found == [["es"], ["de"]]
