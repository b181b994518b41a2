#!/usr/bin/env bash
# Submit a clipray training run to a Ray cluster as a Ray job.
#
#   cluster/submit.sh [train|edit] CONFIG [key=value ...]
#   e.g. cluster/submit.sh train/configs/howto100m.yaml data.manifest=s3://my-bucket/howto100m/manifest \
#            data.eval_manifest=s3://my-bucket/msrvtt/manifest_9k train.storage_path=s3://my-bucket/clipray/runs
#        cluster/submit.sh edit train/configs/edit_youcook2.yaml data.manifest=s3://my-bucket/youcook2/manifest \
#            train.storage_path=s3://my-bucket/runs
#
# Loads CONFIG with the overrides first, with this machine's python where it has clipray: a
# typo in a key fails here, not on the cluster. Then runs, from the repository root (`edit`:
# clip editing, python -m train.edit):
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml --submission-id ID \
#       --no-wait -- python -m train CONFIG [key=value ...] train.run_name=RUN train.storage_path=STORE
#
# Environment:
#   RAY_ADDRESS            the cluster's dashboard / job server, e.g. http://127.0.0.1:8265 (required)
#   RAY_AUTH_MODE=token    required: clipray clusters run with Ray token authentication on
#   RAY_AUTH_TOKEN         the token, or a file at RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
#   CLIPRAY_STORAGE_PATH   default train.storage_path (local path or s3://...; default: the config's)
#   CLIPRAY_FOLLOW=1       submit without --no-wait: tail the job's logs until it ends, and exit 1
#                          if it failed (as ray job submit does; `ray job logs -f` exits 0 either way)
#   CLIPRAY_DRY_RUN=1      print the command instead of running it (nothing is contacted)
#
# The run name is train.run_name if you give one, else <config name>-<UTC timestamp>; that name
# plus the storage path IS the run: re-submitting with both resumes from its latest checkpoint.
set -euo pipefail

die() { printf 'submit.sh: %s\n' "$*" >&2; exit 2; }

# this file, absolute: usage is also printed after the cd to the repository root below, where
# a relative $0 (../clipray/cluster/submit.sh) named no file ("sed: can't read", no usage)
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
usage() {
    sed -n '2,/^set -euo/p' "$self" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

[[ $# -ge 1 ]] || usage 2
[[ $1 == -h || $1 == --help ]] && usage 0
# a switch is 0 or 1: CLIPRAY_DRY_RUN=true submitted the job for real
for switch in CLIPRAY_DRY_RUN CLIPRAY_FOLLOW; do
    [[ ${!switch:-0} == [01] ]] || die "$switch must be 0 or 1, got: ${!switch}"
done

# A relative RAY_AUTH_TOKEN_PATH names a file from where this script was started, not from the
# repository root it moves to below: made absolute here (and exported, so that `ray job submit`,
# run from the root, reads the same file); it was "missing or empty" beside the file.
if [[ -n ${RAY_AUTH_TOKEN_PATH:-} && $RAY_AUTH_TOKEN_PATH != /* ]]; then
    export RAY_AUTH_TOKEN_PATH="$PWD/$RAY_AUTH_TOKEN_PATH"
fi

# --working-dir . must be the repository root: the cluster sees only what is under it.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

command=train
if [[ $1 == train || $1 == edit ]]; then
    command="$1"
    shift
    [[ $# -ge 1 ]] || usage 2
fi
module=train command_arg=""  # training is the default; `edit` is named again in the resume line
[[ $command == train ]] || { module="train.$command"; command_arg="$command "; }
config="$1"
shift
[[ $config != /* ]] || die "CONFIG must be a path inside the repository (the job only sees the working dir): $config"
[[ -f $config ]] || die "config file not found (relative to $repo_root): $config"
# ../ out of the checkout (or a link out of it) passed the check above: not in the job's working dir
[[ "$(cd "$(dirname "$config")" && pwd -P)/" == "$(pwd -P)"/* ]] \
    || die "CONFIG must be a path inside the repository (the job only sees the working dir): $config"
overrides=()
run_name=""
storage_path=""
for kv in "$@"; do
    [[ $kv == *=* ]] || die "overrides must look like key=value, got: $kv"
    case "$kv" in
        train.run_name=*) run_name="${kv#train.run_name=}" ;;
        train.storage_path=*) storage_path="${kv#train.storage_path=}" ;;
        *) overrides+=("$kv") ;;
    esac
done

# --- the config and overrides, loaded here as the job will load them: a typo in a key, or a
# value of the wrong type, failed only on the cluster, after the package upload and the job's
# start. Skipped, with a note, where this python has no clipray (or its dependencies).
check_err="$(mktemp)"
check_rc=0
python - "$config" ${overrides[@]+"${overrides[@]}"} >/dev/null 2>"$check_err" <<'PY' || check_rc=$?
import os, sys
sys.path.insert(0, os.getcwd())
try:
    from clipray.config import ConfigError, load_config
except ImportError:
    sys.exit(3)
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    print(e, file=sys.stderr)
    sys.exit(2)

# The job reads CONFIG, and every file it `extends:`, from its working dir: this checkout less
# what Ray leaves out of the package (runtime_env.yaml's excludes, .gitignore, .rayignore). A
# parent named by an absolute or ../ path, or a file under data/ or runs/, loaded here and was
# "config file not found" on the cluster, after the upload and the job's start.
from pathlib import Path
from clipray.config import _read_yaml

root = Path(os.path.realpath(os.getcwd()))
files = []
for name, _ in _read_yaml(Path(sys.argv[1])):
    real = Path(os.path.realpath(os.path.dirname(os.path.abspath(name)))) / os.path.basename(name)
    if root not in real.parents:
        print(f"{sys.argv[1]}: {os.path.normpath(name)} is outside the repository (the job only sees the working dir)",
              file=sys.stderr)
        sys.exit(2)
    files.append((os.path.relpath(real, root), real))
# The matching Ray's packager does (ray._private.runtime_env.packaging: gitwildmatch patterns,
# each folder's ignore files applied below it), with the pathspec copy Ray ships, loaded on its
# own: importing ray costs a second per submit. Skipped where this python has no such copy.
import importlib.util
try:
    ray_init = importlib.util.find_spec("ray").origin
    pkg = os.path.join(os.path.dirname(ray_init), "_private", "thirdparty", "pathspec")
    spec = importlib.util.spec_from_file_location("_ray_pathspec", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    sys.modules["_ray_pathspec"] = pathspec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pathspec)
    import yaml
except Exception:
    sys.exit(0)


def matcher(folder, lines):
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    return lambda p: spec.match_file(str(p.relative_to(folder)))


env = yaml.safe_load((root / "cluster" / "runtime_env.yaml").read_text()) or {}
ignore_files = (".gitignore", ".rayignore") if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1" \
    else (".rayignore",)
for name, real in files:
    checks, p = [("cluster/runtime_env.yaml's excludes", matcher(root, list(env.get("excludes") or [])))], root
    for part in real.relative_to(root).parts:  # as Ray walks: each folder's ignore files, then its entries
        for f in ignore_files:
            if (p / f).is_file():
                checks.append((os.path.relpath(p / f, root), matcher(p, (p / f).read_text().splitlines())))
        p = p / part
        why = next((why for why, match in checks if match(p)), None)
        if why:
            print(f"{sys.argv[1]}: {name} is left out of the job's working dir ({why}): the job would not "
                  "find it; keep configs beside the code (train/configs/)", file=sys.stderr)
            sys.exit(2)
PY
check_why="$(grep -v '^[[:space:]]*$' "$check_err" | tail -n 1 || true)"
rm -f "$check_err"
case $check_rc in
    0) ;;
    2) die "$check_why" ;;
    3) printf 'submit.sh: note: the overrides were not checked here (no clipray in this python); the job checks them\n' >&2 ;;
    *) printf 'submit.sh: note: the overrides could not be checked here (%s); the job checks them\n' \
           "${check_why:-python failed}" >&2 ;;
esac

# --- Ray token authentication: required, never switched off ---
token_help() {
    cat >&2 <<'EOF'
How to get the token:
  KubeRay (RayCluster/RayJob with spec.authOptions.mode: token): the operator keeps it in a
  Secret named after the RayCluster, key auth_token:
      export RAY_AUTH_TOKEN=$(kubectl get secret <raycluster-name> -o jsonpath='{.data.auth_token}' | base64 -d)
  (for a RayJob, the cluster name is: kubectl get rayjob <name> -o jsonpath='{.status.rayClusterName}')
  Cluster launcher (cluster/aws-gpu.yaml, cluster/gcp-gpu.yaml): the token is the one you generated
  before `ray up` with `ray get-auth-token --generate`; it is in ~/.ray/auth_token on this machine.
EOF
}
if [[ ${RAY_AUTH_MODE:-} != token ]]; then
    printf 'submit.sh: RAY_AUTH_MODE=token is required (got "%s"): clipray clusters run with token auth.\n' \
        "${RAY_AUTH_MODE:-}" >&2
    printf '  export RAY_AUTH_MODE=token\n' >&2
    token_help
    exit 2
fi
if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    token_source="RAY_AUTH_TOKEN"
elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    [[ -s $RAY_AUTH_TOKEN_PATH ]] || { printf 'submit.sh: RAY_AUTH_TOKEN_PATH=%s is missing or empty\n' \
        "$RAY_AUTH_TOKEN_PATH" >&2; token_help; exit 2; }
    token_source="$RAY_AUTH_TOKEN_PATH"
elif [[ -s ~/.ray/auth_token ]]; then  # ~, not $HOME: with HOME unset, the user's home (as Ray finds it)
    token_source=~/.ray/auth_token
else
    printf 'submit.sh: no Ray auth token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or write ~/.ray/auth_token\n' >&2
    token_help
    exit 2
fi

[[ -n ${RAY_ADDRESS:-} ]] || die "RAY_ADDRESS is not set: the job server, e.g. \
export RAY_ADDRESS=http://127.0.0.1:8265 after 'kubectl port-forward svc/<raycluster>-head-svc 8265:8265' \
or 'ray dashboard cluster/aws-gpu.yaml'"

# --- run identity: name + storage path ---
config_name="$(basename "$config")"
config_name="${config_name%.*}"
stamp="$(date -u +%Y%m%d-%H%M%S)"
new_run=0
[[ -n $run_name ]] || { run_name="${config_name}-${stamp}"; new_run=1; }
[[ -n $storage_path ]] || storage_path="${CLIPRAY_STORAGE_PATH:-}"
if [[ -z $storage_path ]]; then
    # Fall back to the config's own train.storage_path, as python -m train would: with the
    # overrides, as the job loads it (a config that loads only with them, e.g. data.batch_size=8
    # beside its train.num_workers=16, was refused here as not loading). load_config
    # makes a relative path absolute against the current directory, so it is read from an empty
    # temporary one: a path under it was relative (refused below), not this machine's <checkout>/runs.
    # A config that does not load, or a local python without clipray's dependencies, is said
    # as such: falling back to "runs" blamed a relative path the config may not have.
    read_err="$(mktemp)"
    storage_path="$(python -c '
import os, sys, tempfile
sys.path.insert(0, os.getcwd())  # the checkout, for imports made after the chdir below
from pathlib import Path
from clipray.config import load_config
config = Path(sys.argv[1]).resolve()
args = sys.argv[2:]
# a local model.pretrained is checked to exist where the command runs: found here, then given absolute
pretrained = load_config(config, args).model.pretrained
with tempfile.TemporaryDirectory() as d:
    os.chdir(d)
    cfg = load_config(config, args + [f"model.pretrained={pretrained}"])
    here, path = str(Path(d).resolve()), cfg.train.storage_path
    print(os.path.relpath(path, here) if path == here or path.startswith(here + os.sep) else path)
' "$config" ${overrides[@]+"${overrides[@]}"} 2>"$read_err")" || {
        why="$(grep -v '^[[:space:]]*$' "$read_err" | tail -n 1)"
        rm -f "$read_err"
        die "cannot read train.storage_path from $config (${why:-python failed}); give train.storage_path=... or set CLIPRAY_STORAGE_PATH"
    }
    rm -f "$read_err"
    [[ -n $storage_path ]] || storage_path="runs"
fi
if [[ $storage_path != *://* ]]; then
    if [[ $storage_path != /* ]]; then
        # A relative path would land inside the job's unpacked working dir, which a resubmission
        # (new package) does not share: resume would silently start over.
        die "train.storage_path=$storage_path is relative; give s3://..., gs://... or an absolute path shared by all nodes"
    fi
    printf 'submit.sh: note: local storage %s must be shared by every node (NFS/EFS/Filestore);\n' "$storage_path" >&2
    printf '           on a multi-node cluster without one, use train.storage_path=s3://...\n' >&2
fi
[[ $run_name =~ ^[A-Za-z0-9._-]+$ ]] || die "run name may hold only letters, digits, . _ -: $run_name"

# One submission id per attempt: a resume is a new job with the same run name, so it gets the
# attempt's timestamp (a new run's name already carries one). Ray rejects a duplicate id, which
# stops an accidental double submit within the same second.
if [[ $new_run == 1 ]]; then
    submission_id="clipray-${run_name}"
else
    submission_id="clipray-${run_name}-${stamp}"
fi
follow=0
[[ ${CLIPRAY_FOLLOW:-0} == 1 ]] && follow=1
no_wait=(--no-wait)
[[ $follow == 0 ]] || no_wait=()  # ray job submit then tails the logs and exits 1 if the job fails
cmd=(ray job submit
     --working-dir .
     --runtime-env cluster/runtime_env.yaml
     --submission-id "$submission_id"
     ${no_wait[@]+"${no_wait[@]}"}
     --
     python -m "$module" "$config" ${overrides[@]+"${overrides[@]}"}
     "train.run_name=$run_name" "train.storage_path=$storage_path")

printf 'cluster:  %s   (token from %s)\n' "$RAY_ADDRESS" "$token_source"
printf 'run:      %s   storage: %s\n' "$run_name" "$storage_path"
if [[ ${CLIPRAY_DRY_RUN:-0} == 1 ]]; then
    printf 'dry run: '
    printf ' %q' "${cmd[@]}"
    printf '\n'
else
    command -v ray >/dev/null || die "the ray CLI is not on PATH (pip install 'ray[default]==2.60.0')"
    [[ $follow == 1 ]] || "${cmd[@]}"  # following: submitted below, after the commands to manage it
fi

quoted_overrides=""
for kv in ${overrides[@]+"${overrides[@]}"}; do quoted_overrides+=" $(printf '%q' "$kv")"; done
# quoted as the overrides are: the line is pasted as it is (a storage path may hold a space)
quoted_config="$(printf '%q' "$config")"
quoted_run="$(printf '%q %q' "train.run_name=$run_name" "train.storage_path=$storage_path")"
cat <<EOF

job id:   $submission_id
  follow logs:  ray job logs -f $submission_id
  status:       ray job status $submission_id
  stop:         ray job stop $submission_id
  resume:       cluster/submit.sh $command_arg$quoted_config$quoted_overrides $quoted_run
                (same run name + storage path: training continues from the latest checkpoint)
EOF
if [[ $follow == 1 && ${CLIPRAY_DRY_RUN:-0} != 1 ]]; then
    echo
    exec "${cmd[@]}"  # its exit status is the job's: 1 when it failed
fi
