#!/usr/bin/env bash
# On the GPU machine, in the repository root, with no network: put the carried parts back
# together, install the wheels into $SITE, and run bench/gpu_check.py (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
g=bench/gpu
if compgen -G "$g/parts/gpu.tar.part-*" >/dev/null; then
  rm -rf "$g/pack"
  cat "$g"/parts/gpu.tar.part-* | tar -x -C "$g"
fi
if [ ! -d "$g/pack/wheels" ]; then
  echo "no $g/pack: run bench/gpu_prepare.sh where PyPI is reachable and carry its parts" >&2
  exit 2
fi
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/posebatch-site}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$g"/pack/wheels/*.whl
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PWD/$g/pack/bin:$PATH"
export LD_LIBRARY_PATH="$PWD/$g/pack/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The image's CUDA 13 / cuDNN 9 libraries are pip wheels (nvidia-*, for PyTorch): onnxruntime's
# preload_dlls() finds them; their folders on the library path are the fallback if it does not.
nv=$("$PY" -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + '/nvidia/**/lib*.so*', recursive=True)})))" || true)
export LD_LIBRARY_PATH="$LD_LIBRARY_PATH${nv:+:$nv}"
if [ -d "$g/pack/dev" ]; then export POSEBATCH_DEV_DATA="$PWD/$g/pack/dev"; fi
export POSEBATCH_CACHE=${POSEBATCH_CACHE:-/tmp/posebatch-cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
model=$(ls "$g"/pack/model/*.onnx | head -1)
exec "$PY" bench/gpu_check.py --model "$model" "$@"
