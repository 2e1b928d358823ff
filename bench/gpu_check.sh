#!/bin/sh
# The GPU check in one command, from the repository root, on a bare GPU machine with no network:
#   sh bench/gpu_check.sh             # full check (CUDA provider)
#   sh bench/gpu_check.sh --dry-run   # same steps on the CPU provider, tiny sizes
# Wheels come from bench/wheels (made beforehand, with network, by `make -C bench gpu-wheels`);
# without that folder pip uses the index. The model is not built here (no torch on the GPU
# machine): carry ~/.cache/posebatch along, or set POSEBATCH_CACHE to a copy of it.
set -eu
WHEELS=${WHEELS:-bench/wheels}
VENV=${VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ -d "$WHEELS" ]; then
  "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" -e '.[gpu,dev]'
else
  "$VENV/bin/pip" install -q -e '.[gpu,dev]'
fi
"$VENV/bin/posebatch" model info | tail -n 1
exec "$VENV/bin/python" bench/gpu_check.py "$@"
