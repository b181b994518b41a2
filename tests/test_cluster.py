"""cluster/: every manifest parses, has the structure we rely on, and names things that exist.

Checks, with real parsers wherever one exists:
- every YAML in cluster/ (multi-document files too) is a known kind: a KubeRay object
  (apiVersion ray.io/v1), a cluster-launcher config, or the job runtime env;
- KubeRay clusters (RayCluster, and the cluster inside a RayJob / RayService) keep Ray token
  authentication on, run the image built from cluster/Dockerfile at the project's version, and
  the training ones have a GPU group plus a CPU-only decode group that takes the decode actors;
- every entry point a manifest names exists: `python -m train CONFIG k=v ...` -> train/__main__.py,
  the config file, and the overrides load against the typed schema (a typo fails here, not on
  the cluster); Serve import paths -> their module file;
- the launcher YAMLs pass Ray's own validator (`ray up` runs the same one) and mount the token;
- the runtime env is what `ray job submit --runtime-env` parses, and Ray's own packager leaves
  out runs/, clipray_data/ and .git;
- the Dockerfile's pins satisfy pyproject.toml and its Ray is the manifests' Ray;
- cluster/submit.sh passes `bash -n` and enforces token auth, picks run names and storage.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
TRAINING_KINDS = {"RayCluster", "RayJob"}  # the serving cluster (RayService) is shaped differently


# ---------------------------------------------------------------- helpers

def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements() -> dict[str, Any]:
    """name -> packaging Requirement for every dependency and extra in pyproject.toml."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    proj = pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values() for r in extra]
    out: dict[str, Any] = {}
    for r in map(Requirement, reqs):
        out.setdefault(canonicalize_name(r.name), r)
    return out


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> Iterator[tuple[str, dict]]:
    for p in yaml_files():
        for i, d in enumerate(docs(p)):
            yield f"{p.name}#{i}", d


def ray_docs(kinds: set[str] = RAY_KINDS) -> list[tuple[str, dict]]:
    return [(n, d) for n, d in all_docs() if d.get("kind") in kinds]


def launcher_docs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in all_docs() if "provider" in d and "available_node_types" in d]


def cluster_spec(doc: dict) -> dict | None:
    """The Ray cluster a KubeRay object creates (None: a RayJob using an existing cluster)."""
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec.get("rayClusterSpec"),
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    return max(int(res.get(k, {}).get("nvidia.com/gpu", 0)) for k in ("limits", "requests"))


def cpus(container: dict) -> float:
    v = str(container["resources"]["limits"]["cpu"])
    return float(v[:-1]) / 1000 if v.endswith("m") else float(v)


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def base_ray_version() -> str:
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)\s*$", dockerfile(), re.M)
    assert m, "cluster/Dockerfile must start FROM a rayproject/ray:<version>-py3XX-gpu image"
    return m.group(1)


def image() -> str:
    """The image every manifest runs: cluster/Dockerfile's build, tagged with the project version."""
    return f"ghcr.io/change-me/clipray:{pyproject()['project']['version']}"


def recipe_cpus_per_worker() -> float:
    """train.cpus_per_worker of the paper recipe the cluster configs are sized for."""
    from clipray.config import load_config

    return load_config(REPO / "train/configs/clip4clip_vitb32.yaml").train.cpus_per_worker


def train_commands(entrypoint: str) -> list[list[str]]:
    """Each `python -m train ...` command in a shell entrypoint, as argv lists."""
    out = []
    for part in re.split(r"&&|;|\|\|", entrypoint):
        argv = shlex.split(part)
        if argv[:3] == ["python", "-m", "train"]:
            out.append(argv)
    return out


# ---------------------------------------------------------------- every YAML

@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_every_yaml_is_a_known_kind(path):
    found = docs(path)
    assert found, f"{path.name} is empty"
    for d in found:
        if "kind" in d:
            if d["kind"] in RAY_KINDS:
                assert d["apiVersion"] == "ray.io/v1", path.name
            else:  # plain Kubernetes objects beside them (Secret, ServiceAccount, ...)
                assert d["apiVersion"] in ("v1", "rbac.authorization.k8s.io/v1"), path.name
            assert d["metadata"]["name"]
        elif "provider" in d:
            assert d["provider"]["type"] in ("aws", "gcp", "azure", "kuberay", "local"), path.name
        else:
            assert path.name == "runtime_env.yaml", f"{path.name}: unrecognised YAML (no kind, no provider)"


def test_the_expected_manifests_exist():
    names = {p.name for p in yaml_files()}
    assert {"raycluster.yaml", "rayjob-train.yaml", "rayjob-howto100m.yaml", "aws-gpu.yaml", "gcp-gpu.yaml",
            "runtime_env.yaml"} <= names
    kinds = {n.split("#")[0]: d["kind"] for n, d in ray_docs()}
    assert kinds["raycluster.yaml"] == "RayCluster"
    assert kinds["rayjob-train.yaml"] == kinds["rayjob-howto100m.yaml"] == "RayJob"
    assert {d["provider"]["type"] for _, d in launcher_docs()} >= {"aws", "gcp"}


# ---------------------------------------------------------------- KubeRay

@pytest.mark.parametrize("name,doc", ray_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_kuberay_clusters_keep_token_auth_and_pinned_image(name, doc):
    spec = cluster_spec(doc)
    if spec is None:
        assert doc["spec"].get("clusterSelector"), f"{name}: RayJob without a cluster"
        return
    auth = spec.get("authOptions", {})
    if auth:  # KubeRay >= 1.5.1: the operator makes the token Secret and sets the env vars
        assert auth.get("mode", "token") == "token" and not auth.get("enableK8sTokenAuth"), name
    else:  # the manual form: RAY_AUTH_MODE=token and the token from a Secret in every container
        for g, group in groups(spec):
            for c in containers(group):
                env = {e["name"]: e for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}/{g}: token auth off"
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token", f"{name}/{g}"
    assert spec["rayVersion"] == base_ray_version(), f"{name}: rayVersion != the image's Ray"
    for g, group in groups(spec):
        assert containers(group)[0]["image"] == image(), f"{name}/{g}: not the cluster/Dockerfile image"


@pytest.mark.parametrize("name,doc", ray_docs(TRAINING_KINDS), ids=lambda x: x if isinstance(x, str) else "")
def test_training_clusters_have_gpu_and_cpu_decode_groups(name, doc):
    spec = cluster_spec(doc)
    if spec is None:
        return
    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{name}: actors must not land on the head"
    workers = dict(groups(spec)[1:])
    gpu = {g: w for g, w in workers.items() if any(gpus(c) for c in containers(w))}
    cpu = {g: w for g, w in workers.items() if not any(gpus(c) for c in containers(w))}
    assert gpu and cpu, f"{name}: needs a GPU worker group and a CPU-only decode group, got {sorted(workers)}"
    for g, w in gpu.items():
        # GPU pods advertise only the CPUs their train workers take (one worker per GPU), so
        # the decode actors go to the CPU group; the pod itself has more for the Ray processes
        advertised = float(w["rayStartParams"]["num-cpus"])
        c = containers(w)[0]
        assert advertised < cpus(c), f"{name}/{g}"
        if doc["kind"] == "RayCluster":
            assert advertised == gpus(c) * recipe_cpus_per_worker(), f"{name}/{g}"
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    for g, w in cpu.items():
        assert "num-gpus" not in w["rayStartParams"] and cpus(containers(w)[0]) >= 8, f"{name}/{g}"
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]


@pytest.mark.parametrize("name,doc", ray_docs({"RayJob"}), ids=lambda x: x if isinstance(x, str) else "")
def test_rayjob_entrypoints_exist_and_their_overrides_load(name, doc):
    from clipray.config import load_config

    entry = doc["spec"]["entrypoint"]
    cmds = train_commands(entry)
    assert len(cmds) == 1, f"{name}: expected one `python -m train CONFIG ...` in {entry!r}"
    assert (REPO / "train" / "__main__.py").is_file()
    config, overrides = cmds[0][3], cmds[0][4:]
    assert (REPO / config).is_file(), f"{name}: config {config} is not in the repository"
    # the image's checkout is where the entrypoint runs from
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile(), re.M).group(1)
    assert entry.startswith(f"cd {workdir} &&"), f"{name}: run from the image's checkout {workdir}"
    cfg = load_config(REPO / config, overrides)  # unknown keys / wrong types raise ConfigError
    # a multi-node job must checkpoint to shared storage, under a fixed name so re-applying resumes
    assert "train.run_name" in entry and cfg.train.storage_path.startswith(("s3://", "gs://")), name
    assert cfg.train.use_gpu and cfg.train.num_workers >= 8
    gpu_groups = [w for _, w in groups(cluster_spec(doc))[1:] if gpus(containers(w)[0])]
    gpus_total = sum(gpus(containers(w)[0]) * w["replicas"] for w in gpu_groups)
    assert cfg.train.num_workers == gpus_total, f"{name}: one train worker per GPU"
    for w in gpu_groups:  # else the train workers cannot all be placed and the job waits forever
        need = gpus(containers(w)[0]) * cfg.train.cpus_per_worker
        assert float(w["rayStartParams"]["num-cpus"]) >= need, f"{name}: GPU pods advertise < {need} CPUs"
    if name.startswith("rayjob-howto100m"):
        assert config == "train/configs/howto100m.yaml"
    if name.startswith("rayjob-train"):
        assert config.startswith("train/configs/") and config != "train/configs/demo.yaml"


@pytest.mark.parametrize("name,doc", ray_docs({"RayJob"}), ids=lambda x: x if isinstance(x, str) else "")
def test_rayjob_decoders_fit_its_cpu_groups(name, doc):
    """The decoders the run holds at once, counted as train.driver counts them: one pool of
    data.decode_actors, or with data.shard_stream one pool per train worker (each streams its
    own shards through its own clip_dataset), plus a CPU for Ray Data's read tasks, fit the
    CPU-only groups at the replicas the job starts with (the manifests size them so)."""
    from clipray.config import load_config

    cmd = train_commands(doc["spec"]["entrypoint"])[0]
    cfg = load_config(REPO / cmd[3], cmd[4:])
    pools = cfg.train.num_workers if cfg.data.shard_stream else 1
    need = pools * cfg.data.decode_actors * cfg.data.decode_cpus + 1
    have = sum(cpus(containers(w)[0]) * w["replicas"] for _, w in groups(cluster_spec(doc))[1:]
               if not gpus(containers(w)[0]))
    assert need <= have, (f"{name}: {pools} decode pool(s) x data.decode_actors={cfg.data.decode_actors} x "
                          f"{cfg.data.decode_cpus:g} CPU + 1 = {need:g} CPUs, the decode groups have {have:g}")


@pytest.mark.parametrize("name,doc", ray_docs({"RayService"}), ids=lambda x: x if isinstance(x, str) else "")
def test_rayservice_import_paths_exist(name, doc):
    serve_cfg = yaml.safe_load(doc["spec"].get("serveConfigV2", "") or "{}")
    for app in serve_cfg.get("applications", []):
        module = app["import_path"].split(":")[0]
        rel = Path(*module.split("."))
        assert (REPO / f"{rel}.py").is_file() or (REPO / rel / "__init__.py").is_file(), f"{name}: {module}"


# ---------------------------------------------------------------- cluster launcher

@pytest.mark.parametrize("name,doc", launcher_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_launcher_configs_pass_rays_validator_and_mount_the_token(name, doc):
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(doc)))  # what `ray up` runs first
    assert doc["docker"]["image"] == image()
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert head["resources"].get("CPU") == 0, f"{name}: actors must not land on the head"
    gpu = [t for t, v in types.items() if v.get("resources", {}).get("GPU", 0) > 0]
    cpu = [t for t, v in types.items() if t != doc["head_node_type"]
           and v.get("resources", {}).get("GPU", 0) == 0 and "guestAccelerators" not in v["node_config"]]
    assert gpu and cpu, f"{name}: needs a GPU node type and a CPU-only decode node type"
    for t in gpu:
        r = types[t]["resources"]
        assert r["CPU"] == r["GPU"] * recipe_cpus_per_worker(), f"{name}/{t}: advertise the train workers' CPUs only"
    # token auth: the locally generated token on every node, RAY_AUTH_MODE=token wherever Ray runs
    assert any(k.endswith("/.ray/auth_token") and v == "~/.ray/auth_token"
               for k, v in doc["file_mounts"].items()), f"{name}: token not mounted"
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in doc[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{name}: {key}"


# vCPUs and GPUs of the machine types the launcher configs name (AWS and GCP machine-type docs)
MACHINES = {"m6i.2xlarge": (8, 0), "p4d.24xlarge": (96, 8), "c6i.8xlarge": (32, 0),
            "n2-standard-8": (8, 0), "a2-highgpu-8g": (96, 8), "c2-standard-30": (30, 0)}


@pytest.mark.parametrize("name,doc", launcher_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_launcher_node_types_advertise_no_more_than_their_machine_has(name, doc):
    """`resources` is what Ray schedules by: a decode node advertising more CPUs than its
    machine has takes one decode actor per advertised CPU, more than it has cores."""
    for t, v in doc["available_node_types"].items():
        machine = v["node_config"].get("InstanceType") or v["node_config"].get("machineType")
        assert machine in MACHINES, f"{name}/{t}: add {machine}'s vCPUs and GPUs to MACHINES"
        cpus, gpus = MACHINES[machine]
        assert v["resources"].get("CPU", cpus) <= cpus, f"{name}/{t}: {machine} has {cpus} vCPUs"
        assert v["resources"].get("GPU", 0) <= gpus, f"{name}/{t}: {machine} has {gpus} GPUs"


# ---------------------------------------------------------------- runtime env

def test_runtime_env_parses_as_ray_job_submit_does_and_excludes_data(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=".")
    RuntimeEnv(**env)  # Ray validates field names and types
    assert env["working_dir"] == "." and {"runs/", "clipray_data/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    # Ray's own packager over a tree shaped like the repo: only code and configs go up
    tree = tmp_path / "repo"
    for rel in ("clipray/__init__.py", "train/configs/demo.yaml", "cluster/submit.sh", "runs/demo/ckpt.bin",
                "clipray_data/synth/videos/a.mp4", ".git/HEAD", "clipray/__pycache__/x.pyc",
                "clipray.egg-info/PKG-INFO"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=False, excludes=env["excludes"])
    files = {n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}
    assert files == {"clipray/__init__.py", "train/configs/demo.yaml", "cluster/submit.sh"}


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_pins_match_pyproject():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    reqs = requirements()
    ray = base_ray_version()
    assert reqs["ray"].specifier.contains(ray), f"base image Ray {ray} outside pyproject's {reqs['ray']}"
    py = re.search(r"rayproject/ray:\S+-py(\d)(\d+)-", dockerfile())
    requires_python = SpecifierSet(pyproject()["project"]["requires-python"])
    assert Version(f"{py.group(1)}.{py.group(2)}") in requires_python, "image Python outside requires-python"
    pins = {}
    for spec in re.findall(r'"([A-Za-z0-9_.\-\[\],]+==[0-9][^"\s]*)"', dockerfile()):
        r = Requirement(spec)
        pins[canonicalize_name(r.name)] = str(next(iter(r.specifier)).version)
    assert {"ray", "torch", "torchvision", "deepspeed", "open-clip-torch"} <= set(pins), sorted(pins)
    assert pins["ray"] == ray, "pip's Ray must be the base image's Ray"
    for name, version in pins.items():
        assert name in reqs, f"Dockerfile pins {name}, which pyproject.toml does not list"
        assert reqs[name].specifier.contains(version), f"{name}=={version} outside pyproject's {reqs[name]}"
    # the project itself, with the extras that bring s3fs and gcsfs, from the copied checkout
    assert image_extras() and set(image_extras()) <= set(pyproject()["project"]["optional-dependencies"])
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile(), re.M):
        for s in src.split():
            assert (REPO / s).exists(), f"Dockerfile copies {s}, which is not in the repository"


def image_extras() -> list[str]:
    """The extras of the project that cluster/Dockerfile installs (`pip install ".[s3,...]"`)."""
    m = re.search(r'pip install --no-cache-dir "\.\[([\w,]+)\]"', dockerfile())
    return m.group(1).split(",") if m else []


def test_the_image_opens_every_bucket_scheme_the_cluster_files_name():
    """A gs:// train.storage_path (cluster/gcp-gpu.yaml, README) goes through fsspec: the resume
    check, result.json, the export, skip reports and gs:// videos. The image installed s3fs
    only, so such a run stopped before Ray with "ImportError: Please install gcsfs" (a traceback).
    Every fsspec scheme named in cluster/ must have its implementation in the image: pinned
    there, or brought by an extra it installs."""
    from fsspec.registry import known_implementations
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = "\n".join(p.read_text() for p in sorted(CLUSTER.iterdir()) if p.is_file())
    schemes = set(re.findall(r"\b([a-z][a-z0-9]*)://", text)) - {"http", "https"}
    assert {"s3", "gs"} <= schemes, schemes
    extras = pyproject()["project"]["optional-dependencies"]
    installed = {canonicalize_name(Requirement(s).name)
                 for s in re.findall(r'"([A-Za-z0-9_.\-\[\],]+==[0-9][^"\s]*)"', dockerfile())}
    installed |= {canonicalize_name(Requirement(r).name) for e in image_extras() for r in extras[e]}
    for scheme in sorted(schemes):
        impl = known_implementations[scheme]
        package = canonicalize_name(impl["class"].split(".")[0])
        assert package in installed, f"{scheme}:// needs {package}, which cluster/Dockerfile does not install"


# ---------------------------------------------------------------- submit.sh

def test_submit_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "submit.sh")], check=True)
    assert os.access(CLUSTER / "submit.sh", os.X_OK)


def _submit(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    """Run submit.sh with a clean Ray environment (HOME without a token) plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and not k.startswith("CLIPRAY_")}
    base["HOME"] = str(tmp_path)
    base["PATH"] = f"{Path(sys.executable).parent}:{base.get('PATH', '')}"
    return subprocess.run([str(CLUSTER / "submit.sh"), *args], env={k: v for k, v in {**base, **env}.items()
                                                                   if v is not None}, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)


def _checkout_copy(tmp_path) -> Path:
    """tmp_path/repo: a checkout holding submit.sh and runtime_env.yaml, and train/configs/."""
    repo = tmp_path / "repo"
    (repo / "cluster").mkdir(parents=True)
    for f in ("submit.sh", "runtime_env.yaml"):
        shutil.copy2(CLUSTER / f, repo / "cluster" / f)
    (repo / "train" / "configs").mkdir(parents=True)
    return repo


def _dry_run_in(repo, tmp_path, *args) -> subprocess.CompletedProcess:
    """repo's submit.sh, dry run, from tmp_path, with clipray (this checkout's) importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CLIPRAY_"))}
    env.update(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t", CLIPRAY_DRY_RUN="1",
               HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([str(repo / "cluster" / "submit.sh"), *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)


def test_submit_sh_requires_token_auth(tmp_path):
    config = "train/configs/demo.yaml"
    r = _submit(tmp_path, config, RAY_ADDRESS="http://127.0.0.1:8265")
    assert r.returncode == 2 and "RAY_AUTH_MODE=token is required" in r.stderr
    r = _submit(tmp_path, config, RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token")
    assert r.returncode == 2 and "no Ray auth token" in r.stderr
    assert "kubectl get secret" in r.stderr and "auth_token" in r.stderr  # says how to get it
    # no HOME at all (cron, `env -i`, a service): the user's home, as Ray finds the token; it was
    # bash's 'HOME: unbound variable' (set -u), exit 1
    import pwd

    token = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ray" / "auth_token"
    r = _submit(tmp_path, config, "train.storage_path=s3://b/runs", RAY_ADDRESS="http://127.0.0.1:8265",
                RAY_AUTH_MODE="token", CLIPRAY_DRY_RUN="1", HOME=None)
    if token.is_file() and token.stat().st_size:
        assert r.returncode == 0 and f"token from {token}" in r.stdout, r.stderr
    else:
        assert r.returncode == 2 and "no Ray auth token" in r.stderr, r.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")  # the default token file counts
    r = _submit(tmp_path, config, "train.storage_path=s3://b/runs", RAY_ADDRESS="http://127.0.0.1:8265",
                RAY_AUTH_MODE="token", CLIPRAY_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert f"token from {tmp_path}/.ray/auth_token" in r.stdout


def test_submit_sh_names_the_run_and_prints_how_to_follow_stop_resume(tmp_path):
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t",
               CLIPRAY_DRY_RUN="1")
    r = _submit(tmp_path, "train/configs/demo.yaml", "model.head=seqTransf", "train.storage_path=s3://b/runs", **env)
    assert r.returncode == 0, r.stderr
    run = re.search(r"train\.run_name=(demo-\d{8}-\d{6})\b", r.stdout).group(1)
    cmd = re.search(r"^dry run:\s+(.*)$", r.stdout, re.M).group(1)
    job = re.search(r"^job id:\s+(\S+)$", r.stdout, re.M).group(1)
    assert shlex.split(cmd) == ["ray", "job", "submit", "--working-dir", ".", "--runtime-env",
                                "cluster/runtime_env.yaml", "--submission-id", job, "--no-wait", "--",
                                "python", "-m", "train", "train/configs/demo.yaml", "model.head=seqTransf",
                                f"train.run_name={run}", "train.storage_path=s3://b/runs"]
    assert f"ray job logs -f {job}" in r.stdout and f"ray job stop {job}" in r.stdout
    resume = re.search(r"resume:\s+(.*)$", r.stdout, re.M).group(1)
    assert shlex.split(resume) == ["cluster/submit.sh", "train/configs/demo.yaml", "model.head=seqTransf",
                                   f"train.run_name={run}", "train.storage_path=s3://b/runs"]
    # resuming: the given name and storage are kept; the job id is new
    r2 = _submit(tmp_path, *shlex.split(resume)[1:], **env)
    assert r2.returncode == 0, r2.stderr
    assert f"train.run_name={run} train.storage_path=s3://b/runs" in r2.stdout
    assert re.search(r"^job id:\s+(\S+)$", r2.stdout, re.M).group(1).startswith(f"clipray-{run}-")
    # the storage default comes from CLIPRAY_STORAGE_PATH; a relative path is refused (a new job's
    # working dir would not hold the old checkpoints)
    r3 = _submit(tmp_path, "train/configs/demo.yaml", **env, CLIPRAY_STORAGE_PATH="gs://b/r")
    assert "train.storage_path=gs://b/r" in r3.stdout
    r4 = _submit(tmp_path, "train/configs/demo.yaml", "train.storage_path=runs", **env)
    assert r4.returncode == 2 and "relative" in r4.stderr
    r5 = _submit(tmp_path, "train/configs/nope.yaml", **env)
    assert r5.returncode == 2 and "config file not found" in r5.stderr


def test_submit_sh_checks_the_overrides_before_it_submits(tmp_path):
    """A typo in a key, or a value of the wrong type, failed only on the cluster, once the
    package was uploaded and the job started: loaded here as the job loads them, they are one
    line and exit 2, and nothing is submitted."""
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t",
               CLIPRAY_DRY_RUN="1")
    for bad, said in (("train.epocs=3", "bad key 'train.epocs': Key 'epocs' not in 'TrainConfig'. Did you mean: "
                                        "'epochs'?"),
                      ("optim.lr=fast", "optim.lr")):
        r = _submit(tmp_path, "train/configs/demo.yaml", bad, "train.storage_path=s3://b/runs", **env)
        assert r.returncode == 2 and r.stderr.startswith("submit.sh: command-line override: ") and said in r.stderr, r
        assert "dry run:" not in r.stdout
    r = _submit(tmp_path, "edit", "train/configs/edit_demo.yaml", "edit.rounds=1", "train.storage_path=s3://b/runs",
                **env)
    assert r.returncode == 0 and "python -m train.edit train/configs/edit_demo.yaml edit.rounds=1" in r.stdout, r.stderr


def test_submit_sh_resume_line_keeps_a_storage_path_with_a_space_in_one_word(tmp_path):
    """The printed resume line is pasted as it is: a storage path with a space (an NFS folder,
    an S3 key) came out unquoted, and pasting it gave submit.sh two words, the second refused
    as not key=value; the overrides beside it were already quoted."""
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t",
               CLIPRAY_DRY_RUN="1")
    store = "/mnt/shared fs/clip runs"
    r = _submit(tmp_path, "train/configs/demo.yaml", "model.head=seqTransf", "train.run_name=r1",
                f"train.storage_path={store}", **env)
    assert r.returncode == 0, r.stderr
    resume = re.search(r"resume:\s+(.*)$", r.stdout, re.M).group(1)
    assert shlex.split(resume) == ["cluster/submit.sh", "train/configs/demo.yaml", "model.head=seqTransf",
                                   "train.run_name=r1", f"train.storage_path={store}"]
    r2 = _submit(tmp_path, *shlex.split(resume)[1:], **env)  # pasted: the same run
    assert r2.returncode == 0 and f"storage: {store}\n" in r2.stdout, r2.stderr


def test_submit_sh_refuses_a_config_outside_the_checkout_and_a_switch_that_is_not_0_or_1(tmp_path):
    """`../../x.yaml` out of the checkout passed the check for an absolute path, and the job was
    sent a config its working dir does not hold; CLIPRAY_DRY_RUN=true submitted the job for real."""
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t",
               CLIPRAY_DRY_RUN="1")
    outside = tmp_path / "outside.yaml"
    outside.write_text("train:\n  epochs: 1\n")
    up = os.path.relpath(outside, CLUSTER.parent)  # ../../... from the repository root
    r = _submit(tmp_path, up, "train.storage_path=s3://b/r", **env)
    assert r.returncode == 2 and r.stderr == f"submit.sh: CONFIG must be a path inside the repository (the job " \
                                             f"only sees the working dir): {up}\n", r.stdout + r.stderr
    for switch in ("CLIPRAY_DRY_RUN", "CLIPRAY_FOLLOW"):
        r = _submit(tmp_path, "train/configs/howto100m.yaml", "train.storage_path=s3://b/r",
                    **{**env, switch: "true"})
        assert r.returncode == 2 and r.stderr == f"submit.sh: {switch} must be 0 or 1, got: true\n", r.stderr
    r = _submit(tmp_path, "train/configs/howto100m.yaml", "train.storage_path=s3://b/r", **env)
    assert r.returncode == 0 and "dry run:" in r.stdout, r.stderr


def test_submit_sh_refuses_a_configs_relative_storage_path_too(tmp_path):
    """With no train.storage_path given, the config's is used, and a relative one must be refused
    as a given one is: load_config makes it absolute against the submitting machine's directory
    (demo.yaml's `runs` -> <checkout>/runs), a path the cluster's nodes do not share."""
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t",
               CLIPRAY_DRY_RUN="1")
    r = _submit(tmp_path, "train/configs/demo.yaml", **env)  # train.storage_path: runs
    assert r.returncode == 2 and "train.storage_path=runs is relative" in r.stderr, r.stdout + r.stderr
    r = _submit(tmp_path, "edit", "train/configs/edit_demo.yaml", **env)  # the schema's default, runs
    assert r.returncode == 2 and "train.storage_path=runs is relative" in r.stderr, r.stdout + r.stderr
    r = _submit(tmp_path, "train/configs/howto100m.yaml", **env)  # a URL is taken as it is
    assert r.returncode == 0 and "train.storage_path=s3://YOUR-BUCKET/runs\n" in r.stdout, r.stderr


def test_submit_sh_says_when_it_cannot_read_the_configs_storage_path(tmp_path):
    """The config's train.storage_path is read with the local python. When that fails (no
    clipray dependencies on this machine, a config that does not load) the script fell back to
    `runs` and refused it as relative, though howto100m.yaml's is s3://: now it says what failed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'omegaconf'\" >&2\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t", CLIPRAY_DRY_RUN="1",
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    r = _submit(tmp_path, "train/configs/howto100m.yaml", **env)
    assert r.returncode == 2 and "relative" not in r.stderr, r.stderr
    # (first, that the overrides could not be checked here either)
    note = ("submit.sh: note: the overrides could not be checked here (ModuleNotFoundError: No module named "
            "'omegaconf'); the job checks them")
    assert r.stderr.strip().splitlines() == [
        note, "submit.sh: cannot read train.storage_path from train/configs/howto100m.yaml (ModuleNotFoundError: "
              "No module named 'omegaconf'); give train.storage_path=... or set CLIPRAY_STORAGE_PATH"]
    # a storage path given needs no working python: the job is submitted, its overrides unchecked
    r = _submit(tmp_path, "train/configs/howto100m.yaml", "train.storage_path=s3://b/r", **env)
    assert r.returncode == 0 and "train.storage_path=s3://b/r\n" in r.stdout, r.stderr
    assert r.stderr.strip() == note


def test_readme_covers_every_file_and_the_job_commands():
    text = (CLUSTER / "README.md").read_text()
    for p in sorted(CLUSTER.iterdir()):
        if p.name != "README.md":
            assert p.name in text, f"cluster/README.md does not mention {p.name}"
    for cmd in ("ray job logs -f", "ray job stop", "ray get-auth-token", "kubectl get secret", "ray down",
                "kubectl delete", "clipray bench data"):
        assert cmd in text, cmd


def test_submit_sh_edit_runs_clip_editing_and_its_resume_line_says_edit(tmp_path):
    env = dict(RAY_ADDRESS="http://127.0.0.1:8265", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t",
               CLIPRAY_DRY_RUN="1")
    r = _submit(tmp_path, "edit", "train/configs/edit_demo.yaml", "edit.rounds=2", "train.storage_path=s3://b/runs",
                **env)
    assert r.returncode == 0, r.stderr
    run = re.search(r"train\.run_name=(edit_demo-\d{8}-\d{6})\b", r.stdout).group(1)
    cmd = shlex.split(re.search(r"^dry run:\s+(.*)$", r.stdout, re.M).group(1))
    assert cmd[cmd.index("--") + 1:] == ["python", "-m", "train.edit", "train/configs/edit_demo.yaml", "edit.rounds=2",
                                         f"train.run_name={run}", "train.storage_path=s3://b/runs"]
    resume = re.search(r"resume:\s+(.*)$", r.stdout, re.M).group(1)
    assert shlex.split(resume) == ["cluster/submit.sh", "edit", "train/configs/edit_demo.yaml", "edit.rounds=2",
                                   f"train.run_name={run}", "train.storage_path=s3://b/runs"]
    assert _submit(tmp_path, "edit", **env).returncode == 2  # a command and no config: usage


def test_submit_sh_refuses_a_config_or_parent_the_job_package_leaves_out(tmp_path):
    """The job reads CONFIG and every file it `extends:` from its working dir: the checkout less
    runtime_env.yaml's excludes (and .gitignore). A parent named by an absolute path out of the
    checkout, a config under data/ or runs/, or a parent there, loaded on this machine and was
    submitted, to fail on the cluster with "config file not found" after the upload."""
    repo = _checkout_copy(tmp_path)
    (repo / "data").mkdir()
    base = "train:\n  epochs: 1\n"
    (tmp_path / "base.yaml").write_text(base)  # beside the checkout, not in it
    (repo / "data" / "mine.yaml").write_text(base)
    (repo / "train" / "configs" / "abs.yaml").write_text(f"extends: {tmp_path / 'base.yaml'}\n")
    (repo / "train" / "configs" / "from_data.yaml").write_text("extends: ../../data/mine.yaml\n")

    def submit(config):
        return _dry_run_in(repo, tmp_path, config, "train.storage_path=s3://b/r")

    r = submit("train/configs/abs.yaml")
    assert r.returncode == 2 and r.stderr == (f"submit.sh: train/configs/abs.yaml: {tmp_path / 'base.yaml'} is outside "
                                              "the repository (the job only sees the working dir)\n"), r.stdout + r.stderr
    excluded = ("is left out of the job's working dir (cluster/runtime_env.yaml's excludes): the job would not find "
                "it; keep configs beside the code (train/configs/)\n")
    r = submit("data/mine.yaml")
    assert r.returncode == 2 and r.stderr == f"submit.sh: data/mine.yaml: data/mine.yaml {excluded}", r.stderr
    r = submit("train/configs/from_data.yaml")
    assert r.returncode == 2 and r.stderr == f"submit.sh: train/configs/from_data.yaml: data/mine.yaml {excluded}", \
        r.stderr


def test_submit_sh_reads_the_configs_storage_path_with_the_overrides(tmp_path):
    """With no train.storage_path given, the config's is read as the job reads it. It was read
    without the overrides and from an empty folder: a config that loads only with them
    (train.num_workers=16 with data.batch_size=8 on the command line, train.global_batch 128)
    was refused as "cannot read train.storage_path ... Give data.batch_size=8", the override
    given; a relative local model.pretrained (weights/w.bin) was "no such file" there."""
    repo = _checkout_copy(tmp_path)
    (repo / "weights").mkdir()
    (repo / "weights" / "w.bin").write_bytes(b"x")
    (repo / "train" / "configs" / "big.yaml").write_text(
        "data:\n  batch_size: 16\ntrain:\n  num_workers: 16\n  global_batch: 128\n  storage_path: s3://b/runs\n")
    (repo / "train" / "configs" / "pre.yaml").write_text(
        "model:\n  pretrained: weights/w.bin\ntrain:\n  storage_path: s3://b/runs\n")
    for args in (["train/configs/big.yaml", "data.batch_size=8"], ["train/configs/pre.yaml"]):
        r = _dry_run_in(repo, tmp_path, *args)
        assert r.returncode == 0 and "storage: s3://b/runs\n" in r.stdout, r.stdout + r.stderr
        cmd = shlex.split(re.search(r"^dry run:\s+(.*)$", r.stdout, re.M).group(1))
        assert cmd[cmd.index("--") + 4:-2] == args and cmd[-1] == "train.storage_path=s3://b/runs"


def test_submit_sh_reads_a_relative_token_path_from_where_it_was_started(tmp_path):
    """RAY_AUTH_TOKEN_PATH=tok beside the caller was checked after the script moved to the
    repository root: "RAY_AUTH_TOKEN_PATH=tok is missing or empty", exit 2, with the file there."""
    (tmp_path / "tok").write_text("secret")
    r = _submit(tmp_path, "train/configs/demo.yaml", "train.storage_path=s3://b/runs", RAY_ADDRESS="http://127.0.0.1:8265",
                RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH="tok", CLIPRAY_DRY_RUN="1")  # cwd: tmp_path
    assert r.returncode == 0 and f"(token from {tmp_path}/tok)" in r.stdout, r.stdout + r.stderr
    r = _submit(tmp_path, "train/configs/demo.yaml", "train.storage_path=s3://b/runs", RAY_ADDRESS="http://127.0.0.1:8265",
                RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH="nope", CLIPRAY_DRY_RUN="1")
    assert r.returncode == 2 and f"RAY_AUTH_TOKEN_PATH={tmp_path}/nope is missing or empty" in r.stderr, r.stderr


def test_submit_sh_prints_its_usage_when_started_by_a_relative_path(tmp_path):
    """`../../clipray/cluster/submit.sh edit` (a command, no config) printed its usage from $0
    after moving to the repository root, where that relative path names no file: "sed: can't
    read ../../...", and no usage."""
    rel = os.path.relpath(CLUSTER / "submit.sh", tmp_path)  # ../../... from tmp_path, elsewhere from the root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CLIPRAY_"))}
    r = subprocess.run(["bash", rel, "edit"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr == "", r.stderr
    assert "  cluster/submit.sh [train|edit] CONFIG [key=value ...]\n" in r.stdout, r.stdout
