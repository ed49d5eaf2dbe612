"""The command line as the README and the Dockerfile use it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from server.config import Settings, settings_table

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_settings_page_table_matches_settings() -> None:
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    assert settings_table() in page, "regenerate with: python -m server settings-table"
    for name in Settings.model_fields:
        assert f"WHISPER_{name.upper()}" in page


def test_dockerfile_runs_the_readme_command() -> None:
    dockerfile = (ROOT / "Dockerfile.cuda").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert cmd == ["python", "-m", "server", "serve"]
    assert re.search(r"^FROM nvidia/cuda:12\.[\d.]+-runtime-", dockerfile, re.M)
    assert re.search(r"^USER \d+", dockerfile, re.M), "runs as a non-root user"
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert 'VOLUME ["/models"]' in dockerfile and "WHISPER_MODELS_DIR=/models" in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert "python -m server serve" in readme
    # the CLI accepts exactly that command
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--port" in out.stdout


def test_invalid_configuration_names_the_variable() -> None:
    env = {**os.environ, "WHISPER_GPU_HEADROOM": "lots", "WHISPER_PORT": "99999"}
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve"], capture_output=True, text=True, env=env
    )
    assert out.returncode != 0
    assert "WHISPER_GPU_HEADROOM" in out.stderr and "WHISPER_PORT" in out.stderr


def test_sizes_and_lists_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPER_GPU_MEMORY_LIMIT", "90%")
    monkeypatch.setenv("WHISPER_GPU_HEADROOM", "1GiB")
    monkeypatch.setenv("WHISPER_API_KEYS", "a,b")
    monkeypatch.setenv("WHISPER_DEGRADE_LADDER", "word_timestamps,batch,reject")
    settings = Settings()
    assert settings.gpu_memory_limit is not None
    assert settings.gpu_memory_limit.resolve(1000) == 900
    assert settings.gpu_headroom.resolve(0) == 1 << 30
    assert settings.key_values() == ["a", "b"]
    assert settings.degrade_ladder == ("word_timestamps", "batch", "reject")
    monkeypatch.setenv("WHISPER_DEGRADE_LADDER", "batch,teleport")
    with pytest.raises(ValueError, match="teleport"):
        Settings()


def test_serve_command_starts_and_stops_gracefully(tiny_model: Path, tmp_path: Path) -> None:
    """`python -m server serve` answers, and SIGTERM finishes in-flight work, then exits 0."""
    port = _free_port()
    env = {**os.environ, "WHISPER_MODEL": str(tiny_model), "WHISPER_MODELS_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert requests.get(url + "/ready", timeout=1).json()["device"] == "cpu"
        audio = (ROOT / "tests/data/jfk.flac").read_bytes()
        resp = requests.post(
            url + "/v1/audio/transcriptions",
            files={"file": ("upload", audio)},
            data={"model": "whisper-1", "response_format": "text"},
            timeout=60,
        )
        assert resp.status_code == 200 and "country" in resp.text.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output


def test_transcribe_command(tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "WHISPER_MODEL": str(tiny_model), "WHISPER_MODELS_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "server", "transcribe", "tests/data/jfk.flac", "--format", "srt"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1\n00:00:00,000 --> ") and "country" in out.stdout.lower()


def test_calibrate_writes_profile_and_chart(tiny_model: Path, tmp_path: Path) -> None:
    """Calibration on the CPU (no GPU here): the profile it writes is then preferred."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).symlink_to(f)
    env = {**os.environ, "WHISPER_MODEL": str(folder), "WHISPER_MODELS_DIR": str(tmp_path)}
    cmd = "calibrate --batch 1 2 --beam 1 --no-words"
    out = subprocess.run(
        [sys.executable, "-m", "server", *shlex.split(cmd)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    table = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("|")]
    assert "estimate / measured" in table[0][3]
    ratios = [float(row[3]) for row in table[2:]]
    assert len(ratios) == 2 and all(0.2 < r < 5 for r in ratios)
    profile = json.loads((folder / "memory_profile.json").read_text())
    assert profile["device"] == "cpu" and len(profile["points"]) == 2
    assert all(p["peak_bytes"] > 0 for p in profile["points"])
    png = folder / "memory_profile.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from server.engine.residency import ModelPool
    from server.engine.store import ModelSource

    pool = ModelPool(Settings(model=str(folder), models_dir=tmp_path))
    loaded = pool.get(ModelSource("tiny", folder), "cpu")
    assert loaded.cost.profile is not None


def test_a_model_link_is_served_under_its_own_name(tiny_model: Path, tmp_path: Path) -> None:
    """WHISPER_MODEL pointing at a link serves the link's name (what the operator chose), and
    loads the folder it points to."""
    from server.engine.store import ModelStore

    link = tmp_path / "large-v3-turbo"
    link.symlink_to(tiny_model.resolve(), target_is_directory=True)
    source = ModelStore.from_settings(
        Settings(model=str(link), models_dir=tmp_path / "models")
    ).default_source()
    assert source.id == "large-v3-turbo"
    assert source.path == tiny_model.resolve()
