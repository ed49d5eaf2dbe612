"""Speaker diarization end to end: conversations built from real recordings of three people,
a stereo call, known speakers named by clips from their other recordings, streaming, the
400s, and the memory the planner counts for it.

The server runs tiny.en on the CPU; the speaker encoder (GE2E, from the resemblyzer wheel) is
installed into each test server's empty model store on first use, as in production.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests

from bench.conversations import Conversation, build, load, to_wav
from server.diarization import DiarizationOptions, Diarizer, SpeakerTrack, load_encoder
from server.engine.store import install_speaker_encoder
from server.errors import DiarizationUnavailableError
from server.memory import CostModel, PlanRequest, Policy, Shape, plan_request, read_model_dims
from server.memory.cost import DIARIZATION_BYTES_PER_SECOND, DIARIZATION_FIXED_BYTES, MiB
from server.memory.probes import DeviceMemory, MemorySnapshot
from server.transcript import Segment
from tests.conftest import DATA, LiveServer, wer, within

LJ = "en_ljspeech_LJ001-0001_to_0032_concat"
SS = "en_librivox_sense_and_sensibility_01_{}.wav"


def lj_clip(clip: str) -> tuple[np.ndarray, str]:
    """One LJSpeech clip cut from the concatenation, with its text."""
    for row in (DATA / f"{LJ}.segments.tsv").read_text().splitlines()[1:]:
        name, start, end, text = row.split("\t")
        if name == clip:
            return load(DATA / f"{LJ}.flac", float(start), float(end)), text
    raise KeyError(clip)


def ss_clip(number: str) -> tuple[np.ndarray, str]:
    name = SS.format(number)
    return load(DATA / name), (DATA / name.replace(".wav", ".txt")).read_text().strip()


@pytest.fixture(scope="module")
def conversation() -> Conversation:
    """Three people, five turns: LJSpeech's reader, the LibriVox reader of Sense and
    Sensibility, and John F. Kennedy, with 0.4-0.9 s pauses (35 s)."""
    lj1, lj2 = lj_clip("LJ001-0004"), lj_clip("LJ001-0006")
    ss1, ss2 = ss_clip("0870"), ss_clip("0890")
    jfk = (load(DATA / "jfk.flac"), (DATA / "jfk.txt").read_text().strip())
    turns = [("lj", *lj1), ("ss", *ss1), ("jfk", *jfk), ("lj", *lj2), ("ss", *ss2)]
    return build("three people", turns, pauses=(0.6, 0.9, 0.4, 0.7))


@pytest.fixture(scope="module")
def two_people() -> Conversation:
    """LJSpeech's reader, the Sense and Sensibility reader, LJ again (19 s)."""
    lj1, lj2 = lj_clip("LJ001-0004"), lj_clip("LJ001-0006")
    return build("two people", [("lj", *lj1), ("ss", *ss_clip("0870")), ("lj", *lj2)])


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    return server_factory(model=str(tiny_model))


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def data_url(samples: np.ndarray) -> str:
    return "data:audio/wav;base64," + base64.b64encode(to_wav(samples)).decode()


def by_turn(conv: Conversation, segments: list[Any]) -> dict[str, Counter[str]]:
    """For each true speaker, the labels of the segments whose middle falls in their turns."""
    seen: dict[str, Counter[str]] = {s: Counter() for s in conv.speakers}
    for seg in segments:
        middle = (seg.start + seg.end) / 2
        for turn in conv.turns:
            if turn.start - 0.3 <= middle <= turn.end + 0.3:
                seen[turn.speaker][seg.speaker] += 1
    return seen


def assert_who_said_what(conv: Conversation, segments: list[Any]) -> dict[str, str]:
    """Each true speaker got one label of their own, and their segments hold their words.

    Returns:
        True speaker -> label.
    """
    seen = by_turn(conv, segments)
    labels = {who: counts.most_common(1)[0][0] for who, counts in seen.items() if counts}
    assert set(labels) == set(conv.speakers), seen
    assert len(set(labels.values())) == len(conv.speakers), seen
    for who, counts in seen.items():
        # Every segment in a speaker's turns carries that speaker's label.
        assert counts[labels[who]] == sum(counts.values()), seen
        said = " ".join(s.text for s in segments if s.speaker == labels[who])
        meant = " ".join(t.text for t in conv.turns if t.speaker == who)
        assert within(f"WER of {who}", wer(meant, said), at_most=0.35), (who, said)
    return labels


def test_a_conversation_of_three_people_is_diarized(
    client: openai.OpenAI, conversation: Conversation
) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("conversation.wav", conversation.wav()),
        response_format="diarized_json",
    )

    assert result.task == "transcribe"
    assert result.duration == pytest.approx(conversation.duration, abs=0.01)
    assert result.usage is not None and result.usage.type == "duration"
    labels = assert_who_said_what(conversation, result.segments)
    # Letters in the order the speakers are first heard.
    assert labels == {"lj": "A", "ss": "B", "jfk": "C"}
    assert all(s.type == "transcript.text.segment" for s in result.segments)
    assert [s.id for s in result.segments] == [f"seg_{i}" for i in range(len(result.segments))]
    assert result.text == " ".join(s.text for s in result.segments)
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts)


def test_known_speakers_are_named_from_clips_of_their_other_recordings(
    client: openai.OpenAI, conversation: Conversation
) -> None:
    lj_reference, _ = lj_clip("LJ001-0011")  # not in the conversation
    ss_reference, _ = ss_clip("0920")
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("conversation.wav", conversation.wav()),
        response_format="diarized_json",
        known_speaker_names=["Linda", "Sam"],
        known_speaker_references=[data_url(lj_reference), data_url(ss_reference)],
    )

    labels = assert_who_said_what(conversation, result.segments)
    # Kennedy had no reference: he keeps a letter, the first one.
    assert labels == {"lj": "Linda", "ss": "Sam", "jfk": "A"}


def test_speaker_bounds_are_kept(client: openai.OpenAI, two_people: Conversation) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("conversation.wav", two_people.wav()),
        response_format="diarized_json",
        extra_body={"max_speakers": 1},
    )
    assert {s.speaker for s in result.segments} == {"A"}


def test_more_speakers_asked_for_than_heard_is_reported(
    server: LiveServer, conversation: Conversation
) -> None:
    """min_speakers=32 on three voices: the transcript names the speakers it told apart, and
    says that it fell short, in the X-Whisper-Degraded header and the body (and, streamed, in
    the done event); a min_speakers that is met says nothing."""

    def post(min_speakers: int, stream: bool = False) -> requests.Response:
        return requests.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": ("conversation.wav", conversation.wav())},
            data={
                "model": "whisper-1",
                "response_format": "diarized_json",
                "min_speakers": str(min_speakers),
                "stream": str(stream).lower(),
            },
            timeout=300,
        )

    resp = post(32)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    found = {s["speaker"] for s in body["segments"]}
    assert 1 <= len(found) < 32
    assert resp.headers["x-whisper-degraded"].split(",") == ["speakers"]
    (note,) = body["x_whisper_degraded"]
    assert note["kind"] == "speakers"
    assert note["reason"].startswith(f"min_speakers=32, but {len(found)} speakers were told")

    streamed = post(32, stream=True)
    done = json.loads(streamed.text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert done["type"] == "transcript.text.done"
    assert [d["kind"] for d in done["x_whisper_degraded"]] == ["speakers"]

    met = post(2)
    assert met.status_code == 200 and "x-whisper-degraded" not in met.headers
    assert "x_whisper_degraded" not in met.json()


def test_the_shortfall_counts_the_speakers_rendered() -> None:
    """Segments without text are not rendered, so their speakers do not count; a call's
    shortfall says that its channels are the speakers."""
    from server.diarization import speaker_shortfall

    segments = [
        Segment(id=0, seek=0, start=0, end=1, text=" hi", speaker="A"),
        Segment(id=1, seek=0, start=1, end=2, text=" ", speaker="B"),
    ]
    assert speaker_shortfall(DiarizationOptions(), segments) is None
    assert speaker_shortfall(DiarizationOptions(min_speakers=1), segments) is None
    assert speaker_shortfall(DiarizationOptions(min_speakers=2), segments) == (
        "min_speakers=2, but 1 speaker was told apart: the audio holds fewer distinct voices, "
        "or too little speech to tell more apart"
    )
    reason = speaker_shortfall(DiarizationOptions(min_speakers=3), segments, channels=2)
    assert reason is not None and "the 2 channels are the speakers" in reason


def test_diarized_segments_stream_with_their_speakers(
    client: openai.OpenAI, conversation: Conversation
) -> None:
    stream = client.audio.transcriptions.create(
        model="whisper-1",
        file=("conversation.wav", conversation.wav()),
        response_format="diarized_json",
        stream=True,
    )
    events = list(stream)

    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    segments = [e for e in events if e.type == "transcript.text.segment"]
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert_who_said_what(conversation, segments)
    # Each segment event comes right after the delta of its text, which names it.
    for n, event in enumerate(events):
        if event.type == "transcript.text.segment":
            assert events[n - 1].type == "transcript.text.delta"
            assert events[n - 1].segment_id == event.id
    assert {d.segment_id for d in deltas} == {s.id for s in segments}
    assert events[-1].text == " ".join(s.text for s in segments)


def call_with_echo(conv: Conversation) -> tuple[bytes, Conversation]:
    """A conversation as a call: LJ's turns on the left channel, the others on the right,
    and each side's voice leaking into the other's channel 35 dB down (line echo)."""
    left = np.zeros_like(conv.samples)
    right = np.zeros_like(conv.samples)
    for turn in conv.turns:
        a, b = int(turn.start * 16000), int(turn.end * 16000)
        (left if turn.speaker == "lj" else right)[a:b] = conv.samples[a:b]
    echo = 10 ** (-35 / 20)
    stereo = np.stack([left + echo * right, right + echo * left])
    return to_wav(stereo, channels=2), conv


def test_a_call_is_diarized_by_channel_and_each_side_transcribed_once(
    server: LiveServer, two_people: Conversation
) -> None:
    wav, conv = call_with_echo(two_people)
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("call.wav", wav)},
        data={"model": "whisper-1", "response_format": "diarized_json"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()

    speakers = [s["speaker"] for s in body["segments"]]
    assert set(speakers) == {"A", "B"}  # two channels, two speakers: the channels decided
    left = " ".join(s["text"] for s in body["segments"] if s["speaker"] == "A")
    right = " ".join(s["text"] for s in body["segments"] if s["speaker"] == "B")
    assert within(
        "WER of the left channel",
        wer(" ".join(t.text for t in conv.turns if t.speaker == "lj"), left),
        at_most=0.35,
    )
    others = " ".join(t.text for t in conv.turns if t.speaker != "lj")
    assert within("WER of the right channel", wer(others, right), at_most=0.35)
    # The echo was not transcribed a second time on the other side.
    assert "block books" not in right.lower() and "typography" not in right.lower()
    assert "dashwood" not in left.lower()
    # The other side's text sits in its turn, in time order.
    ss_turn = conv.turns[1]
    for segment in body["segments"]:
        if segment["speaker"] == "B":
            assert ss_turn.start - 0.5 <= segment["start"] <= ss_turn.end
    assert [s["start"] for s in body["segments"]] == sorted(s["start"] for s in body["segments"])


def test_the_stereo_fixture_gives_each_channel_its_speaker(server: LiveServer) -> None:
    """tests/data/stereo_diarization.wav: two people talking at once, one per channel."""
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("stereo.wav", (DATA / "stereo_diarization.wav").read_bytes())},
        data={"model": "whisper-1", "response_format": "diarized_json"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    lines = dict(
        line.split(": ", 1) for line in (DATA / "stereo_diarization.txt").read_text().splitlines()
    )
    said = {s["speaker"]: s["text"] for s in r.json()["segments"]}
    assert set(said) == {"A", "B"}
    assert within("WER of speaker A", wer(lines["LEFT"], said["A"]), at_most=0.3)
    assert within("WER of speaker B", wer(lines["RIGHT"], said["B"]), at_most=0.3)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
        ({"include[]": "logprobs"}, "include"),
        ({"known_speaker_names[]": ["a", "b"], "known_speaker_references[]": ["x"]}, None),
        ({"known_speaker_names[]": ["a"]}, "known_speaker_names"),
        ({"min_speakers": "3", "max_speakers": "2"}, "min_speakers"),
        ({"max_speakers": "0"}, "max_speakers"),
        ({"diarize_by_channel": "sometimes"}, "diarize_by_channel"),
        ({"known_speaker_names[]": ["a"], "known_speaker_references[]": ["not a url"]}, None),
        (
            {
                "known_speaker_names[]": ["a"],
                "known_speaker_references[]": ["data:text/plain;base64,aGVsbG8="],
            },
            "known_speaker_references",
        ),
        (
            {
                "known_speaker_names[]": ["a"],
                "known_speaker_references[]": [
                    "data:audio/wav;base64,"
                    + base64.b64encode(b"RIFF not really a wav file at all").decode()
                ],
            },
            "known_speaker_references",
        ),
    ],
)
def test_invalid_diarization_requests_are_400s(
    server: LiveServer, fields: dict[str, Any], param: str | None
) -> None:
    names = fields.get("known_speaker_names[]", [])
    refs = fields.get("known_speaker_references[]", [])
    data: list[tuple[str, str]] = [("model", "whisper-1"), ("response_format", "diarized_json")]
    data += [(k, v) for k, v in fields.items() if isinstance(v, str)]
    data += [("known_speaker_names[]", n) for n in names]
    data += [("known_speaker_references[]", u) for u in refs]
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("jfk.flac", (DATA / "jfk.flac").read_bytes())},
        data=data,
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] in (param or "known_speaker_names", "known_speaker_references")
    assert error["message"]


def test_five_references_are_too_many(server: LiveServer) -> None:
    clip = data_url(load(DATA / "jfk.flac", 0, 3))
    data = [("model", "whisper-1"), ("response_format", "diarized_json")]
    data += [("known_speaker_names[]", f"p{i}") for i in range(5)]
    data += [("known_speaker_references[]", clip) for _ in range(5)]
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("jfk.flac", (DATA / "jfk.flac").read_bytes())},
        data=data,
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "known_speaker_references"
    assert "limit is 4" in r.json()["error"]["message"]


def test_a_reference_must_be_two_to_ten_seconds(server: LiveServer) -> None:
    r = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("jfk.flac", (DATA / "jfk.flac").read_bytes())},
        data={
            "model": "whisper-1",
            "response_format": "diarized_json",
            "known_speaker_names[]": "jfk",
            "known_speaker_references[]": data_url(load(DATA / "jfk.flac")),  # 11 s
        },
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "known_speaker_references"
    assert "2 to 10 seconds" in r.json()["error"]["message"]


def test_translations_are_not_diarized(server: LiveServer) -> None:
    r = requests.post(
        f"{server.url}/v1/audio/translations",
        files={"file": ("jfk.flac", (DATA / "jfk.flac").read_bytes())},
        data={"model": "whisper-1", "response_format": "diarized_json"},
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format"


def test_without_the_encoder_weights_the_400_says_how_to_install_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.engine.store

    monkeypatch.setattr(server.engine.store.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DiarizationUnavailableError) as raised:
        install_speaker_encoder(tmp_path)
    assert raised.value.status == 400
    assert raised.value.param == "response_format"
    assert "pip install --no-deps resemblyzer==0.1.4" in raised.value.message


# ---- the speakers across pieces, and their memory --------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_encoder(install_speaker_encoder(tmp_path_factory.mktemp("models")))


def test_speakers_keep_their_labels_across_pieces(encoder: Any) -> None:
    """A long file is diarized piece by piece: a voice heard again in a later piece gets the
    label it had in the first."""
    lj, _ = lj_clip("LJ001-0003")
    ss, _ = ss_clip("0870")
    lj2, _ = lj_clip("LJ001-0007")
    ss2, _ = ss_clip("0920")
    first = build("piece 1", [("lj", lj, ""), ("ss", ss, "")]).samples
    second = build("piece 2", [("ss", ss2, ""), ("lj", lj2, "")]).samples
    diarizer = Diarizer(encoder, DiarizationOptions())
    diarizer.add_piece(first, 0.0)
    diarizer.add_piece(second, 300.0)
    track: SpeakerTrack = diarizer.track
    names = track.names()
    assert len(track.speakers) == 2
    who = lambda t: names[track.speaker_at(t, t + 1)]  # noqa: E731
    assert who(2.0) == who(300 + 12.0) == "A"  # LJ: 0.3 s into piece 1, second in piece 2
    assert who(13.0) == who(300 + 2.0) == "B"


def test_the_cost_model_counts_diarization_and_the_planner_plans_for_it(tiny_model: Path) -> None:
    cost = CostModel(read_model_dims(tiny_model))
    plain = Shape(device="cpu", compute_type="int8", batch_size=1)
    diarized = Shape(device="cpu", compute_type="int8", batch_size=1, diarize=True)
    a, b = cost.estimate(plain), cost.estimate(diarized)
    extra = b.host_bytes(300) - a.host_bytes(300)
    assert extra == 300 * DIARIZATION_BYTES_PER_SECOND + DIARIZATION_FIXED_BYTES
    assert b.breakdown["host.diarization_per_second"] == DIARIZATION_BYTES_PER_SECOND

    # Host RAM that holds the whole hour for transcription, but not with diarization: the
    # diarized request is planned in shorter pieces.
    hour = 3600.0
    budget = a.device_bytes + a.host_bytes(hour) + 64 * MiB
    total = budget + Policy().host_headroom.resolve(64 << 30)
    host = DeviceMemory("cpu", 0, "host", None, total=64 << 30, free=total, used=0)
    snapshot = MemorySnapshot(device=host, host=host, taken_at=0.0)
    kwargs = {"reserved": 0, "cost": cost}
    as_plain = plan_request(PlanRequest(plain, hour), snapshot, Policy(), **kwargs)
    as_diarized = plan_request(PlanRequest(diarized, hour), snapshot, Policy(), **kwargs)
    assert as_plain.action == as_diarized.action == "run"
    assert as_plain.host_chunk_seconds == hour
    assert as_diarized.host_chunk_seconds < hour
    assert as_diarized.host_bytes <= budget - as_diarized.estimate.device_bytes


def test_a_piece_s_diarization_stays_within_its_estimate(encoder: Any) -> None:
    """Measured: what diarizing 60 s of speech allocates at its peak is below what the cost
    model reserves for it."""
    samples = load(DATA / f"{LJ}.flac", 0, 60)
    diarizer = Diarizer(encoder, DiarizationOptions())
    tracemalloc.start()
    try:
        diarizer.add_piece(samples, 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert diarizer.windows > 50  # a window every 0.8 s of speech
    assert peak <= 60 * DIARIZATION_BYTES_PER_SECOND + DIARIZATION_FIXED_BYTES
    assert peak >= DIARIZATION_FIXED_BYTES / 2  # and not wildly over-counted


def test_render_shape_matches_the_sdk(client: openai.OpenAI) -> None:
    """The body parses as the SDK's own TranscriptionDiarized with nothing left over but the
    segments' ``language``."""
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1",
        file=("jfk.flac", (DATA / "jfk.flac").read_bytes()),
        response_format="diarized_json",
    )
    body = json.loads(raw.text)
    assert set(body) == {"task", "duration", "text", "segments", "usage"}
    # and each segment's language, the one field the server adds (issue 26)
    assert set(body["segments"][0]) == {"type", "id", "start", "end", "speaker", "text", "language"}
    assert {s["language"] for s in body["segments"]} == {"en"}
    assert {s["speaker"] for s in body["segments"]} == {"A"}
