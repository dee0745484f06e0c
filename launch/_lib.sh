# Helpers shared by the launch scripts (sourced, not run).
# Every script: checks its inputs, prints the command it resolved to, then runs it
# (or only prints it with --dry-run / DRY_RUN=1).

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
SCRIPT_NAME="launch/$(basename "$0")"
DRY_RUN="${DRY_RUN:-0}"

say() { echo "[$SCRIPT_NAME] $*"; }
die() { echo "[$SCRIPT_NAME] error: $*" >&2; exit 2; }

# The Python that has attnrl installed: $PYTHON, else the repo's .venv, else python3.
find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an executable"
    elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        PYTHON="$REPO_ROOT/.venv/bin/python"
    else
        PYTHON="$(command -v python3 || true)"
        [[ -n "$PYTHON" ]] || die "no python found: set PYTHON=/path/to/python"
    fi
    "$PYTHON" -c "import attnrl" 2>/dev/null || die "$PYTHON cannot import attnrl: install \
the package (make install) or set PYTHON to the interpreter of its environment"
}

# Number of GPUs this process may use (CUDA_VISIBLE_DEVICES respected); 0 without GPUs.
gpu_count() {
    local physical=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        physical="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$physical" -gt 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local ids
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        echo "$physical"
    fi
}

need_file() {  # need_file PATH WHAT HINT
    [[ -n "$1" ]] || die "$2 not given: $3"
    [[ -f "$1" && -r "$1" ]] || die "$2 '$1' not found or not readable: $3"
}

need_int() {  # need_int VALUE NAME
    [[ "$1" =~ ^[0-9]+$ ]] || die "$2 must be a whole number, got '$1'"
}

check_ds_config() {  # a readable DeepSpeed JSON config
    need_file "$1" "DeepSpeed config" "give --ds-config configs/deepspeed/zero2.json (or zero3.json)"
    "$PYTHON" -c "import json,sys; json.load(open(sys.argv[1]))" "$1" 2>/dev/null \
        || die "DeepSpeed config '$1' is not valid JSON"
}

port_free() {  # port_free HOST PORT: exit status 0 when the port can be bound here
    "$PYTHON" - "$1" "$2" <<'EOF' 2>/dev/null
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
EOF
}

# Keys whose values print_and_run never prints (the --env-file lines: API keys and the
# like land in job logs such as slurm-*.out otherwise); a script adds to it.
HIDDEN_KEYS=()

# print_and_run VAR=VALUE... -- COMMAND ARGS...: print the resolved command, then exec it.
# The value of a VAR in HIDDEN_KEYS is printed as <hidden>.
print_and_run() {
    local assignments=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do assignments+=("$1"); shift; done
    shift
    local line="+"
    local item key hidden
    for item in "${assignments[@]}"; do
        key="${item%%=*}" hidden=0
        for h in "${HIDDEN_KEYS[@]}"; do [[ "$h" == "$key" ]] && hidden=1; done
        if [[ "$hidden" == "1" ]]; then line+=" $key=<hidden>"
        else line+=" $(printf '%q' "$item")"; fi
    done
    for item in "$@"; do line+=" $(printf '%q' "$item")"; done
    say "command:"
    echo "$line"
    if [[ "$DRY_RUN" == "1" ]]; then
        say "dry run: not started"
        exit 0
    fi
    for item in "${assignments[@]}"; do export "${item?}"; done
    exec "$@"
}
