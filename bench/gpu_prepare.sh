#!/usr/bin/env bash
# Here, on a machine that reaches PyPI: pack what bench/gpu_check.sh needs on a GPU machine that
# reaches nothing, and cut it into parts the device tool can carry (64 MiB per call):
#
#   bench/gpu/pack/wheels/   bench/gpu_requirements.txt, for python $TARGET_PY on x86-64
#   bench/gpu/pack/model/    the FP32 ONNX model (`posebatch model info`)
#   bench/gpu/pack/dev/      the dev set (POSEBATCH_DEV_DATA or ../shared/data/dev)
#   bench/gpu/pack/bin, lib  redis-server and the libraries a stock Ubuntu lacks for it
#   bench/gpu/parts/gpu.tar.part-00, -01, ...   tar of pack/, $PART bytes each (default 60m)
#
# bench/gpu/ is git-ignored. See bench/README.md "GPU check" for the calls that carry the parts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12}  # the GPU image's python3 (device KINDS.md: 3.12.3)
PART=${PART:-60m}
pack=bench/gpu/pack
parts=bench/gpu/parts
rm -rf "$pack" "$parts"
mkdir -p "$pack/wheels" "$pack/model" "$pack/bin" "$pack/lib" "$parts"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$pack/wheels" -r "${REQS:-bench/gpu_requirements.txt}"
cp "$("$PY" -m posebatch.cli model info | tail -1)" "$pack/model/"
# The dev set (3.6 MB): the corpus is made from it and the agreement row runs on it; the device
# tool carries the checkout only, not the ../shared beside it.
dev=$("$PY" -c "from posebatch.devdata import dev_data_dir as d; print(d() or '')")
if [ -n "$dev" ]; then cp -r "$dev" "$pack/dev"; else echo "no dev set: set POSEBATCH_DEV_DATA" >&2; exit 2; fi
redis=$(readlink -f "$(command -v redis-server)")
cp "$redis" "$pack/bin/redis-server"
for lib in $(ldd "$redis" | awk '/liblzf|libjemalloc|libatomic/ {print $3}'); do
  cp "$lib" "$pack/lib/"
done
tar -C bench/gpu -cf - pack | split -b "$PART" -d -a 2 - "$parts/gpu.tar.part-"
du -sh "$pack"
ls -l "$parts"
