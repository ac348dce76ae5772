#!/usr/bin/env bash
# One-shot GPU check for the device machine: build the plugin library, run the GPU tests, run benchmarks.
#   scripts/device_check.sh                # every section present, in order
#   scripts/device_check.sh kernels        # build + GPU kernel tests + kernel benchmarks
#   scripts/device_check.sh build tests    # individual steps
# Sections: build, tests, bench (kernels = build tests bench), ort, validate_gpu (d16 fp16 bundles validated
# through the CUDA EP, reports under $OUT), probe (the expert GEMMs alone,
# benchmarks/gemm_probe.cu; not in the default list). Other sections (e.g. ort) can be added as functions named
# section_<name> and listed in ALL.
# Results: logs and JSON under $OUT (default ./device_out); the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
export OUT PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BUILD=${ACTVAR_BUILD_DIR:-$ROOT/build/plugins}
ARCHS=${ACTVAR_CUDA_ARCHS:-90}
export ACTVAR_PLUGIN_LIB=$BUILD/libactvar_plugins.so
STATUS=0

section_build() {
    echo "== build: cmake plugins -> $BUILD (CUDA archs $ARCHS)"
    cmake -S plugins -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
        -DACTVAR_PTXAS_VERBOSE=ON > "$OUT/build.log" 2>&1 &&
        cmake --build "$BUILD" -j "$(nproc)" >> "$OUT/build.log" 2>&1
    local rc=$?
    grep -E "error|spill" "$OUT/build.log" | grep -v " 0 bytes spill" | head -20
    echo "build rc=$rc"
    return $rc
}

section_tests() {
    echo "== tests: pytest -m gpu"
    # (no junit XML: $OUT returns at most 8 files)
    ACTVAR_REQUIRE_PLUGINS=1 python3 -m pytest -m gpu tests -q -rs -p no:cacheprovider 2>&1 \
        | tee "$OUT/pytest_gpu.log" | tail -30
    local rc=${PIPESTATUS[0]}
    [ -f "$OUT/kernel_errors.json" ] && echo "expert FFN relative errors (vs float64): $(tr -d ' \n' < "$OUT/kernel_errors.json")"
    return $rc
}

section_bench() {
    echo "== bench: benchmarks/bench_kernels.py"
    # (tables on stdout, data in the JSON files: $OUT returns at most 8 files)
    python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json"
    local rc=$?
    # power, SM clock and energy per call under sustained load (dense vs expert FFN, the dense GEMMs alone)
    python3 benchmarks/bench_power.py --json "$OUT/bench_power.json"
    local rp=$?
    return $((rc || rp))
}

section_probe() {
    # the expert-FFN GEMMs alone (benchmarks/gemm_probe.cu) at the large shapes; PROBE_CFGS lists the
    # ACTVAR_FC1_CFG values to compare (0 = automatic), PROBE_SHAPES the "C T" pairs, comma-separated;
    # PROBE_TRACE=1 adds the warp-specialised kernel's per-tile cycle breakdown and its epilogue's phases
    # (-DACTVAR_WS_TRACE); PROBE_SECONDS=s the sustained (power-capped) mode, PROBE_LINES a subset of the lines.
    # With the cuBLASLt header of the nvidia Python wheel (torch's) the probe adds cuBLASLt's GEMMs of the same
    # useful FLOPs, loading that wheel's libcublasLt.so.13.
    echo "== probe: benchmarks/gemm_probe.cu"
    mkdir -p build/probe
    local trace="" lt=() ltlib ldpath=${LD_LIBRARY_PATH:-}
    [ "${PROBE_TRACE:-0}" = 1 ] && trace=-DACTVAR_WS_TRACE
    ltlib=$(python3 -c "
import nvidia, os
print(next((d for d in (os.path.join(p, 'cu13') for p in nvidia.__path__)
            if os.path.isfile(os.path.join(d, 'include', 'cublasLt.h'))), ''))" 2>/dev/null)
    if [ -n "$ltlib" ]; then
        lt=(-DACTVAR_HAVE_CUBLASLT "-I$ltlib/include" plugins/expert_routing/dense_lt.cu -ldl)
        ldpath=$ltlib/lib${ldpath:+:$ldpath}
    fi
    nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DACTVAR_HAVE_SM90A $trace --expt-relaxed-constexpr \
        -Iplugins/common -Iplugins/expert_routing benchmarks/gemm_probe.cu plugins/expert_routing/gemm_sm90.cu \
        plugins/expert_routing/gemm_sm90_ws.cu "${lt[@]}" -o build/probe/gemm_probe || return 1
    local cfg shape shapes
    IFS=',' read -ra shapes <<< "${PROBE_SHAPES:-1024 24576,1920 24576,1024 6144,1920 4064}"
    for shape in "${shapes[@]}"; do
        for cfg in ${PROBE_CFGS:-0}; do
            if [ "$cfg" = 0 ]; then LD_LIBRARY_PATH=$ldpath build/probe/gemm_probe $shape
            else LD_LIBRARY_PATH=$ldpath ACTVAR_FC1_CFG=$cfg build/probe/gemm_probe $shape; fi
        done
    done 2>&1 | tee "$OUT/probe.log"
    return ${PIPESTATUS[0]}
}

section_kernels() { section_build && section_tests; local a=$?; section_bench; local b=$?; return $((a || b)); }

section_ort() {
    # ONNX Runtime with the CUDA execution provider: the onnxruntime-gpu wheel is carried in pieces
    # (.wheelparts, see ../shared/device/README.md) and joined under /tmp/parts by earlier runs.
    echo "== ort: onnxruntime-gpu bundle validation + throughput"
    local whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    if [ ! -d /tmp/site/onnxruntime ]; then
        [ -d /tmp/parts ] || { echo "no /tmp/parts: carry .wheelparts first"; return 1; }
        cat /tmp/parts/part.* > "$whl" && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$whl" || return 1
    fi
    # ORT_BENCH_ARGS overrides the configuration (default: the issue's d16 fp16 batch 16)
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/bench_ort.py ${ORT_BENCH_ARGS:---depth 16 --batch 16 --precision fp16} \
        --workdir "/tmp/ortbench_$$" --json "$OUT/bench_ort.json" 2>&1 | tee "$OUT/bench_ort.log" | tail -40
    return ${PIPESTATUS[0]}
}

section_validate_gpu() {
    # d16 fp16 bundles (portable, and plugin: its ActVarExpertFFN/TokenScatter run through ONNX Runtime's
    # Python custom ops, or the GPU runtime once it lands) validated through ONNX Runtime's CUDA EP under the
    # rules of docs/validation.md; the reports (report.md, grid.png, errors.png) come back under $OUT.
    # Needs onnxruntime-gpu as section_ort installs it.
    echo "== validate_gpu: d16 fp16 bundles through the CUDA EP"
    local w=/tmp/validate_gpu_$$ rc=0
    mkdir -p "$w"
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 -m actvar_export init-ckpt --depth 16 --out "$w/d16.pt" || return 1
    for low in portable plugin; do
        python3 -m actvar_export build --ckpt "$w/d16.pt" --out "$w/b_$low" --batch 4 --precision fp16 --lowering $low --force || { rc=1; continue; }
        python3 -m actvar_export validate --bundle "$w/b_$low" --ckpt "$w/d16.pt" --providers cuda,cpu \
            --report "$w/report_$low" 2>&1 | tee "$OUT/validate_d16_fp16_$low.log" | tail -20
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        # one file per report ($OUT returns few files); polygraphy/ (d16 caches, large) stays behind
        tar -C "$w/report_$low" -cf "$OUT/validate_d16_fp16_$low.tar" report.md report.json errors.png grid.png
    done
    rm -rf "$w"
    return $rc
}

ALL=(kernels)
for s in ort validate_gpu; do declare -F "section_$s" > /dev/null && ALL+=("$s"); done
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=("${ALL[@]}")

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
for s in "${SECTIONS[@]}"; do
    if declare -F "section_$s" > /dev/null; then
        "section_$s" || { echo "!! section $s failed"; STATUS=1; }
    else
        echo "!! unknown section: $s"; STATUS=2
    fi
done
echo "== device_check done, status $STATUS"
exit $STATUS
