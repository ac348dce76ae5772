#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as pieces small enough for one device run each:
# onnxruntime-gpu (unpacked, xz) and the serving/validation wheels (nvidia-pytriton without the stubs and the
# bundled libpython of other Pythons, tritonclient, grpcio, protobuf, python-rapidjson, polygraphy,
# onnxruntime-extensions; the numpy<2 wheel of the Triton models' environment kept as a wheel), one tar split
# into .wheelparts/p1 .. pN. scripts/device_check.sh joins them from /tmp/parts (ort_gpu_site).
#   scripts/make_devpack.sh [PIECES]     (default 5; each piece must leave room for the checkout and .sdk in a 64 MiB run)
# Then, on the device, one run per piece carrying .wheelparts/pK: `mkdir -p /tmp/parts && cp .wheelparts/pK/* /tmp/parts/`,
# and the measurements in the run of the last piece (the machine stays warm only 30 s between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PIECES=${1:-5}
PY=3.12
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version $PY --implementation cp "${plat[@]}" -d "$W/whl" "$@"; }
echo "downloading wheels for Python $PY ..."
dl onnxruntime-gpu==1.31.1 nvidia-pytriton==0.7.0 "numpy<2" tritonclient==2.73.0 grpcio==1.85.4 protobuf==6.33.6 \
   python-rapidjson==1.25 polygraphy==0.53.6 onnxruntime-extensions==0.15.2
mkdir -p "$W/ort" "$W/tpack/wheels"
(cd "$W/ort" && python3 -m zipfile -e "$W"/whl/onnxruntime_gpu-*.whl .)
mv "$W"/whl/numpy-*.whl "$W/tpack/wheels/"
python3 -m pip install -q --no-deps --no-compile --target "$W/tpack/tsite" --python-version $PY --implementation cp \
    --only-binary=:all: "${plat[@]}" $(ls "$W"/whl/*.whl | grep -v onnxruntime_gpu)
rm -f "$W"/tpack/tsite/nvidia_pytriton.libs/libpython3-*.so*
for d in "$W"/tpack/tsite/pytriton/tritonserver/python_backend_stubs/*; do [ "$(basename "$d")" = $PY ] || rm -rf "$d"; done
echo "compressing (xz -9, a few minutes) ..."
(cd "$W/ort" && tar -cf - . | xz -T0 -9 > "$W/ort.tar.xz")
(cd "$W/tpack" && tar -cf - tsite wheels | xz -T0 -9 > "$W/triton.tar.xz")
(cd "$W" && tar -cf devpack.tar ort.tar.xz triton.tar.xz)
size=$(stat -c %s "$W/devpack.tar")
per=$(( (size + PIECES - 1) / PIECES ))
rm -rf .wheelparts.new && mkdir .wheelparts.new
split -b "$per" -d -a 2 "$W/devpack.tar" "$W/part."
i=1
for f in "$W"/part.*; do mkdir -p ".wheelparts.new/p$i"; mv "$f" ".wheelparts.new/p$i/"; i=$((i + 1)); done
rm -rf .wheelparts && mv .wheelparts.new .wheelparts
grep -qx "/.wheelparts/" .git/info/exclude 2>/dev/null || echo "/.wheelparts/" >> .git/info/exclude
echo "wrote .wheelparts/p1..p$((i - 1)): $(du -sh .wheelparts | cut -f1) ($per bytes a piece)"
