#!/usr/bin/env bash
# Runs `localsteer chat` in tmux at 100x30 on the default model, types a message, waits for the
# reply, and prints the screen (tmux capture-pane). Extra arguments go to `localsteer chat`.
#
#   scripts/tui_demo.sh                      # happy-sad vector at 4, rejection top-10, greedy
#   MESSAGE="Describe a rainy day." scripts/tui_demo.sh --vector vectors/smollm2-135m-instruct/happy-sad.gguf:2 --threads 1
# Arguments replace the default vector and rejection setting.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v tmux >/dev/null; then
    apt-get update -qq && apt-get install -y -qq tmux >/dev/null
fi
LOCALSTEER=${LOCALSTEER:-$(command -v localsteer || echo .venv/bin/localsteer)}
MESSAGE=${MESSAGE:-"How was your day?"}
SESSION="localsteer-demo-$$"
WIDTH=${WIDTH:-100} HEIGHT=${HEIGHT:-30}

if (($# == 0)); then
    set -- --vector vectors/smollm2-135m-instruct/happy-sad.gguf:4 --reject-topk 10
fi
cmd=("$LOCALSTEER" chat --temperature 0 --max-tokens 48 "$@")
tmux new-session -d -s "$SESSION" -x "$WIDTH" -y "$HEIGHT" "$(printf '%q ' "${cmd[@]}")"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true' EXIT

screen() { tmux capture-pane -p -t "$SESSION"; }

wait_for() {  # wait_for REGEX SECONDS
    local end=$((SECONDS + $2))
    until screen | grep -Eq "$1"; do
        if ((SECONDS > end)); then echo "timed out waiting for /$1/:" >&2; screen >&2; exit 1; fi
        sleep 0.5
    done
}

wait_for '│ ?(CPU|CUDA|Metal) ?│' 120          # the status bar names the backend once loaded
tmux send-keys -t "$SESSION" "$MESSAGE" Enter
wait_for '[0-9.]+ (tok|t)/s' 300                  # the first tokens are in
# the reply is done when the screen stops changing
prev="" same=0
while ((same < 4)); do
    sleep 0.5
    now=$(screen)
    if [[ "$now" == "$prev" ]]; then same=$((same + 1)); else same=0; prev=$now; fi
done
screen
