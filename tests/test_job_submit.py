"""`ray job submit` for real: a Ray head started with `ray start --head` on 127.0.0.1 with token
authentication on, the demo training submitted through cluster/submit.sh (which runs
`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml ...`), its result.json
checked, and then that head, and only that head, stopped.

The head runs under `ray start --block` in its own session: stopping that process stops the
processes it started, while the test session's shared local Ray (a different temp dir and
ports) keeps running. `ray stop` would kill every Ray process on the machine, so it is not used.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clipray.manifest import read_manifest
from ports import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (a 401 without a token): it is up
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the head's job server did not come up in {timeout:.0f} s")


@contextlib.contextmanager
def ray_head(tmp_path: Path):
    """A token-authenticated Ray head on 127.0.0.1; yields (dashboard URL, env for the CLI)."""
    gcs, dash, client, agent_listen, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(9)
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    # Ray's socket paths must stay short: a temp dir under /tmp, not pytest's long tmp_path
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    log = tmp_path / "head.log"
    # SIGTERM to `ray start --block` first drains the node for Kubernetes (up to 30 s, Ray's
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S): after the jobs here it sat out all 30 s before
    # stopping anything. 0 stops the head's processes at once, as before that drain existed.
    head_env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    with open(log, "w") as f:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_listen),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
             "--runtime-env-agent-port", str(rt_env), "--node-manager-port", str(node_mgr),
             "--object-manager-port", str(obj_mgr), "--num-cpus", "4", "--temp-dir", temp_dir,
             "--disable-usage-stats"],
            env=head_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(f"{url}/api/version", head, log)
        yield url, dict(env, RAY_ADDRESS=url)
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes this head started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        deadline = time.monotonic() + 15  # a child of the head may still be on its way out
        while (left := subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the stopped head still running: {left}"


def test_job_submit_trains_the_demo_on_a_token_auth_head(ray_local, synth_small, tmp_path):
    with ray_head(tmp_path) as (url, env):
        _submit_demo_and_check(url, env, synth_small["manifest"], tmp_path / "runs")
        # two short jobs, each refused before Ray Train starts: at once (each is mostly process
        # starts, ~10 s one after the other); either one's failed assertion is raised here
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(_follow_a_failing_job, env, tmp_path / "runs"),
                         pool.submit(_a_run_folder_in_the_jobs_working_dir_is_refused, env, synth_small["manifest"])]:
                done.result()

    # only the head this test started is gone: the session's own local Ray still runs tasks
    assert ray_local.get(ray_local.remote(lambda: 41 + 1).remote(), timeout=120) == 42


def _submit_demo_and_check(url: str, env: dict, manifest: str, storage: Path) -> None:
    # token auth is on: the job server turns away a client with the wrong token
    wrong = subprocess.run([RAY, "job", "list"], env=dict(env, RAY_AUTH_TOKEN="not-the-token"),
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0, wrong.stdout[-2000:]
    with pytest.raises(urllib.error.HTTPError) as no_token:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=30)
    assert no_token.value.code in (401, 403)

    sub = subprocess.run(
        ["bash", "cluster/submit.sh", "train/configs/demo.yaml",
         f"data.manifest={manifest}", "train.epochs=1", "data.batch_size=4",
         "data.video.max_frames=4", "train.run_name=jobsubmit", f"train.storage_path={storage}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    job_id = next(line.split()[-1] for line in sub.stdout.splitlines() if line.startswith("job id:"))

    deadline = time.time() + 600
    token = env["RAY_AUTH_TOKEN"]
    while (status := _get_json(f"{url}/api/jobs/{job_id}", token)["status"]) not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {job_id} still {status} after 600 s"
        time.sleep(1)
    logs = subprocess.run([RAY, "job", "logs", job_id], env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]

    result = json.loads((storage / "jobsubmit" / "result.json").read_text())
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "t2v_mnr",
                "v2t_r1", "v2t_r5", "v2t_r10", "v2t_mdr", "v2t_mnr"):
        assert key in result, key
    n_test = len(set(read_manifest(manifest, split="test").column("video_id").to_pylist()))
    assert result["num_test_videos"] == n_test
    assert 0.0 <= result["t2v_r1"] <= result["t2v_r5"] <= result["t2v_r10"] <= 100.0
    steps_per_epoch = len(read_manifest(manifest, split="train")) // (4 * 2)
    assert result["total_steps"] == steps_per_epoch

    # the job ran from the package `--working-dir .` uploaded, not from this checkout in place
    info = _get_json(f"{url}/api/jobs/{job_id}", token)
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_"), info["runtime_env"]


def _follow_a_failing_job(env: dict, storage: Path) -> None:
    """CLIPRAY_FOLLOW=1 tails the job to its end; a job that failed must fail the script, as
    `ray job submit` without --no-wait does. It exec'd `ray job logs -f`, which exits 0 whatever
    the job's end, so a CI step or a `&&` chain went on after a failed run."""
    sub = subprocess.run(
        ["bash", "cluster/submit.sh", "train/configs/demo.yaml", "data.manifest=/nonexistent/manifest.parquet",
         "train.run_name=jobfails", f"train.storage_path={storage}"],
        cwd=REPO, env=dict(env, CLIPRAY_FOLLOW="1"), capture_output=True, text=True, timeout=300)
    said = sub.stdout + sub.stderr
    assert "clipray train: error:" in said and "/nonexistent/manifest.parquet" in said, said[-3000:]
    assert sub.returncode == 1, said[-3000:]
    # the follow-up commands are still printed, the resume line among them
    assert "resume:       cluster/submit.sh train/configs/demo.yaml" in sub.stdout, said[-3000:]


def _a_run_folder_in_the_jobs_working_dir_is_refused(env: dict, manifest: str) -> None:
    """`ray job submit --working-dir . -- python -m train CONFIG` with a relative storage path
    (demo.yaml's `runs`, the schema's default for the recipes), which submit.sh refuses: the run
    folder resolved inside the job's unpacked copy of the code. The run trained and wrote its
    checkpoints and export there, a temporary folder of Ray's that a later job does not share
    (a resubmission after a code change unpacks elsewhere and started over from step 0)."""
    sub = subprocess.run(
        [RAY, "job", "submit", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "-m", "train", "train/configs/demo.yaml", f"data.manifest={manifest}", "train.epochs=1",
         "data.batch_size=4", "data.video.max_frames=4", "train.run_name=inpkg"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    said = sub.stdout + sub.stderr
    assert sub.returncode == 1, said[-3000:]  # the job failed
    assert "clipray train: error: train.storage_path: the run folder" in said, said[-3000:]
    assert "is inside this Ray job's working directory" in said, said[-3000:]
    assert "[driver] run" not in said  # refused before Ray Train starts


def _get_json(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_python_m_train_answers_a_bad_config_with_a_usage_error_not_a_traceback(tmp_path):
    """`python -m train` (and `python -m train.edit`) is what `ray job submit` runs: a config
    path missing from the job's working dir, or a mistyped override, is one line on stderr and
    exit status 2, as with `clipray train` (no Ray starts: both fail while the config loads)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    for module, args, said in (
            ("train", ["train/configs/demo.yaml"], f"config file not found: {tmp_path}/train/configs/demo.yaml"),
            ("train", [str(REPO / "train/configs/demo.yaml"), "data.manifst=x"], "bad key 'data.manifst'"),
            ("train.edit", [str(REPO / "train/configs/edit_demo.yaml"), "edit.step_s=0"], "edit.step_s must be")):
        r = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and said in r.stderr, r.stderr[-2000:]


def test_an_unknown_clipray_command_is_named_in_an_error(capsys):
    """`clipray trian ...` printed the usage text alone (exit 2) without saying what was wrong;
    `clipray bench nope` names the unknown benchmark, so the top level names the command."""
    from clipray.cli import main

    assert main(["trian", "train/configs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("clipray: error: unknown command 'trian'"), err[-500:]
    assert main([]) == 2  # no command: the usage alone, on stderr as argparse's (it went to stdout)
    out = capsys.readouterr()
    assert out.out == "" and "clipray train CONFIG" in out.err and "unknown command" not in out.err
    assert main(["--help"]) == 0 and "clipray train CONFIG" in capsys.readouterr().out
