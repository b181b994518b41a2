"""`clipray serve CONFIG [key=value ...]` (also `python -m serve ...`): run the retrieval API.

Connects to RAY_ADDRESS (or `ray.address`) when set, else starts an embedded local Ray; starts
Serve's HTTP proxy on `serve.host:serve.port` (default 127.0.0.1:8000), deploys the app from
`serve.app:build_app`, prints the URL and blocks until Ctrl-C (or SIGTERM), then deletes the app.
Interrupted while starting, it deletes the app it was deploying and exits with status 130.

    clipray serve serve/configs/demo.yaml out=runs/index
    clipray serve serve/configs/demo.yaml out=runs/index serve.port=8001 serve.text_encoder.max_replicas=4

`start(cfg)` / `stop(cfg)` are the same steps for tests, the demo and the benchmark.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import socket
import sys
import time
import urllib.request
from typing import Callable

from clipray.config import ConfigError
from serve.config import DEPLOYMENTS, AppConfig, load_app_config


def http_url(host: str, port: int) -> str:
    """The URL of a server listening on host:port; an IPv6 address in brackets (RFC 3986): as
    http://::1:8000 no browser or HTTP client opened the printed address."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# this command's own server: never through an HTTP proxy from the environment. urllib sends
# every request to $http_proxy unless $no_proxy names the host, and a proxy cannot reach this
# machine's loopback: `clipray serve` (and the demo's queries) waited 120 s on a healthy app, then
# said it 'did not answer'
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def url_of(cfg: AppConfig) -> str:
    return http_url(cfg.serve.host, cfg.serve.port)


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict:
    """Poll GET /healthz until the app answers (replicas load models after serve.run returns)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with DIRECT.open(f"{url}/healthz", timeout=10) as r:
                return json.loads(r.read())
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
            time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f}s: {last}")


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (binding as uvicorn does)."""
    return listen_problem(host, port) is None


def listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now (binding as uvicorn does), or None. A
    host that is no address of this machine, or no name at all, was said as the port "taken by
    another process"."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except socket.gaierror as e:
            return f"serve.host {host} is no name or address this machine resolves ({e.strerror})"
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"serve.port {port} on {host} is taken by another process (an earlier clipray serve?): "
                        f"stop it or pick another, e.g. serve.port={port + 1}")
            return (f"serve.host {host}, serve.port {port}: cannot listen there ({e.strerror}); give an address "
                    "of this machine (0.0.0.0: all of them, 127.0.0.1: this machine only)")


def start(cfg: AppConfig, quiet_ray: bool = True, route_prefix: str = "/",
          on_ray_started: Callable[[], None] | None = None) -> str:
    """Ray (existing or embedded) -> Serve on the configured host/port -> the app at
    `route_prefix`; its URL. `on_ray_started` runs as soon as Ray is up (starting Ray replaces
    the process's SIGTERM handler: `main` puts its own back there)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from clipray.runtime import init_ray, is_embedded
    from serve.app import app_from_config

    app = app_from_config(cfg)  # config errors (no index at out=, ...) surface before Ray starts
    init_ray(cfg.ray, quiet=quiet_ray)
    if on_ray_started is not None:
        on_ray_started()
    # on this machine, a taken port would otherwise surface as a traceback from Serve's proxy
    problem = listen_problem(cfg.serve.host, cfg.serve.port) if is_embedded() and _live_http() is None else None
    if problem:
        raise ConfigError(problem)
    check_resources(cfg)
    logs = {"log_level": cfg.serve.log_level}
    logging.getLogger("ray.serve").setLevel(cfg.serve.log_level)  # this process's Serve lines
    # the port is fixed when Serve's proxy starts: before serve.run, which would start it on 8000
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=logs)
    try:
        serve.run(app, name=cfg.serve.app_name, route_prefix=route_prefix, logging_config=logs)
    except RayServeException as e:  # refused before deploying: another app serves this route
        raise ConfigError(f"the app did not start: {getattr(e, 'cause', None) or e} (stop that app, or give "
                          "serve.app_name its name to replace it)") from None
    except RuntimeError as e:  # "Deploying application X failed": a replica's constructor raised
        why = deploy_failure(cfg.serve.app_name) or str(e)
        serve.delete(cfg.serve.app_name)  # on a cluster, leave no failed app behind
        raise ConfigError(f"the app did not start: {why}") from None
    url = url_of(cfg)
    live = _live_http()
    if live and live[1] != cfg.serve.port:
        # Serve was already running on this Ray: its proxy keeps the address it started with
        url = http_url(*live)
        print(f"note: Serve was already running on this Ray; the app is at {url}, not "
              f"{url_of(cfg)}", flush=True)
    url += route_prefix.rstrip("/")
    try:
        wait_healthy(url)
    except TimeoutError:
        stop(cfg)  # no app left deployed that never answered (on a cluster it would stay)
        raise
    return url


def check_resources(cfg: AppConfig) -> None:
    """On the embedded Ray, which never grows, replicas asking for more GPUs or CPUs than it has
    would leave serve.run waiting for them forever (`serve.text_encoder.num_cpus=8` on a laptop
    hung there, with no word): say so instead. On a cluster this checks nothing."""
    from clipray.runtime import check_fits
    from serve import store

    rerank = bool((store.read_meta(cfg.out) or {}).get("rerank"))  # else no reranker replica
    asks: dict[str, dict[str, float]] = {"GPU": {}, "CPU": {}}
    for n in DEPLOYMENTS:
        if n == "reranker" and not rerank:
            continue
        d = getattr(cfg.serve, n)
        count = max(1, d.min_replicas if d.initial_replicas is None else d.initial_replicas)
        for what, each in (("GPU", d.num_gpus), ("CPU", d.num_cpus)):
            if each > 0:
                asks[what][f"serve.{n}: {count} replica(s) x num_{what.lower()}s"] = count * each
    if asks["GPU"]:
        check_fits(asks["GPU"], "GPU", advice="set their num_gpus to 0 or give RAY_ADDRESS of a cluster with GPUs")
    check_fits(asks["CPU"], advice="lower their replicas or num_cpus, or raise ray.num_cpus", read_tasks=False)


def deploy_failure(app_name: str) -> str:
    """The last line of the error of the first deployment that failed to start (its replica's
    exception, e.g. an unreadable index file), or "" when Serve says none."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - only a better message is lost
        return ""
    for name, d in (app.deployments.items() if app else ()):
        lines = [line.strip() for line in (d.message or "").splitlines() if line.strip()]
        if d.status.value in ("DEPLOY_FAILED", "UNHEALTHY") and lines:
            return f"deployment {name} failed to start: {lines[-1]}"
    return ""


def _live_http() -> tuple[str, int] | None:
    """(host, port) of the running Serve proxy, from the controller."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return ("127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host), int(http.port)
    except Exception:  # noqa: BLE001 - private API: fall back to the configured address
        return None


def stop(cfg: AppConfig) -> None:
    """Delete the app (also one still deploying); nothing to do before Ray and Serve are up."""
    import ray
    from ray import serve

    if not ray.is_initialized() or _live_http() is None:
        return  # serve.delete would start Ray, or raise that Serve is not running
    serve.delete(cfg.serve.app_name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config, e.g. serve/configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. out=runs/index serve.port=8001")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_app_config(args.config, args.overrides)
    # index.* is `clipray index`'s (the faiss index is built, and its recall measured, with
    # them): the served index reads its own from index.json, and `index.nprobe=64` here was
    # taken without a word and changed nothing
    given = sorted({o.split("=", 1)[0] for o in args.overrides if o.startswith("index.")})
    if given:
        raise ConfigError(f"{', '.join(given)}: `clipray index` settings, which the served index keeps as it was "
                          f"built with them ({cfg.out}/index.json): run `clipray index` again with the same out= "
                          "and the new value (it rebuilds the faiss index from the stored vectors, embedding "
                          "nothing again), then serve it")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def stop_on_signals() -> None:
        # SIGTERM (docker stop, a supervisor) stops like Ctrl-C; SIGINT explicitly, since a
        # shell that starts us in the background leaves it ignored
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)

    stop_on_signals()
    try:
        # again once Ray is up: starting it put Ray's own SIGTERM handler in, which would end
        # the process with a traceback or an abort and leave a half-deployed app on a cluster
        url = start(cfg, quiet_ray=False, on_ray_started=stop_on_signals)
    except KeyboardInterrupt:
        print("interrupted while starting: stopping ...", flush=True)
        stop(cfg)
        print("stopped", flush=True)
        return 130
    print(f"clipray serving {cfg.out} at {url}  (search page {url}/, API docs {url}/docs); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        stop(cfg)
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    # through the `clipray` entry point, as `python -m train`: a bad config or a missing index
    # is one line and exit status 2 (`ray job submit ... python -m serve` shows the same)
    from clipray.cli import main as cli

    raise SystemExit(cli(["serve", *sys.argv[1:]]))
