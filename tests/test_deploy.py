"""The deployment files under deploy/: the KubeRay RayService manifest against the RayService
CRD's schema (vendored from KubeRay in deploy/crd/), and both Serve configs against Ray Serve's
own schema and our application builder."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from server.config import Settings
from server.scaleout.deploy import ScaleOut, app_builder

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _strict(schema: Any) -> Any:
    """The CRD's schema as the API server applies it with strict field validation: a field
    the schema does not name is an error (plain JSON Schema would let a typo through)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    with gzip.open(DEPLOY / "crd" / "ray.io_rayservices.yaml.gz", "rt") as fh:
        crd = yaml.safe_load(fh)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())


def _errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_rayservice_matches_the_crd(
    rayservice_schema: dict[str, Any], manifest: dict[str, Any]
) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert _errors(rayservice_schema, manifest) == []


def test_the_crd_check_catches_mistakes(
    rayservice_schema: dict[str, Any], manifest: dict[str, Any]
) -> None:
    typo = copy.deepcopy(manifest)
    group = typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["replica"] = group.pop("replicas")
    assert any("replica" in e for e in _errors(rayservice_schema, typo))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert _errors(rayservice_schema, wrong_type)


def test_rayservice_asks_for_gpus_models_and_probes(manifest: dict[str, Any]) -> None:
    (worker,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/models"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert "readinessProbe" in container and "livenessProbe" in container
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "readinessProbe" in head["containers"][0]


def _serve_configs(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "serve_config.yaml": yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()),
        "kuberay serveConfigV2": yaml.safe_load(manifest["spec"]["serveConfigV2"]),
    }


def test_serve_configs_are_valid_and_build(manifest: dict[str, Any]) -> None:
    for where, config in _serve_configs(manifest).items():
        ServeDeploySchema.model_validate(config)  # Serve's own schema (serve deploy's check)
        (app,) = config["applications"]
        assert app["import_path"] == "server.scaleout.deploy:app_builder", where
        args = app["args"]
        Settings(**args["settings"])  # every override names a real setting
        built = app_builder(args)  # the builder takes the args as they are
        assert built is not None, where


def test_both_configs_deploy_the_same_application(manifest: dict[str, Any]) -> None:
    configs = _serve_configs(manifest)
    args = [c["applications"][0]["args"] for c in configs.values()]
    assert args[0] == args[1]


def test_scaleout_rejects_unknown_args() -> None:
    with pytest.raises(TypeError):
        app_builder({"replica": 2})
    assert ScaleOut().device == "auto"


def test_ray_command_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from server.__main__ import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as exited:
        main(["ray", "--replicas", "2"])
    assert "pip install" in str(exited.value.code)
    assert "[ray]" in str(exited.value.code)
