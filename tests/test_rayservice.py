"""cluster/rayservice.yaml carries the same Serve app as `clipray serve`, and it can start.

Checks with the real parsers: the manifest is a KubeRay RayService; its serveConfigV2 passes
Ray Serve's own deploy schema (what KubeRay hands to Serve); every application's import path is
a module file with a builder that takes one pydantic-typed argument; the config file named in
`args` exists and, with the other args as overrides, loads against the typed schema; the
deployments' resources fit the worker groups, and the Serve port is exposed.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "cluster" / "rayservice.yaml"


@pytest.fixture(scope="module")
def service() -> dict:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(scope="module")
def serve_config(service) -> dict:
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(cfg)  # raises on a key Serve would reject
    return cfg


def test_it_is_a_rayservice_with_token_auth(service):
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_import_path_exists_and_is_the_typed_builder(serve_config):
    apps = serve_config["applications"]
    assert [a["import_path"] for a in apps] == ["serve.app:build_app"]
    for app in apps:
        module, fn = app["import_path"].split(":")
        assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file()
        builder = getattr(importlib.import_module(module), fn)
        (param,) = inspect.signature(builder).parameters.values()
        assert isinstance(param.annotation, type), "Serve validates builder args only for a class annotation"
        param.annotation.model_validate(app["args"])


def test_referenced_config_loads_against_the_schema(serve_config):
    from serve.config import load_app_config

    for app in serve_config["applications"]:
        args = dict(app["args"])
        config = args.pop("config")
        assert (REPO / config).is_file(), config
        overrides = [f"{k}={v}" for k, v in args.items() if k != "overrides"] + list(args.get("overrides", []))
        cfg = load_app_config(REPO / config, overrides)
        assert cfg.out == "/data/index"
        for name in ("text_encoder", "video_encoder", "searcher", "ingress"):
            d = getattr(cfg.serve, name)
            assert d.max_ongoing_requests >= d.max_batch_size, name  # else batches are capped


def test_deployments_fit_the_worker_groups_and_port_is_exposed(service, serve_config):
    from serve.config import load_app_config

    cluster = service["spec"]["rayClusterConfig"]
    groups = cluster["workerGroupSpecs"]
    max_gpu = max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                  for g in groups)
    max_cpu = max(float(g["rayStartParams"]["num-cpus"]) for g in groups)
    app = serve_config["applications"][0]
    cfg = load_app_config(REPO / app["args"]["config"])
    for name in ("text_encoder", "video_encoder", "searcher", "ingress"):
        d = getattr(cfg.serve, name)
        assert d.num_gpus <= max_gpu and d.num_cpus <= max_cpu, f"{name} fits no worker pod"
    assert serve_config["http_options"]["port"] == 8000
    for g in [cluster["headGroupSpec"], *groups]:
        ports = {p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
        assert 8000 in ports
