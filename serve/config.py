"""Typed configuration of `clipray index` and `clipray serve` (one YAML drives both).

The root schema `AppConfig` is merged with YAML and `key=value` overrides by
`clipray.config.load_config`, like every other clipray command:

    checkpoint   the exported model (`<run>/export/`): `clipray index` embeds with it; the served
                 app defaults to the one the index was built with (recorded in the index)
    manifest     the clip manifest to index
    out          the index directory: written by `clipray index`, read by `clipray serve`
    video        how `clipray index` decodes clips; the served app decodes uploaded query clips
                 as the index recorded (of this section, only `video.timeout_s` applies there)
    index.*      `IndexConfig`: split, sliding windows, faiss index kind, the Ray Data actor pool
    serve.*      `ServeConfig`: HTTP address, request limits, one `DeploymentConfig` per
                 deployment (replicas, autoscaling, batch size, CPUs/GPUs)
    ray.*        `clipray.config.RayConfig`: an address, else an embedded local Ray

`resolve` checks cross-field rules at start-up, in particular `max_ongoing_requests`: Serve
never hands a replica more requests than that, so a value below `max_batch_size` silently caps
every batch (the default of 5 did exactly that); 0 means "twice the batch size".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from clipray.config import (GPUS_PER_ACTOR, RULES, ConfigError, RayConfig, VideoConfig, at_least, load_config, one_of,
                            SOURCE_ROOT, positive, resource)

INDEX_KINDS = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw")
SPLITS = ("all", "train", "val", "test")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEPLOYMENTS = ("ingress", "text_encoder", "video_encoder", "searcher", "reranker")  # serve.<name> sections
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


@dataclass
class IndexConfig:
    split: str = "all"  # all | train | val | test
    kind: str = "flat"  # flat (exact inner product) | ivf_flat | ivf_sq8 | ivf_pq | hnsw
    nlist: int = 0  # IVF lists; 0 = about 4 * sqrt(N)
    nprobe: int = 16  # IVF lists visited per query
    pq_m: int = 0  # PQ sub-quantizers; 0 = dim / 4
    refine: int = 4  # ivf_pq: re-score refine * k candidates exactly (0 = off)
    hnsw_m: int = 32
    ef_search: int = 128
    window_s: float = 0.0  # > 0: whole-video rows become sliding windows of this length
    stride_s: float = 0.0  # window step; 0 = window_s / 2
    actors: int = 1  # embedding actors (each loads the export once)
    actor_cpus: float = 1.0
    actor_gpus: float = -1.0  # -1: one GPU per actor when the cluster has GPUs, else 0
    batch: int = 8  # clips per map_batches call
    recall_queries: int = 256  # caption queries used to measure approximate recall@10
    rerank_checkpoint: str = ""  # a tightTransf export: its frame features are stored too


@dataclass
class DeploymentConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: Optional[int] = None
    target_ongoing_requests: float = 8.0  # autoscaling target per replica
    max_ongoing_requests: int = 0  # 0 = 2 x max_batch_size; never below max_batch_size
    max_batch_size: int = 16  # @serve.batch; 1 = no batching
    batch_wait_timeout_s: float = 0.005
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    look_back_period_s: Optional[float] = None  # None: Serve's default window
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # the replicas' environment (e.g. OMP_NUM_THREADS); Ray 2.60 reads no handle-metric push
    # interval from it: handles push every autoscaling `metrics_interval_s` (10 s)
    env_vars: dict[str, str] = field(default_factory=dict)


@dataclass
class LimitsConfig:
    max_text_chars: int = 300  # longer queries are refused (422) with the limit named
    max_k: int = 100
    max_upload_mb: float = 16.0
    rerank_candidates: int = 50  # loose-index candidates re-scored by the tight re-ranker


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "clipray"
    max_words: int = 32  # caption tokens fed to the text encoder
    # Serve's own logs (controller, proxy, every replica) under `clipray serve`: INFO has a line
    # per request and per replica change, WARNING only problems (the demo's choice). Under
    # `serve run` or a RayService, Serve's own `logging_config` decides.
    log_level: str = "INFO"
    ingress: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(
        max_batch_size=1, max_ongoing_requests=64, target_ongoing_requests=32, num_cpus=0.25))
    text_encoder: DeploymentConfig = field(default_factory=DeploymentConfig)
    video_encoder: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(max_batch_size=4))
    # a 1M-vector exact search takes ~170 ms: waiting up to 30 ms for more queries fills batches
    searcher: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(
        max_batch_size=32, batch_wait_timeout_s=0.03))
    reranker: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(max_batch_size=4))
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class AppConfig:
    checkpoint: str = ""  # export dir; serve: "" = the export recorded in the index
    manifest: str = ""  # clip manifest (Parquet file, directory of shards, or URI)
    out: str = ""  # index directory
    video: VideoConfig = field(default_factory=lambda: VideoConfig(fps=2.0, max_frames=8, timeout_s=30.0))
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Each value's bounds, checked by load_config (`clipray.config.RULES`) so that a mistake names
# its key and the file or override that set it. Every ruled float must also be finite: nan
# passed every `<` test (num_cpus, target_ongoing_requests: a pydantic traceback from Serve;
# index.window_s: an IndexError planning the windows), and max_upload_mb=inf or nan made every
# Ingress replica fail to start (int() of it) once Ray and Serve were up.
RULES[IndexConfig] = dict(
    split=one_of(*SPLITS), kind=one_of(*INDEX_KINDS), window_s=at_least(0), stride_s=at_least(0),
    actors=at_least(1), actor_cpus=resource(), actor_gpus=GPUS_PER_ACTOR, batch=at_least(1),
    recall_queries=at_least(0))
# (the faiss knobs, nlist ... ef_search, are store.check_knobs's: build_faiss checks them too)
RULES[DeploymentConfig] = dict(
    min_replicas=at_least(0), max_batch_size=at_least(1), num_cpus=resource(), num_gpus=resource(),
    target_ongoing_requests=positive(), look_back_period_s=positive(), upscale_delay_s=at_least(0),
    downscale_delay_s=at_least(0), batch_wait_timeout_s=at_least(0))
RULES[LimitsConfig] = dict(max_text_chars=at_least(1), max_k=at_least(1), max_upload_mb=positive(),
                           rerank_candidates=at_least(0))
RULES[ServeConfig] = dict(port=((lambda v: 0 < v < 65536), "a port, 1..65535"),
                          # empty listened on every address and printed http://:8000, which the
                          # health check then polled for 120 s before a traceback
                          host=((lambda v: bool(v.strip())), "an address of this machine (0.0.0.0: all of "
                                "them, 127.0.0.1: this machine only)"),
                          # Serve refuses an empty one, once Ray and Serve are up
                          app_name=((lambda v: bool(v.strip())), "a name"),
                          # the start and end-of-text tokens and a word: at 2 every query was those two
                          # tokens, the same vector whatever its text
                          max_words=at_least(3),
                          log_level=one_of(*LOG_LEVELS))


def _check_deployment(name: str, d: DeploymentConfig) -> DeploymentConfig:
    # the single values (RULES) were checked at load, naming the file; here what ties them
    if d.max_replicas < max(1, d.min_replicas):
        raise ConfigError(f"serve.{name}: need 0 <= min_replicas <= max_replicas >= 1, "
                          f"got {d.min_replicas}..{d.max_replicas}")
    mor = d.max_ongoing_requests or 2 * d.max_batch_size
    if mor < d.max_batch_size:
        raise ConfigError(f"serve.{name}.max_ongoing_requests={mor} < max_batch_size={d.max_batch_size}: "
                          "Serve would never fill a batch (raise it, or 0 for 2 x batch)")
    # what Serve's own schema refuses (with a pydantic traceback from .options()), named by key here
    if d.initial_replicas is not None and not d.min_replicas <= d.initial_replicas <= d.max_replicas:
        raise ConfigError(f"serve.{name}.initial_replicas={d.initial_replicas} must lie in "
                          f"min_replicas..max_replicas = {d.min_replicas}..{d.max_replicas}")
    # a mapping of texts, which OmegaConf does not hold its values to: `env_vars.A.B=1` gave the
    # replicas A="{'B': 1}", and a list its repr
    nested = sorted(k for k, v in d.env_vars.items() if isinstance(v, (dict, list)))
    if nested:
        raise ConfigError(f"serve.{name}.env_vars.{nested[0]}: an environment variable's value is text, "
                          f"got {d.env_vars[nested[0]]!r}")
    return dataclasses.replace(d, max_ongoing_requests=mor)


def resolve(cfg: AppConfig) -> AppConfig:
    """Cross-field checks and derived defaults; raises ConfigError naming the key."""
    ix, sv = cfg.index, cfg.serve
    if ix.stride_s and not ix.window_s:
        raise ConfigError("index.window_s/stride_s: give a positive window (stride defaults to half)")
    if ix.window_s and not ix.stride_s:
        ix = dataclasses.replace(ix, stride_s=ix.window_s / 2)
    if ix.stride_s > ix.window_s:  # windows of 4 s every 100 s: 22 s of a 30 s video never indexed
        raise ConfigError(f"index.stride_s={ix.stride_s:g} is longer than index.window_s={ix.window_s:g}: the "
                          "time between windows would never be indexed (a stride at most the window covers "
                          "each video)")
    deps = {n: _check_deployment(n, getattr(sv, n)) for n in DEPLOYMENTS}
    # a path under the home folder (`out: ~/index` in a YAML file, or an override the shell
    # does not expand) is the user's, as clipray train takes its paths, not a folder named '~'
    # in the working directory
    home = os.path.expanduser
    ix = dataclasses.replace(ix, rerank_checkpoint=home(ix.rerank_checkpoint))
    return dataclasses.replace(cfg, checkpoint=home(cfg.checkpoint), manifest=home(cfg.manifest), out=home(cfg.out),
                               index=ix, serve=dataclasses.replace(sv, **deps))


def find_config(path: str | Path) -> Path:
    """A config path as given, else relative to the source root (where `serve/` lives): a Serve
    app built on a cluster runs in a worker whose working directory is not the checkout."""
    if "://" in str(path):  # a URI: load_config says config files are local
        return path  # type: ignore[return-value]
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    root = SOURCE_ROOT / p
    return root if root.is_file() else p


def load_app_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> AppConfig:
    """Defaults <- YAML (default: serve/configs/demo.yaml) <- key=value overrides, resolved."""
    return resolve(load_config(find_config(path or DEFAULT_CONFIG), overrides, schema=AppConfig))


def deployment_options(d: DeploymentConfig) -> dict:
    """Ray Serve `.options(...)` for one deployment: autoscaling, request cap, resources."""
    autoscaling = {
        "min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
        "target_ongoing_requests": d.target_ongoing_requests,
        "upscale_delay_s": d.upscale_delay_s, "downscale_delay_s": d.downscale_delay_s,
    }
    if d.look_back_period_s is not None:
        autoscaling["look_back_period_s"] = d.look_back_period_s
    if d.initial_replicas is not None:
        autoscaling["initial_replicas"] = d.initial_replicas
    actor: dict = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
    if d.env_vars:
        actor["runtime_env"] = {"env_vars": {str(k): str(v) for k, v in d.env_vars.items()}}
    opts: dict = {"max_ongoing_requests": d.max_ongoing_requests, "ray_actor_options": actor}
    if d.min_replicas == d.max_replicas:
        opts["num_replicas"] = d.max_replicas  # fixed size: no autoscaler at all
    else:
        opts["autoscaling_config"] = autoscaling
    return opts
