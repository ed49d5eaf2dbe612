"""``python -m server``: serve (the default), transcribe a file, calibrate memory, and more.

python -m server                      # serve on 127.0.0.1:8000 (WHISPER_* settings)
python -m server serve --port 9000
python -m server transcribe speech.flac --format srt
python -m server calibrate            # on a GPU: measure memory, write the model's profile
python -m server settings-table       # the table of variables in docs/reference/settings.md
python -m server install-model        # install the embedded default model and exit
python -m server ray --replicas 2     # on a Ray cluster (RAY_ADDRESS) or a local one; '.[ray]'
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from server.config import Settings, env_name, settings_table
from server.memory import host_heap
from server.scaleout.placement import PLACEMENT_TIMEOUT_S


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; invalid values exit with a message naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"  {env_name(field)}: {err['msg']}")
        sys.exit("invalid configuration:\n" + "\n".join(lines))


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.api.connections import uvicorn_options
    from server.app import create_app

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT (up to the graceful timeout), then
    # re-raises the signal; ending with status 0 tells supervisors the stop was clean.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        **uvicorn_options(settings),
    )


def cmd_transcribe(args: argparse.Namespace) -> None:
    import uuid

    from server.api.formats import render
    from server.audio.decode import AudioStream
    from server.chinese import convert_transcript
    from server.engine.core import Engine
    from server.request import Job

    settings = load_settings()
    configure_logging("warning")
    engine = Engine(settings)
    engine.start()
    if not engine.ready or engine.served is None:
        sys.exit(f"model not ready: {engine.load_error}")
    with open(args.file, "rb") as fh:
        audio = AudioStream(fh.read(), max_duration=settings.max_audio_duration)
    job = Job.for_file(
        audio,
        request_id=uuid.uuid4().hex[:8],
        source=engine.served,
        task=args.task,
        language=args.language,
        beam_size=settings.default_beam_size,
        word_timestamps=args.words,
        chinese_script=settings.chinese_script,
        per_region=settings.language_detection == "region",
        languages=settings.languages,
    )
    transcript = convert_transcript(engine.run(job), job.chinese)
    body, _ = render(
        transcript, args.format, granularities=frozenset({"word"}) if args.words else frozenset()
    )
    if isinstance(body, dict):
        import json

        print(json.dumps(body, ensure_ascii=False, indent=2))
    else:
        print(body, end="")
    engine.close()


def cmd_calibrate(args: argparse.Namespace) -> None:
    from server.memory.calibrate import calibrate

    settings = load_settings()
    configure_logging(settings.log_level)
    words = (False,) if args.no_words else (False, True)
    calibrate(
        settings,
        batches=args.batch,
        beams=args.beam,
        words=words,
        chart=not args.no_chart,
        audio=args.audio,
    )


def cmd_settings_table(args: argparse.Namespace) -> None:
    print(settings_table())


def cmd_install_model(args: argparse.Namespace) -> None:
    from server.engine.store import install_default_model

    settings = load_settings()
    print(install_default_model(settings.models_dir))


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def cmd_ray(args: argparse.Namespace) -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        sys.exit(
            "python -m server ray needs Ray Serve, an optional extra: "
            "pip install 'whisper-server[ray]' (from a checkout: pip install '.[ray]')"
        )
    from server.scaleout.deploy import main as ray_main

    load_settings()  # the replicas read the same WHISPER_* variables: fail here, not there
    configure_logging("info")
    ray_main(args)


def main(argv: Sequence[str] | None = None) -> None:
    # Before any thread allocates: freed host memory must be able to go back to the kernel.
    host_heap.configure()
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP server (default)")
    serve.add_argument("--host", help="overrides WHISPER_HOST")
    serve.add_argument("--port", type=int, help="overrides WHISPER_PORT")
    serve.set_defaults(func=cmd_serve)

    tr = sub.add_parser("transcribe", help="transcribe one file with the server's engine")
    tr.add_argument("file")
    tr.add_argument(
        "--format", default="text", choices=["json", "text", "srt", "vtt", "verbose_json"]
    )
    tr.add_argument("--language")
    tr.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    tr.add_argument("--words", action="store_true", help="word timestamps (verbose_json)")
    tr.set_defaults(func=cmd_transcribe)

    cal = sub.add_parser("calibrate", help="measure GPU memory per shape; write the profile")
    cal.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    cal.add_argument("--beam", type=int, nargs="+", default=[1, 5])
    cal.add_argument("--no-words", action="store_true", help="skip word-timestamp shapes")
    cal.add_argument("--no-chart", action="store_true")
    cal.add_argument(
        "--audio",
        type=Path,
        help="speech to measure with (default: the 11 s clip shipped with the package)",
    )
    cal.set_defaults(func=cmd_calibrate)

    sub.add_parser(
        "settings-table", help="print the settings table of docs/reference/settings.md"
    ).set_defaults(func=cmd_settings_table)
    sub.add_parser("install-model", help="install the embedded default model").set_defaults(
        func=cmd_install_model
    )
    ray_cmd = sub.add_parser(
        "ray",
        help="serve on a Ray cluster: an ingress and one replica per GPU (needs '.[ray]')",
        description="Deploy the HTTP API on the Ray cluster at RAY_ADDRESS, or on a local one. "
        "Replicas read the WHISPER_* variables of this process.",
    )
    ray_cmd.add_argument("--replicas", type=int, default=1, help="engine replicas (one per GPU)")
    ray_cmd.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: one GPU per replica where the cluster has GPUs, else CPU replicas (said so)",
    )
    ray_cmd.add_argument("--cpus-per-replica", type=float, default=1.0)
    ray_cmd.add_argument(
        "--router",
        choices=["memory", "default"],
        default="memory",
        help="memory: by each replica's free memory; default: Serve's power of two choices",
    )
    ray_cmd.add_argument(
        "--autoscale",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="scale replicas between MIN and MAX on queue depth",
    )
    ray_cmd.add_argument("--target-ongoing-requests", type=float, default=2.0)
    ray_cmd.add_argument("--host", default="127.0.0.1", help="the Serve proxy's address")
    ray_cmd.add_argument("--port", type=int, default=8000)
    ray_cmd.add_argument("--num-cpus", type=int, help="CPUs of a local cluster (default: all)")
    ray_cmd.add_argument(
        "--placement-timeout",
        type=_positive_seconds,
        default=PLACEMENT_TIMEOUT_S,
        metavar="SECONDS",
        help="give the cluster this long to place every replica, then exit 1 naming the "
        f"missing resource (default {PLACEMENT_TIMEOUT_S:g})",
    )
    ray_cmd.set_defaults(func=cmd_ray)

    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or [])])
    args.func(args)


if __name__ == "__main__":
    main()
