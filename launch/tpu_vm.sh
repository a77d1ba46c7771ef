#!/usr/bin/env bash
# Drive Cloud TPU VMs for jaxtrace with gcloud: create (on-demand / spot / queued), setup, run on
# every worker, logs, ssh, status, delete, and a relaunch-on-preemption babysitter.
# `launch/tpu_vm.sh --help` for usage; launch/README.md walks through a whole run.
set -euo pipefail
if ((BASH_VERSINFO[0] < 4)); then
  echo "tpu_vm.sh needs bash >= 4 (macOS: brew install bash), found $BASH_VERSION" >&2
  exit 2
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PROG=${0##*/}
# Dry-run output and the command trace go to the caller's stdout even from inside $(...).
exec 3>&1

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] COMMAND [options] [-- ARGS...]

Drive a Cloud TPU VM (single host or multi-host pod) for jaxtrace. Every ssh/scp goes to
--worker=all, so the trainer starts on all hosts at once and jax.distributed coordinates them.

Commands:
  preflight -- ARGS    Compile every program of the trainer ARGS for --accelerator-type on this
                       machine (`python -m jaxtrace.compile`, libtpu, no TPU needed): exits 1,
                       before anything is booked, if a program fails to compile or to fit HBM.
  create [-- ARGS]     Create the TPU: on-demand (default), --spot, or --queued (a queued
                       resource; waits until it is provisioned). Needs --accelerator-type.
                       With trainer ARGS it runs preflight first (--no-preflight skips it).
  setup                Copy the code to every worker and make a venv with `pip install .[tpu,...]`
                       (with uv: TPU images ship Python 3.10, jaxtrace needs >= 3.11).
  run -- ARGS          Copy the code, kill stale TPU holders (processes, /tmp/libtpu_lockfile),
                       then start `python -m jaxtrace.train ARGS` in the background on all
                       workers; logs go to ~/jaxtrace_logs/worker-<i>.log on each worker.
                       On a multi-host type it adds --distributed (unless ARGS choose).
  logs                 Show the trainer log of --worker N (default 0) or --worker all; --follow
                       to keep streaming, --lines N lines of history (default 100).
  ssh [-- CMD]         Open a shell on --worker N (default 0), or run CMD there (--worker all ok).
  status               Show the TPU (and queued-resource) state and the trainer on worker 0.
  delete               Delete the TPU (with --queued: the queued resource and its node).
  babysit -- ARGS      Keep a run alive through preemptions: poll every --interval seconds; when
                       the TPU is PREEMPTED / not READY / gone, delete, recreate, setup and rerun
                       the same trainer ARGS, which resume from the latest checkpoint in their
                       --config.workdir (use gs://, a recreated VM has an empty disk). At most
                       --max-retries recoveries; exits 0 when the trainer finishes.

Options (flags win over the env file; the env file's variable is shown in brackets):
  --env FILE             env file to read (default: launch/env if it exists)
  --dry-run              print every command ("+ cmd", one per line) instead of running it
  --name NAME            TPU VM (node) name                    [TPU_NAME, default jaxtrace-tpu]
  --project ID           GCP project (default: gcloud config)  [TPU_PROJECT]
  --zone ZONE            zone, e.g. us-east5-a                 [TPU_ZONE]
  --accelerator-type T   v5p-8, v5p-64, v6e-8, v6e-256, ...    [TPU_ACCELERATOR_TYPE]
  --version V            TPU runtime version (default by type) [TPU_VERSION]
  --spot / --queued      spot capacity / a queued resource     [TPU_SPOT, TPU_QUEUED]
  --on-demand            neither spot nor queued
  --no-preflight         create: skip the ahead-of-time compile check  [TPU_PREFLIGHT=0]
  --qr-name NAME         queued-resource name                  [TPU_QR_NAME, default NAME-qr]
  --code-dir DIR         local code to copy (default: repo)    [TPU_CODE_DIR]
  --worker N|all         worker for logs / ssh (default 0)
  --follow, -f           logs: keep streaming
  --lines N              logs: lines of history (default 100)
  --max-retries N        babysit: recoveries before giving up  [TPU_MAX_RETRIES, default 10]
  --interval S           babysit: seconds between polls        [TPU_POLL_INTERVAL, default 120]
  -h, --help             this help
See launch/env.example for the other variables (venv, extras, setup hook, trainer env).

Examples:
  launch/tpu_vm.sh preflight --accelerator-type=v5p-8 -- --config=configs/qwen3_1p7b_trace.py
  launch/tpu_vm.sh --env launch/env create --accelerator-type=v5p-64 --spot
  launch/tpu_vm.sh setup
  launch/tpu_vm.sh run -- --config=configs/qwen3_1p7b_trace.py --config.workdir=gs://B/runs/x
  launch/tpu_vm.sh logs --worker=all --follow
  launch/tpu_vm.sh babysit --max-retries=20 -- --config=configs/qwen3_8b_trace.py \
      --config.workdir=gs://B/runs/y
  launch/tpu_vm.sh --dry-run run -- --config=configs/tiny.py
EOF
}

die() {  # a usage error: exit 2
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$0" >&2
  exit 2
}
fail() {  # a runtime failure: exit 1
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}
info() { printf '[%s %s] %s\n' "$PROG" "$(date -u +%H:%M:%S)" "$*" >&2; }

# --------------------------------------------------------------------------- quoting, execution
q() {  # shell-quote one word, like Python's shlex.quote (tests shlex.split the dry-run output)
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}
qargs() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}
show() { printf '+ %s\n' "$1" >&3; }  # fd 3: stdout under --dry-run, else stderr
x() {  # run one command, or print it under --dry-run
  show "$(qargs "$@")"
  ((DRY_RUN)) && return 0
  "$@"
}
xsh() {  # run one local shell pipeline, or print it under --dry-run
  show "$1"
  ((DRY_RUN)) && return 0
  bash -c "$1"
}

# --------------------------------------------------------------------------- configuration
TPU_NAME=${TPU_NAME:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
TPU_VERSION=${TPU_VERSION:-}
TPU_SPOT=${TPU_SPOT:-0}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_QR_NAME=${TPU_QR_NAME:-}
TPU_EXTRA_CREATE_FLAGS=${TPU_EXTRA_CREATE_FLAGS:-}
TPU_SSH_FLAGS=${TPU_SSH_FLAGS:-}
TPU_CODE_DIR=${TPU_CODE_DIR:-}
TPU_REMOTE_DIR=${TPU_REMOTE_DIR:-jaxtrace}
TPU_VENV=${TPU_VENV:-jaxtrace_venv}
TPU_LOG_DIR=${TPU_LOG_DIR:-jaxtrace_logs}
TPU_INSTALLER=${TPU_INSTALLER:-uv}
TPU_PYTHON=${TPU_PYTHON:-3.12}
TPU_PREFLIGHT=${TPU_PREFLIGHT:-1}
TPU_LOCAL_PYTHON=${TPU_LOCAL_PYTHON:-python3}  # runs the preflight compile on this machine
TPU_PIP_EXTRAS=${TPU_PIP_EXTRAS:-tpu,data}
TPU_EXTRA_PIP=${TPU_EXTRA_PIP-tokenizers huggingface_hub}
TPU_SETUP_EXTRA=${TPU_SETUP_EXTRA:-}
TPU_TRAIN_ENV=${TPU_TRAIN_ENV:-}
TPU_MAX_RETRIES=${TPU_MAX_RETRIES:-10}
TPU_POLL_INTERVAL=${TPU_POLL_INTERVAL:-120}

DRY_RUN=0
FOLLOW=0
LINES=100
WORKER=""
CMD=""
ARGS=()
HAVE_DASHDASH=0

load_env_file() {  # the env file is read before the flags, so flags win
  local file="" i=1 args
  args=("$@")
  while ((i <= ${#args[@]})); do
    local a=${args[i - 1]}
    case $a in
      --) break ;;
      --env=*) file=${a#--env=} ;;
      --env)
        ((i < ${#args[@]})) || die "option --env needs a value (a file)"
        file=${args[i]}
        ;;
    esac
    i=$((i + 1))
  done
  if [[ -n $file ]]; then
    [[ -f $file ]] || die "env file not found: --env $file"
  elif [[ -f $SCRIPT_DIR/env ]]; then
    file=$SCRIPT_DIR/env
  fi
  if [[ -n $file ]]; then
    # shellcheck disable=SC1090
    source "$file"
  fi
}

set_opt() {  # set_opt FLAG VALUE
  case $1 in
    --env) ;;  # already read by load_env_file
    --name) TPU_NAME=$2 ;;
    --project) TPU_PROJECT=$2 ;;
    --zone) TPU_ZONE=$2 ;;
    --accelerator-type | --type) TPU_ACCELERATOR_TYPE=$2 ;;
    --version | --runtime-version) TPU_VERSION=$2 ;;
    --qr-name) TPU_QR_NAME=$2 ;;
    --code-dir) TPU_CODE_DIR=$2 ;;
    --worker) WORKER=$2 ;;
    --lines) LINES=$2 ;;
    --max-retries) TPU_MAX_RETRIES=$2 ;;
    --interval) TPU_POLL_INTERVAL=$2 ;;
  esac
}

parse_args() {
  local valued="--env|--name|--project|--zone|--accelerator-type|--type|--version|--runtime-version"
  valued+="|--qr-name|--code-dir|--worker|--lines|--max-retries|--interval"
  while (($#)); do
    case $1 in
      --)
        shift
        HAVE_DASHDASH=1
        ARGS=("$@")
        return 0
        ;;
      -h | --help | help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) TPU_SPOT=1 ;;
      --queued) TPU_QUEUED=1 ;;
      --on-demand) TPU_SPOT=0 TPU_QUEUED=0 ;;
      --no-preflight) TPU_PREFLIGHT=0 ;;
      --follow | -f) FOLLOW=1 ;;
      --*=*)
        local flag=${1%%=*}
        [[ "|$valued|" == *"|$flag|"* ]] || die "unknown option: $flag"
        set_opt "$flag" "${1#*=}"
        ;;
      -*)
        [[ "|$valued|" == *"|$1|"* ]] || die "unknown option: $1"
        (($# >= 2)) || die "option $1 needs a value"
        set_opt "$1" "$2"
        shift
        ;;
      *)
        [[ -z $CMD ]] || die "unexpected argument '$1' (trainer arguments go after --)"
        CMD=$1
        ;;
    esac
    shift
  done
}

as_bool() {  # as_bool NAME VALUE -> 0|1
  case ${2,,} in
    1 | true | yes | on) echo 1 ;;
    0 | false | no | off | "") echo 0 ;;
    *) die "$1 must be 0 or 1, got '$2'" ;;
  esac
}

check_uint() {  # check_uint WHAT VALUE
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

check_remote_path() {  # a path on the workers: relative to $HOME or absolute, no odd characters
  [[ $2 =~ ^[A-Za-z0-9_./-]+$ && $2 != "/" && $2 != "." && $2 != *..* ]] ||
    die "$1 must be a plain path under \$HOME (or absolute), got '$2'"
}

# shellcheck disable=SC2016  # $HOME is expanded on the worker, not here
rpath() {  # how a remote path is written inside a remote shell command
  if [[ $1 == /* ]]; then printf '"%s"' "$1"; else printf '"$HOME/%s"' "$1"; fi
}

default_version() {  # the runtime version Google recommends for JAX on each TPU generation
  case ${1%%-*} in
    v6e) echo v2-alpha-tpuv6e ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5e | v5litepod) echo v2-alpha-tpuv5-lite ;;
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

num_hosts() {  # hosts (workers) in a slice: v2-v5p count TensorCores (8 per host),
  # v5e / v6e count chips (up to 8 on one host, 4 per host in multi-host slices)
  local family=${1%%-*} n=${1##*-} h
  case $family in
    v5e | v5litepod | v6e) if ((n <= 8)); then h=1; else h=$((n / 4)); fi ;;
    *) h=$((n / 8)) ;;
  esac
  echo $((h < 1 ? 1 : h))
}

finalize_config() {
  TPU_NAME=${TPU_NAME:-jaxtrace-tpu}
  TPU_QR_NAME=${TPU_QR_NAME:-$TPU_NAME-qr}
  TPU_CODE_DIR=${TPU_CODE_DIR:-$REPO_ROOT}
  TPU_SPOT=$(as_bool TPU_SPOT "$TPU_SPOT")
  TPU_QUEUED=$(as_bool TPU_QUEUED "$TPU_QUEUED")
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU name must be lowercase letters, digits and '-', got '$TPU_NAME'"
  check_uint "--max-retries" "$TPU_MAX_RETRIES"
  check_uint "--interval" "$TPU_POLL_INTERVAL"
  check_uint "--lines" "$LINES"
  check_remote_path TPU_REMOTE_DIR "$TPU_REMOTE_DIR"
  check_remote_path TPU_VENV "$TPU_VENV"
  check_remote_path TPU_LOG_DIR "$TPU_LOG_DIR"
  local p
  for p in "$TPU_VENV" "$TPU_LOG_DIR"; do
    # The code directory is wiped on every copy.
    [[ $p != "$TPU_REMOTE_DIR" && $p != "$TPU_REMOTE_DIR"/* ]] ||
      die "'$p' is inside TPU_REMOTE_DIR=$TPU_REMOTE_DIR, which is replaced on every copy"
  done
  case $TPU_INSTALLER in uv | pip) ;; *) die "TPU_INSTALLER must be uv or pip, got '$TPU_INSTALLER'" ;; esac
  if [[ -n $WORKER && ! $WORKER =~ ^([0-9]+|all)$ ]]; then
    die "--worker must be a worker number or 'all', got '$WORKER'"
  fi
  [[ -n $TPU_ZONE ]] || die "missing zone: set TPU_ZONE in the env file or pass --zone"
  # Word-split on purpose: these hold several gcloud flags.
  read -r -a CREATE_FLAGS <<<"$TPU_EXTRA_CREATE_FLAGS"
  read -r -a SSH_FLAGS <<<"$TPU_SSH_FLAGS"
  GFLAGS=(--zone="$TPU_ZONE")
  [[ -z $TPU_PROJECT ]] || GFLAGS+=(--project="$TPU_PROJECT")
  R_CODE=$(rpath "$TPU_REMOTE_DIR")
  R_VENV=$(rpath "$TPU_VENV")
  R_LOGS=$(rpath "$TPU_LOG_DIR")
}

need_accelerator() {
  [[ -n $TPU_ACCELERATOR_TYPE ]] ||
    die "missing accelerator type: set TPU_ACCELERATOR_TYPE in the env file or pass" \
      "--accelerator-type (e.g. v5p-8, v5p-64, v6e-8, v6e-256)"
  [[ $TPU_ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die "bad accelerator type '$TPU_ACCELERATOR_TYPE' (expected e.g. v5p-8, v6e-256)"
  if [[ -z $TPU_VERSION ]]; then
    TPU_VERSION=$(default_version "$TPU_ACCELERATOR_TYPE") ||
      die "no default runtime version for accelerator type '$TPU_ACCELERATOR_TYPE'; pass --version"
  fi
}

need_trainer_args() {
  ((${#ARGS[@]})) ||
    die "$CMD needs trainer arguments after --, e.g. -- --config=configs/qwen3_1p7b_trace.py"
  local a
  for a in "${ARGS[@]}"; do [[ $a == --config=* || $a == --config ]] && return 0; done
  die "trainer arguments must include --config=configs/<name>.py"
}

preflight() {  # compile the trainer ARGS' programs for the accelerator type, here
  local a compile_args=()
  for a in "${ARGS[@]}"; do
    case $a in --distributed | --distributed=* | --nodistributed) ;; *) compile_args+=("$a") ;; esac
  done
  info "preflight: compiling the run's programs for $TPU_ACCELERATOR_TYPE (jaxtrace.compile)"
  x env -C "$TPU_CODE_DIR" "$TPU_LOCAL_PYTHON" -m jaxtrace.compile \
    --topology="$TPU_ACCELERATOR_TYPE" "${compile_args[@]}" ||
    fail "preflight: the run does not compile or fit on $TPU_ACCELERATOR_TYPE (see the table" \
      "above); nothing was created (--no-preflight to create anyway)"
}

# --------------------------------------------------------------------------- gcloud commands
tpu_ssh() {  # tpu_ssh WORKER SCRIPT
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker="$1" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} \
    --command="$2"
}

create_tpu() {
  local spot=()
  ((TPU_SPOT)) && spot=(--spot)
  local how=on-demand
  ((TPU_SPOT)) && how=spot
  ((TPU_QUEUED)) && how="queued $how"
  info "creating $TPU_ACCELERATOR_TYPE ($(num_hosts "$TPU_ACCELERATOR_TYPE") host(s)) '$TPU_NAME'" \
    "in $TPU_ZONE ($how)"
  if ((TPU_QUEUED)); then
    x gcloud compute tpus queued-resources create "$TPU_QR_NAME" "${GFLAGS[@]}" \
      --accelerator-type="$TPU_ACCELERATOR_TYPE" --runtime-version="$TPU_VERSION" \
      --node-id="$TPU_NAME" ${spot[@]+"${spot[@]}"} ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"} || return 1
  else
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${GFLAGS[@]}" \
      --accelerator-type="$TPU_ACCELERATOR_TYPE" --version="$TPU_VERSION" \
      ${spot[@]+"${spot[@]}"} ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"} || return 1
  fi
}

delete_tpu() {
  if ((TPU_QUEUED)); then
    # --force also deletes the node the queued resource provisioned.
    x gcloud compute tpus queued-resources delete "$TPU_QR_NAME" "${GFLAGS[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GFLAGS[@]}" --quiet
  fi
}

query_state() {  # query_state GCLOUD_ARGS... -> the state, NOT_FOUND, or UNKNOWN (query failed)
  show "$(qargs gcloud "$@")"
  if ((DRY_RUN)); then  # as if all is well
    case " $* " in *queued-resources*) echo ACTIVE ;; *) echo READY ;; esac
    return 0
  fi
  local out err
  err=$(mktemp)
  if out=$(gcloud "$@" 2>"$err"); then
    out=$(printf '%s' "$out" | tr -d '[:space:]')
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo NOT_FOUND
  else
    sed 's/^/  gcloud: /' "$err" >&2
    echo UNKNOWN  # a transient API or network error must not trigger a recreate
  fi
  rm -f "$err"
}

tpu_state() {  # the node's state; while a queued resource is not ACTIVE, the queued resource's
  if ((TPU_QUEUED)); then
    local qr
    qr=$(query_state compute tpus queued-resources describe "$TPU_QR_NAME" "${GFLAGS[@]}" \
      --format='value(state.state)')
    [[ $qr == ACTIVE ]] || {
      echo "$qr"
      return 0
    }
  fi
  query_state compute tpus tpu-vm describe "$TPU_NAME" "${GFLAGS[@]}" --format='value(state)'
}

state_kind() {  # READY -> ok; on its way -> wait; anything else (PREEMPTED, gone, ...) -> bad
  case $1 in
    READY) echo ok ;;
    CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | PROVISIONING | \
      WAITING_FOR_RESOURCES | UNKNOWN) echo wait ;;
    *) echo bad ;;
  esac
}

wait_ready() {  # poll until READY (0) or a state that will not become READY (1)
  local s poll=$((TPU_POLL_INTERVAL < 30 ? TPU_POLL_INTERVAL : 30))
  while :; do
    s=$(tpu_state)
    case $(state_kind "$s") in
      ok) return 0 ;;
      bad)
        info "TPU state $s: it will not become READY"
        return 1
        ;;
    esac
    info "TPU state $s; waiting for READY"
    sleep "$poll"
  done
}

# --------------------------------------------------------------------------- remote scripts
# shellcheck disable=SC2016  # expanded on the worker
worker_id_sh() {  # the worker's index, from the TPU VM metadata server
  printf '%s' 'W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)'
}
# Matches the trainer's python process only (its command line starts with the interpreter), never
# the `bash -c` shells that ssh runs, whose command lines also mention jaxtrace.train.
TRAINER_PATTERN='^[^ ]*python[^ ]* -m jaxtrace[.]train'

copy_code() {
  local tarball="${TMPDIR:-/tmp}/jaxtrace-code-$TPU_NAME.tar.gz" pack
  [[ -d $TPU_CODE_DIR ]] || fail "code directory not found: $TPU_CODE_DIR"
  if [[ -e $TPU_CODE_DIR/.git ]]; then
    # Tracked and untracked files, minus what .gitignore drops (.venv, runs/, caches).
    pack="git -C $(q "$TPU_CODE_DIR") ls-files -z --cached --others --exclude-standard"
    pack+=" | tar -C $(q "$TPU_CODE_DIR") -czf $(q "$tarball") --null -T -"
  else
    pack="tar -C $(q "$TPU_CODE_DIR") --exclude=.git --exclude=.venv --exclude=runs"
    pack+=" --exclude=__pycache__ -czf $(q "$tarball") ."
  fi
  xsh "$pack" || return 1
  x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxtrace-code.tar.gz" "${GFLAGS[@]}" \
    --worker=all ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} || return 1
  # A clean copy each time, so files deleted locally do not linger on the workers.
  tpu_ssh all "rm -rf $R_CODE && mkdir -p $R_CODE && tar -xzf \"\$HOME/jaxtrace-code.tar.gz\" -C $R_CODE" ||
    return 1
}

setup_script() {
  local pkgs s
  pkgs="$(q ".[$TPU_PIP_EXTRAS]")${TPU_EXTRA_PIP:+ $TPU_EXTRA_PIP}"
  s="set -euo pipefail; cd $R_CODE; "
  if [[ $TPU_INSTALLER == uv ]]; then
    # shellcheck disable=SC2016  # expanded on the worker
    s+='export PATH="$HOME/.local/bin:$PATH"; '
    s+='command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; '
    s+="[ -x $R_VENV/bin/python ] || uv venv --python $(q "$TPU_PYTHON") $R_VENV; "
    s+="uv pip install --python $R_VENV/bin/python $pkgs; "
  else
    s+="[ -x $R_VENV/bin/python ] || python$(q "$TPU_PYTHON") -m venv $R_VENV; "
    s+="$R_VENV/bin/pip install -U pip; $R_VENV/bin/pip install $pkgs; "
  fi
  s+="$R_VENV/bin/python -c 'import jaxtrace'"
  [[ -z $TPU_SETUP_EXTRA ]] || s+="; $TPU_SETUP_EXTRA"
  printf '%s' "$s"
}

kill_script() {
  # SIGTERM first so a live trainer saves; then whatever still holds the TPU devices.
  printf '%s' "pkill -f $(q "$TRAINER_PATTERN") || true; sleep 3; " \
    'sudo fuser -k /dev/accel* /dev/vfio/* 2>/dev/null || true; sudo rm -f /tmp/libtpu_lockfile'
}

trainer_args() {  # ARGS, plus --distributed on a multi-host slice unless the user chose
  local a
  TRAINER_ARGS=("${ARGS[@]}")
  [[ -n $TPU_ACCELERATOR_TYPE ]] && (($(num_hosts "$TPU_ACCELERATOR_TYPE") > 1)) || return 0
  for a in "${ARGS[@]}"; do
    [[ $a == --distributed* || $a == --nodistributed ]] && return 0
  done
  # The trainer's own multi-host detection reads environment variables that a plain ssh
  # session on a TPU VM may not have; on a pod slice jax.distributed must always start.
  TRAINER_ARGS=(--distributed "${ARGS[@]}")
}

launch_script() {  # the trainer, detached, on every worker; its exit code lands next to the log
  local inner outer
  trainer_args
  inner="cd $R_CODE && ${TPU_TRAIN_ENV:+$TPU_TRAIN_ENV }PYTHONUNBUFFERED=1 $R_VENV/bin/python"
  inner+=" -m jaxtrace.train $(qargs "${TRAINER_ARGS[@]}"); echo \$? > $R_LOGS/worker-\$W.exit"
  outer="mkdir -p $R_LOGS && $(worker_id_sh) && export W && rm -f $R_LOGS/worker-\$W.exit && "
  outer+="echo \"=== \$(date -u +%FT%TZ) start jaxtrace.train ===\" >> $R_LOGS/worker-\$W.log && "
  outer+="setsid nohup bash -c $(q "$inner") >> $R_LOGS/worker-\$W.log 2>&1 < /dev/null &"
  printf '%s' "$outer"
}

job_status_script() {  # on worker 0: RUNNING | EXIT <code> [preempted] | NONE
  local log="$R_LOGS/worker-0.log" code="$R_LOGS/worker-0.exit"
  printf '%s' "if pgrep -f $(q "$TRAINER_PATTERN") >/dev/null; then echo RUNNING; " \
    "elif [ -f $code ]; then c=\$(cat $code); " \
    "if [ \"\$c\" = 0 ] && tail -n 20 $log | grep -q '\"preempted\": true'; " \
    "then echo \"EXIT 0 preempted\"; else echo \"EXIT \$c\"; fi; else echo NONE; fi"
}

job_status() {
  show "$(qargs gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=0 \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$(job_status_script)")"
  if ((DRY_RUN)); then
    echo RUNNING
    return 0
  fi
  local out
  if out=$(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=0 \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$(job_status_script)"); then
    out=$(printf '%s\n' "$out" | grep -E '^(RUNNING|EXIT|NONE)' | tail -n 1)
    echo "${out:-UNKNOWN}"
  else
    echo UNKNOWN
  fi
}

# --------------------------------------------------------------------------- steps
do_setup() {
  tpu_ssh all "$(setup_script)"
}

do_launch() {
  [[ -z $TPU_ACCELERATOR_TYPE ]] ||
    info "starting the trainer on all $(num_hosts "$TPU_ACCELERATOR_TYPE") worker(s) of $TPU_ACCELERATOR_TYPE"
  tpu_ssh all "$(kill_script)" || return 1
  tpu_ssh all "$(launch_script)" || return 1
  ((DRY_RUN)) || info "started; follow with: $0 logs --follow (or --worker=all)"
}

recreate() {  # delete (it may already be gone), create, wait, setup, run
  delete_tpu || info "delete failed (the TPU may already be gone); creating anyway"
  create_tpu || return 1
  wait_ready || return 1
  copy_code || return 1
  do_setup || return 1
  do_launch || return 1
}

warn_local_workdir() {  # warn_local_workdir WHY
  case " ${ARGS[*]} " in
    *" --config.workdir=gs://"*) ;;
    *) info "warning: no --config.workdir=gs://... in the trainer arguments; $1" ;;
  esac
}

babysit() {
  local retries=0 first=1 s job
  warn_local_workdir "a recreated TPU VM starts with an empty disk; only checkpoints in GCS resume"
  if ((DRY_RUN)); then
    info "dry-run: one poll, then the recovery babysit runs when the TPU is preempted"
    tpu_state >/dev/null
    recreate
    return 0
  fi
  while :; do
    s=$(tpu_state)
    case $(state_kind "$s") in
      wait) info "TPU state $s; waiting" ;;
      bad)
        if ((first)) && [[ $s == NOT_FOUND ]]; then
          info "no TPU '$TPU_NAME' yet: creating it"
          if ! { create_tpu && wait_ready && copy_code && do_setup && do_launch; }; then
            info "bring-up failed; will retry"
          fi
        elif ((retries >= TPU_MAX_RETRIES)); then
          fail "TPU state $s after $retries of $TPU_MAX_RETRIES retries: giving up"
        else
          retries=$((retries + 1))
          info "TPU state $s: recreating (retry $retries of $TPU_MAX_RETRIES)"
          recreate || info "recovery failed; will retry"
        fi
        ;;
      ok)
        job=$(job_status)
        case $job in
          RUNNING | UNKNOWN) ;;
          "EXIT 0")
            info "the trainer finished (exit 0) after $retries retries"
            return 0
            ;;
          "EXIT 2")
            fail "the trainer exited 2 (bad configuration or input): not relaunching;" \
              "see: $0 logs"
            ;;
          *)
            if ((first)) && [[ $job == NONE ]]; then
              info "TPU READY but no trainer started yet: setup and run"
              if ! { copy_code && do_setup && do_launch; }; then
                info "bring-up failed; will retry"
              fi
            elif ((retries >= TPU_MAX_RETRIES)); then
              fail "trainer on worker 0: $job after $retries of $TPU_MAX_RETRIES retries: giving up"
            else
              retries=$((retries + 1))
              info "trainer on worker 0: $job with the TPU READY: relaunching" \
                "(retry $retries of $TPU_MAX_RETRIES)"
              if ! { copy_code && do_launch; }; then info "relaunch failed; will retry"; fi
            fi
            ;;
        esac
        ;;
    esac
    first=0
    sleep "$TPU_POLL_INTERVAL"
  done
}

cmd_logs() {
  local w=${WORKER:-0} tail_flags="-n $LINES" sed_flags=""
  ((FOLLOW)) && tail_flags+=" -F" && sed_flags="-u "
  if [[ $w == all ]]; then
    tpu_ssh all "$(worker_id_sh); tail $tail_flags $R_LOGS/worker-\$W.log | sed ${sed_flags}\"s/^/[worker \$W] /\""
  else
    tpu_ssh "$w" "tail $tail_flags $R_LOGS/worker-$w.log"
  fi
}

cmd_ssh() {
  local w=${WORKER:-0}
  if ((${#ARGS[@]})); then
    tpu_ssh "$w" "${ARGS[*]}"
  else
    [[ $w != all ]] || die "an interactive ssh needs one worker: --worker N (or give a command after --)"
    x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker="$w" \
      ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
  fi
}

cmd_status() {  # under --dry-run only the queries are shown
  local s
  if ((TPU_QUEUED)); then
    s=$(query_state compute tpus queued-resources describe "$TPU_QR_NAME" "${GFLAGS[@]}" \
      --format='value(state.state)')
    ((DRY_RUN)) || echo "queued resource $TPU_QR_NAME: $s"
  fi
  s=$(query_state compute tpus tpu-vm describe "$TPU_NAME" "${GFLAGS[@]}" --format='value(state)')
  ((DRY_RUN)) || echo "tpu $TPU_NAME: $s"
  if [[ $s == READY ]]; then
    s=$(job_status)
    ((DRY_RUN)) || echo "trainer on worker 0: $s"
  fi
}

main() {
  load_env_file "$@"
  parse_args "$@"
  [[ -n $CMD ]] || die "missing command: one of preflight, create, setup, run, logs, ssh, status, delete, babysit"
  case $CMD in
    preflight | create | setup | run | logs | ssh | status | delete | babysit) ;;
    *) die "unknown command: $CMD (expected preflight, create, setup, run, logs, ssh, status, delete, babysit)" ;;
  esac
  if ((HAVE_DASHDASH)) && [[ $CMD != run && $CMD != babysit && $CMD != ssh && $CMD != preflight && $CMD != create ]]; then
    die "$CMD takes no arguments after --"
  fi
  finalize_config
  ((DRY_RUN)) || exec 3>&2
  case $CMD in
    preflight)
      need_accelerator
      need_trainer_args
      preflight
      ;;
    create)
      need_accelerator
      if ((${#ARGS[@]})); then
        need_trainer_args
        ((TPU_PREFLIGHT)) && preflight
      else
        info "no trainer arguments after --: preflight skipped (create -- --config=... checks first)"
      fi
      create_tpu
      if ((TPU_QUEUED)); then wait_ready || fail "the queued resource did not become READY"; fi
      ;;
    setup)
      copy_code
      do_setup
      ;;
    run)
      need_trainer_args
      if [[ -n $TPU_ACCELERATOR_TYPE ]] && (($(num_hosts "$TPU_ACCELERATOR_TYPE") > 1)); then
        warn_local_workdir "on a multi-host slice every host needs the same checkpoint directory"
      fi
      copy_code
      do_launch
      ;;
    logs) cmd_logs ;;
    ssh) cmd_ssh ;;
    status) cmd_status ;;
    delete) delete_tpu ;;
    babysit)
      need_accelerator
      need_trainer_args
      babysit
      ;;
  esac
}

main "$@"
