"""The documentation site against the code: the Getting-started examples run, and the reference
pages list every endpoint, field, error code and metric the server has.

The settings page is checked in ``tests/test_cli.py`` (it is generated from ``Settings``).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import errors
from server.app import create_app
from server.config import Settings
from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE_URL = "http://127.0.0.1:8000"


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def _example(name: str) -> str:
    """The fenced block after ``<!-- getting-started: NAME -->`` on the Getting-started page."""
    match = re.search(
        rf"<!-- getting-started: {name} -->\n```\w+\n(.*?)\n```",
        _page("getting-started/index.md"),
        re.S,
    )
    assert match, f"no '{name}' example on docs/getting-started/index.md"
    return match.group(1)


@pytest.fixture
def speech_folder(tmp_path: Path, data_dir: Path) -> Path:
    """A folder holding the file the examples name (``speech.flac``): JFK's 11 s."""
    shutil.copy(data_dir / "jfk.flac", tmp_path / "speech.flac")
    return tmp_path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_getting_started_curl_example_runs(tiny_server: LiveServer, speech_folder: Path) -> None:
    command = _example("curl")
    assert EXAMPLE_URL in command
    out = subprocess.run(
        ["bash", "-c", command.replace(EXAMPLE_URL, tiny_server.url) + " --fail-with-body -sS"],
        cwd=speech_folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert "fellow Americans" in out.stdout and '"usage"' in out.stdout


def test_getting_started_sdk_example_runs(tiny_server: LiveServer, speech_folder: Path) -> None:
    script = _example("sdk")
    assert EXAMPLE_URL in script
    (speech_folder / "example.py").write_text(script.replace(EXAMPLE_URL, tiny_server.url))
    out = subprocess.run(
        [sys.executable, "example.py"],
        cwd=speech_folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "fellow Americans" in out.stdout


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    # The README shows the same first request as the page that is tested above.
    assert _example("curl") in readme and _example("sdk") in readme
    for target in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", readme):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def _schema() -> dict[str, Any]:
    return create_app(Settings(model="unused")).openapi()


def test_api_page_lists_every_endpoint_and_request_field() -> None:
    page = _page("reference/api.md")
    schema = _schema()
    for path, operations in schema["paths"].items():
        shown = path.replace("{model_id}", "{id}")
        for method, operation in operations.items():
            assert f"`{method.upper()} {shown}" in page, f"{method.upper()} {path} is not listed"
            for content in operation.get("requestBody", {}).get("content", {}).values():
                for field in content["schema"]["properties"]:
                    assert f"`{field}`" in page, f"request field {field} of {path} is not listed"
    for name, model in schema["components"]["schemas"].items():
        for field in model.get("properties", {}):
            assert f"`{field}`" in page, f"{name}.{field} is not listed"
    assert "`GET /v1/realtime" in page


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_api_page_lists_every_response_field(tiny_server: LiveServer, data_dir: Path) -> None:
    page = _page("reference/api.md")
    audio = (data_dir / "jfk.flac").read_bytes()
    asks = [
        {"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]},
        {"response_format": "json", "include[]": "logprobs"},
    ]
    seen: set[str] = set()
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        for ask in asks:
            response = client.post(
                "/v1/audio/transcriptions",
                files={"file": ("jfk.flac", audio)},
                data={"model": "whisper-1", **ask},
            )
            assert response.status_code == 200, response.text
            seen |= _keys(response.json())
        for path in ("/ready", "/v1/models", "/v1/memory"):
            body = client.get(path).json()
            # a reservation's and the policy's inner keys are described, not listed one by one
            for key in ("reservations", "policy", "degradations"):
                if isinstance(body, dict):
                    body.pop(key, None)
            seen |= _keys(body if path != "/v1/memory" else {**body, "recent_decisions": []})
            if path == "/v1/memory":
                seen |= _keys(client.get(path).json()["recent_decisions"][-1:])
                seen |= {"reservations", "policy"}
    missing = sorted(key for key in seen if f"`{key}`" not in page)
    assert not missing, f"response fields not on docs/reference/api.md: {missing}"


def _codes_in_source() -> set[str]:
    """Every error ``code`` the server can send: the classes' own and those given at a raise."""
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.APIError) and cls.code
    }
    for path in (ROOT / "server").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "code":
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    codes.add(node.value.value)
            # server/audio/decode.py builds its errors with _error("code", message)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "_error"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                codes.add(str(node.args[0].value))
    return codes


def test_errors_page_lists_every_code() -> None:
    page = _page("reference/errors.md")
    codes = _codes_in_source()
    assert {"insufficient_memory", "truncated_audio", "queue_full"} <= codes
    missing = sorted(code for code in codes if f"| `{code}` |" not in page)
    assert not missing, f"error codes not on docs/reference/errors.md: {missing}"


def test_metrics_page_lists_every_metric(tiny_server: LiveServer) -> None:
    page = _page("reference/metrics.md")
    text = httpx.get(f"{tiny_server.url}/metrics", timeout=30).text
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    names = [name for name in helps if not name.endswith("_created")]
    assert len(names) >= 20
    for name in names:
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")), "")
        assert row, f"{name} is not on docs/reference/metrics.md"
        assert f"| {types[name]} |" in row, f"{name}: its type is {types[name]}"
        assert helps[name] in row, f"{name}: its description is {helps[name]!r}"


def test_benchmark_plots_come_from_committed_data(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import plots  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "bench"))
    plots.main(["--out", str(tmp_path)])
    drawn = {p.name for p in tmp_path.iterdir()}
    committed = {p.name for p in (DOCS / "img").glob("*.svg")}
    assert drawn == committed and len(drawn) >= 3
    pages = "".join(p.read_text() for p in (DOCS / "benchmarks").glob("*.md"))
    for name in drawn:
        assert f"../img/{name}" in pages, f"{name} is not shown on a benchmarks page"
