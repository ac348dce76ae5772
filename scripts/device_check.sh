#!/usr/bin/env bash
# One-shot GPU check for the device machine: build the plugin library, run the GPU tests, run benchmarks.
#   scripts/device_check.sh                # every section present, in order
#   scripts/device_check.sh kernels        # build + GPU kernel tests + kernel benchmarks
#   scripts/device_check.sh build tests    # individual steps
# Sections: build, tests, bench (kernels = build tests bench), ort (the bundle runtime vs eager), triton (serving throughput), validate_gpu (d16 fp16 bundles validated
# through the CUDA EP, reports under $OUT), ortops (the
# ONNX Runtime custom-op library plugins/ort and its GPU tests), trtplugins (the TensorRT plugin library's test
# program: enqueue on the GPU compared with the reference ops), probe (the expert GEMMs alone,
# benchmarks/gemm_probe.cu; not in the default list), ortopts (the runtime under several environments: an A/B of
# its settings; not in the default list), ortpytest (GPU tests that need onnxruntime-gpu), py (one Python file with
# onnxruntime-gpu on the path, PY_FILE), triton_gpus (Triton with the instances on GPU 0 vs on every GPU:
# images/s ratio and checked images; needs 2+ GPUs, not in the default list). Other sections can be added as functions named
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

ort_gpu_site() {
    # onnxruntime-gpu (unpacked under /tmp/site) and the serving/validation wheels (/tmp/tpack/tsite, the numpy<2
    # wheel for the Triton models' environment under /tmp/tpack/wheels). They travel as .wheelparts/pN/part.K,
    # pieces of one tar of ort.tar.xz + triton.tar.xz, copied to /tmp/parts by one run each (each run carries at
    # most 64 MiB), joined here on first use.
    if [ ! -d /tmp/site/onnxruntime ]; then
        [ -d /tmp/parts ] || { echo "no /tmp/parts: carry .wheelparts/pN first"; return 1; }
        mkdir -p /tmp/site /tmp/tpack && (cd /tmp/tpack && cat /tmp/parts/part.* | tar -xf - &&
            xz -T0 -dc ort.tar.xz | tar -xf - -C /tmp/site && xz -T0 -dc triton.tar.xz | tar -xf - &&
            rm -f ort.tar.xz triton.tar.xz) || { echo "cannot unpack /tmp/parts"; rm -rf /tmp/site; return 1; }
    fi
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site:/tmp/tpack/tsite:$PYTHONPATH ;; esac
    export TRITON_WHEELS=${TRITON_WHEELS:-/tmp/tpack/wheels}
}

section_prep() {
    # what needs no ONNX Runtime GPU build, ahead of the runs that do (start it in the background while the
    # wheel pieces travel): the plugin libraries (with the custom-op library when the ONNX Runtime headers are
    # carried as .sdk/onnxruntime-1.29/include) and the random-weight checkpoints of section ort / plugin. The device tool copies
    # the checkout afresh on every call and drops the ignored paths a call does not carry: carry .sdk on every call
    # until this section has built.
    local W=/tmp/ortrt inc=$ROOT/.sdk/onnxruntime-1.29/include extra=()
    mkdir -p "$W"
    [ -f "$inc/onnxruntime_c_api.h" ] && extra=(-DONNXRUNTIME_INCLUDE_DIR="$inc")
    cmake -S plugins -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" "${extra[@]}" \
        > /tmp/prep_build.log 2>&1 && cmake --build "$BUILD" -j "$(nproc)" >> /tmp/prep_build.log 2>&1
    echo "prep build rc=$?"
    for d in ${PREP_DEPTHS:-16 30}; do
        [ -f "$W/d$d.pt" ] || python3 -m actvar_export init-ckpt --depth "$d" --out "$W/d$d.pt" > /dev/null
    done
    echo "prep done"
}

section_ort() {
    # The bundle runtime on ONNX Runtime's CUDA provider against the eager reference, in one process per
    # configuration (`bench`), after the exactness check. The onnxruntime-gpu wheel is carried in pieces
    # (.wheelparts, see ../shared/device/README.md) and joined under /tmp/parts by earlier runs.
    #   ORT_CONFIGS  "depth:batch ..." fp16 bundles to bench (default: d16 B1, B16; d30 B1, B16, B32)
    #   ORT_ITERS    timed runs per side (default 10); ORT_PROFILE=1 adds the kernel profile to each bench
    #   batch-1 runs also generate once without CUDA graphs / bound buffers and compare the ids (--check-ids)
    #   ORT_EXACT=0  skips the fp32 exactness check (d16 batch 1, TF32 off, teacher-forced per scale)
    #   ACTVAR_ORT_CUDA_OPTIONS="prefer_nhwc=1,..." extra CUDA provider options for the runtime (recorded in the JSON)
    echo "== ort: bundle runtime (ONNX Runtime CUDA) vs eager PyTorch"
    ort_gpu_site || return 1
    local W=/tmp/ortrt rc=0 c d b chk prof=()
    mkdir -p "$W"
    [ "${ORT_PROFILE:-0}" = 1 ] && prof=(--profile "$W/profile")
    python3 -c "import onnxruntime, torch; print('onnxruntime', onnxruntime.__version__, 'torch', torch.__version__)"
    # the fusions the kernel counts assume (tests/test_launches.py: ONNX Runtime's CUDA provider fuses each q/k RMS
    # pattern with its Casts into one SimplifiedLayerNormalization)
    python3 -m pytest -m gpu tests/test_launches.py -q -rs -p no:cacheprovider 2>&1 | tail -3
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    if [ "${ORT_EXACT:-1}" = 1 ]; then
        [ -f "$W/d16.pt" ] || python3 -m actvar_export init-ckpt --depth 16 --out "$W/d16.pt" > /dev/null
        python3 -m actvar_export build --ckpt "$W/d16.pt" --out "$W/d16_fp32" --batch 1 --precision fp32 --force 2> /dev/null &&
            python3 -m actvar_export validate --bundle "$W/d16_fp32" --ckpt "$W/d16.pt" --providers cuda \
                --json "$OUT/validate_d16_fp32_cuda.json" 2> "$W/err.log" || { rc=1; tail -5 "$W/err.log"; }
        rm -rf "$W/d16_fp32"
    fi
    for c in ${ORT_CONFIGS:-16:1 16:16 30:1 30:16 30:32}; do
        d=${c%%:*}; b=${c##*:}; chk=(); [ "$b" = 1 ] && chk=(--check-ids)
        [ -f "$W/d$d.pt" ] || python3 -m actvar_export init-ckpt --depth "$d" --out "$W/d$d.pt" > /dev/null || return 1
        python3 -m actvar_export build --ckpt "$W/d$d.pt" --out "$W/d${d}_b$b" --batch "$b" --precision fp16 --force \
            2> "$W/err.log" || { rc=1; tail -5 "$W/err.log"; continue; }
        python3 -m actvar_export bench --bundle "$W/d${d}_b$b" --ckpt "$W/d$d.pt" --iters "${ORT_ITERS:-10}" "${prof[@]}" "${chk[@]}" \
            --json "$OUT/bench_d${d}_b$b.json" 2> "$W/err.log" || { rc=1; tail -5 "$W/err.log"; }
        rm -rf "$W/d${d}_b$b"
    done
    return $rc
}

section_ortopts() {
    # The runtime alone (no eager side) on one bundle per configuration under several environments, one process
    # each, same bundle: an A/B of the runtime's settings (README "The runtime"). OPTS_CONFIGS "depth:batch ..."
    # (default 16:16); OPTS_SETS space-separated environments, each "-" (none) or NAME=value[;NAME=value], e.g.
    # ACTVAR_ORT_CUDA_OPTIONS=prefer_nhwc=1 (default "- ACTVAR_ORT_CUDA_OPTIONS=prefer_nhwc=1"); OPTS_ITERS (default 5);
    # OPTS_PROFILE=1 adds the kernel profile to each JSON (ortopts_d<D>_b<B>_<k>.json, k = the set's position).
    echo "== ortopts: the runtime under several environments"
    ort_gpu_site || return 1
    local W=/tmp/ortrt rc=0 c d b set k prof=() env=() a
    mkdir -p "$W"
    [ "${OPTS_PROFILE:-0}" = 1 ] && prof=(--profile "$W/profile")
    for c in ${OPTS_CONFIGS:-16:16}; do
        d=${c%%:*}; b=${c##*:}; k=0
        [ -f "$W/d$d.pt" ] || python3 -m actvar_export init-ckpt --depth "$d" --out "$W/d$d.pt" > /dev/null || return 1
        python3 -m actvar_export build --ckpt "$W/d$d.pt" --out "$W/o_d${d}_b$b" --batch "$b" --precision fp16 --force \
            2> "$W/err.log" || { tail -5 "$W/err.log"; rc=1; continue; }
        for set in ${OPTS_SETS:-- ACTVAR_ORT_CUDA_OPTIONS=prefer_nhwc=1}; do
            k=$((k + 1)); env=()
            [ "$set" = - ] || { IFS=';' read -ra a <<< "$set"; env=("${a[@]}"); }
            echo "-- d$d batch $b, environment: ${env[*]:-(none)}"
            env "${env[@]}" python3 -m actvar_export bench --bundle "$W/o_d${d}_b$b" --iters "${OPTS_ITERS:-5}" \
                "${prof[@]}" --json "$OUT/ortopts_d${d}_b${b}_$k.json" 2> "$W/err.log" |
                grep -E "images / s|CUDA graphs|peak|ms / batch" || { rc=1; tail -5 "$W/err.log"; }
        done
        rm -rf "$W/o_d${d}_b$b"
    done
    return $rc
}

section_ortpytest() {
    # pytest -m gpu on the tests that need the GPU build of ONNX Runtime (ORT_TESTS, default the runtime's and the
    # launch counts'), the plugin libraries of section prep/build on their path.
    echo "== ortpytest: pytest -m gpu with onnxruntime-gpu"
    ort_gpu_site || return 1
    ACTVAR_REQUIRE_PLUGINS=1 python3 -m pytest -m gpu ${ORT_TESTS:-tests/test_runtime.py tests/test_launches.py} -q -rs -s \
        -p no:cacheprovider 2>&1 | tee "$OUT/pytest_ort.log" | tail -25
    return "${PIPESTATUS[0]}"
}

section_py() {
    # one Python file (PY_FILE) with the GPU build of ONNX Runtime on the path: probes of ONNX Runtime's operators
    echo "== py: $PY_FILE"
    ort_gpu_site || return 1
    python3 "$PY_FILE" 2>&1 | tee "$OUT/py.log" | tail -40
    return "${PIPESTATUS[0]}"
}

section_trtplugins() {
    # libactvar_trt_plugins.so + its test program for sm_90 (no TensorRT needed on the device: only its headers,
    # ACTVAR_TRT_INCLUDE, else ../shared/sdk/tensorrt-11.1/include, else .sdk/tensorrt-11.1/include carried into the checkout),
    # then the program's CPU checks, and its enqueue on the GPU compared with the reference ops by pytest.
    local inc=${ACTVAR_TRT_INCLUDE:-}
    for c in "$ROOT/../shared/sdk/tensorrt-11.1/include" "$ROOT/.sdk/tensorrt-11.1/include"; do
        [ -z "$inc" ] && [ -f "$c/NvInferRuntime.h" ] && inc=$c
    done
    [ -n "$inc" ] || { echo "no TensorRT headers: set ACTVAR_TRT_INCLUDE or carry them as .sdk/tensorrt-11.1/include"; return 1; }
    echo "== trtplugins: cmake plugins (TensorRT headers $inc) -> $BUILD (CUDA archs $ARCHS)"
    cmake -S plugins -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
        -DTensorRT_INCLUDE_DIR="$inc" -DACTVAR_TRT_BUILD_TESTS=ON > "$OUT/trt_build.log" 2>&1 &&
        cmake --build "$BUILD" -j "$(nproc)" --target actvar_trt_plugin_test >> "$OUT/trt_build.log" 2>&1 ||
        { tail -20 "$OUT/trt_build.log"; return 1; }
    "$BUILD/trt/actvar_trt_plugin_test" > "$OUT/trt_plugin_test.log" 2>&1
    local checks=$?
    tail -3 "$OUT/trt_plugin_test.log"
    [ $checks -eq 0 ] || return 1
    ACTVAR_REQUIRE_PLUGINS=1 ACTVAR_TRT_PLUGIN_TEST="$BUILD/trt/actvar_trt_plugin_test" \
        python3 -m pytest tests/test_trt_plugins_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_trt_plugins.log" | tail -15
    local rc=${PIPESTATUS[0]}
    grep -q " passed" "$OUT/pytest_trt_plugins.log" || { echo "!! no enqueue test ran (no GPU?)"; rc=1; }
    [ -f "$OUT/trt_plugin_errors.json" ] && echo "expert FFN relative errors (vs float64): $(tr -d ' \n' < "$OUT/trt_plugin_errors.json")"
    return $rc
}

section_plugin() {
    # ActVAR's saving on the GPU: `plugin` bundles (the custom-op library's CUDA kernels) against the dense bundle
    # of the same checkpoint (`--active-scales ''`: no dynamic activation), both fp16 through the runtime, one
    # `bench` process each (no eager side). PLUGIN_CONFIGS "depth:batch ..." (default d30 B16, B32; d16 B16).
    echo "== plugin: ActVAR plugin bundles vs the dense bundle of the same model (runtime, CUDA)"
    ort_gpu_site || return 1
    local W=/tmp/ortrt rc=0 c d b kind
    mkdir -p "$W"
    for c in ${PLUGIN_CONFIGS:-30:16 30:32 16:16}; do
        d=${c%%:*}; b=${c##*:}
        [ -f "$W/d$d.pt" ] || python3 -m actvar_export init-ckpt --depth "$d" --out "$W/d$d.pt" > /dev/null || return 1
        for kind in plugin dense; do
            local args=(--lowering plugin)
            [ $kind = dense ] && args=(--lowering portable --active-scales "")
            python3 -m actvar_export build --ckpt "$W/d$d.pt" --out "$W/p_d${d}_b${b}_$kind" --batch "$b" --precision fp16 \
                "${args[@]}" --force 2> "$W/err.log" || { rc=1; tail -5 "$W/err.log"; continue; }
            python3 -m actvar_export bench --bundle "$W/p_d${d}_b${b}_$kind" --iters "${PLUGIN_ITERS:-10}" \
                --json "$OUT/plugin_d${d}_b${b}_$kind.json" 2> "$W/err.log" | grep -E "images / s|CUDA graphs|peak" ||
                { rc=1; tail -5 "$W/err.log"; }
            rm -rf "$W/p_d${d}_b${b}_$kind"
        done
    done
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = []
for f in sorted(glob.glob(os.path.join(out, "plugin_d*_plugin.json"))):
    g = f.replace("_plugin.json", "_dense.json")
    if not os.path.exists(g):
        continue
    p, q = json.load(open(f)), json.load(open(g))
    rows.append({"depth": p["bundle"]["depth"], "batch": p["bundle"]["batch"],
                 "plugin_images_per_s": p["runtime"]["images_per_s"], "dense_images_per_s": q["runtime"]["images_per_s"],
                 "speedup": p["runtime"]["images_per_s"] / q["runtime"]["images_per_s"],
                 "plugin_graphs": p["runtime"].get("cuda_graphs"), "dense_graphs": q["runtime"].get("cuda_graphs")})
json.dump({"device": p["device"] if rows else None, "versions": p.get("versions") if rows else None, "rows": rows},
          open(os.path.join(out, "bench_plugin_vs_dense.json"), "w"), indent=1)
print("| depth | batch | plugin images/s | dense images/s | speed-up |")
for r in rows:
    print(f"| d{r['depth']} | {r['batch']} | {r['plugin_images_per_s']:.1f} | {r['dense_images_per_s']:.1f} | {r['speedup']:.3f} |")
PY
    return $rc
}

build_ort_ops() {
    # libactvar_ort_ops.so into $BUILD/ort against the ONNX Runtime C API headers in $1, appending to the log $2
    cmake -S plugins -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
        -DONNXRUNTIME_INCLUDE_DIR="$1" >> "$2" 2>&1 &&
        cmake --build "$BUILD" -j "$(nproc)" --target actvar_ort_ops >> "$2" 2>&1
}

section_ortops() {
    # libactvar_ort_ops.so (plugins/ort) for sm_90 against the ONNX Runtime C API headers, then its GPU tests on
    # onnxruntime-gpu: ONNXRUNTIME_INCLUDE_DIR names the headers (../shared does not travel to the device: carry a
    # copy inside the checkout, e.g. .sdk/onnxruntime-1.29/include ignored through .git/info/exclude)
    local headers=${ONNXRUNTIME_INCLUDE_DIR:-$ROOT/.sdk/onnxruntime-1.29/include}
    echo "== ortops: libactvar_ort_ops.so (CUDA archs $ARCHS, headers $headers) + tests/test_ort_ops.py on onnxruntime-gpu"
    [ -f "$headers/onnxruntime_c_api.h" ] || { echo "no onnxruntime_c_api.h in $headers"; return 1; }
    ort_gpu_site || return 1
    : > "$OUT/build_ortops.log"
    build_ort_ops "$headers" "$OUT/build_ortops.log" || { tail -20 "$OUT/build_ortops.log"; return 1; }
    ACTVAR_ORT_OPS_LIB=$BUILD/ort/libactvar_ort_ops.so ACTVAR_REQUIRE_ORT_OPS=1 PYTHONPATH=/tmp/site:$PYTHONPATH \
        python3 -m pytest -m gpu tests/test_ort_ops.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_ortops.log" | tail -30
    return ${PIPESTATUS[0]}
}

section_cpp() {
    # engines/ (actvar-run) on the GPU against the Python runtime: ids identical, images/s at batch 1 and 16,
    # d16 fp16 portable, then plugin (the project's ONNX Runtime custom-op library: ACTVAR_ORT_OPS_LIB, else built
    # here as section ortops does). Uses the onnxruntime-gpu wheel of section ort (/tmp/site) for both sides.
    # Headers: ../shared does not travel to the device; ONNXRUNTIME_INCLUDE_DIR / ACTVAR_TRT_INCLUDE, else the
    # copies carried inside the checkout (.sdk/onnxruntime-1.29/include, .sdk/tensorrt-11.1/include).
    local ort_inc=${ONNXRUNTIME_INCLUDE_DIR:-$ROOT/.sdk/onnxruntime-1.29/include}
    local trt_inc=${ACTVAR_TRT_INCLUDE:-$ROOT/.sdk/tensorrt-11.1/include}
    local b=$ROOT/build/engines_gpu rc=0 ops=${ACTVAR_ORT_OPS_LIB:-}
    echo "== cpp: engines/ build + actvar-run vs the Python runtime (headers $ort_inc, $trt_inc)"
    [ -f "$ort_inc/onnxruntime_c_api.h" ] || { echo "no onnxruntime_c_api.h in $ort_inc"; return 1; }
    [ -f "$trt_inc/NvInferRuntime.h" ] || { echo "no NvInferRuntime.h in $trt_inc"; return 1; }
    ort_gpu_site || return 1
    cmake -S engines -B "$b" -DONNXRUNTIME_INCLUDE_DIR="$ort_inc" -DONNXRUNTIME_LIB_DIR=/tmp/site/onnxruntime/capi \
        -DTensorRT_INCLUDE_DIR="$trt_inc" > "$OUT/cpp_build.log" 2>&1 && cmake --build "$b" -j "$(nproc)" >> "$OUT/cpp_build.log" 2>&1 ||
        { tail -20 "$OUT/cpp_build.log"; return 1; }
    if [ -z "$ops" ]; then
        build_ort_ops "$ort_inc" "$OUT/cpp_build.log" && ops=$BUILD/ort/libactvar_ort_ops.so ||
            echo "!! libactvar_ort_ops.so did not build (see cpp_build.log)"
    fi
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/bench_cpp.py --actvar-run "$b/actvar-run" --lowering portable \
        --workdir "/tmp/cppbench_$$" --json "$OUT/bench_cpp_portable.json" > "$OUT/bench_cpp.log" 2>&1 || rc=1
    if [ -n "$ops" ]; then
        PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/bench_cpp.py --actvar-run "$b/actvar-run" --lowering plugin \
            --custom-op-library "$ops" --workdir "/tmp/cppbench_$$" --json "$OUT/bench_cpp_plugin.json" \
            >> "$OUT/bench_cpp.log" 2>&1 || rc=1
    else
        rc=1
    fi
    rm -rf "/tmp/cppbench_$$"
    grep -E "^(d16|batch|  C\+\+|  Python|Error|Traceback)" "$OUT/bench_cpp.log"; tail -3 "$OUT/bench_cpp.log"
    return $rc
}


section_triton() {
    # Triton serving throughput (benchmarks/bench_triton.py) over the GPU runtime: the `python` repository of a
    # d16 bundle at 1, 4, 16 concurrent clients beside the in-process runtime. The device reaches no package
    # index: TRITON_WHEELS (default /tmp/triton_wheels) must hold the wheels for this Python: nvidia-pytriton
    # 0.7.0 and tritonclient[grpc] come unpacked with the ONNX Runtime pieces (ort_gpu_site), the numpy<2 wheel of the
    # models' environment beside them (TRITON_WHEELS); pip reads it through PIP_NO_INDEX / PIP_FIND_LINKS.
    echo "== triton: tritonserver (nvidia-pytriton) vs in-process images/s"
    ort_gpu_site || return 1
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=$TRITON_WHEELS
    # the server binary is located, not imported (pytriton's own client needs gevent, absent here)
    python3 -c "import importlib.util, tritonclient.grpc; assert importlib.util.find_spec('pytriton'), 'no pytriton'" || return 1
    # TRITON_BENCH_ARGS: the benchmark's arguments; several runs separated by ';' (JSON bench_triton.json, then
    # bench_triton_2.json, ...), e.g. "--batch 16 --clients 1,4,16; --batch 8 --clients 16"
    local runs i=0 args tag rc=0
    IFS=';' read -ra runs <<< "${TRITON_BENCH_ARGS:---depth 16 --batch 16 --precision fp16}"
    for args in "${runs[@]}"; do
        i=$((i + 1)); tag=$([ $i = 1 ] && echo "" || echo "_$i")
        echo "-- bench_triton.py $args"
        python3 benchmarks/bench_triton.py $args --workdir "/tmp/tritonbench_$$" --json "$OUT/bench_triton$tag.json" 2>&1 |
            tee "$OUT/bench_triton$tag.log" | tr '\r' '\n' | grep -v '%|' | tail -12
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    done
    return $rc
}

section_triton_gpus() {
    # Triton on several GPUs: a d16 fp16 bundle (batch TG_BATCH, default 16) through the `python` repository written
    # with --gpus 0, served as it is and then with `serve --gpus all`; loadtest at TG_CONCURRENCY (default 32)
    # gRPC clients, TG_REQUESTS (default 1024) one-image requests after a warm-up, every image checked against the
    # in-process runtime (--bundle); prints the images/s ratio all/0 (target: >= 1.8 on 2 GPUs, zero wrong images).
    # Wheels as section triton (TRITON_WHEELS); onnxruntime-gpu as section ort (/tmp/parts or /tmp/site).
    echo "== triton_gpus: images/s with the instances on GPU 0 vs on every GPU"
    local n W=/tmp/triton_gpus_$$ rc=0 g gpus pid i
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
    [ "$n" -ge 2 ] || { echo "needs 2 or more GPUs (nvidia-smi -L lists $n)"; return 1; }
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=${TRITON_WHEELS:-/tmp/triton_wheels}
    python3 -c "import tritonclient.grpc" 2>/dev/null ||
        python3 -m pip install -q --no-deps nvidia-pytriton tritonclient grpcio python-rapidjson || return 1
    ort_gpu_site || return 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH      # (serve puts PYTHONPATH's directories into the models' Python)
    mkdir -p "$W"
    { python3 -m actvar_export init-ckpt --depth 16 --out "$W/d16.pt" &&
      python3 -m actvar_export build --ckpt "$W/d16.pt" --out "$W/b" --batch "${TG_BATCH:-16}" --precision fp16 &&
      python3 -m actvar_export triton --bundle "$W/b" --out "$W/repo" --gpus 0; } \
        > "$W/prep.log" 2>&1 || { tail -5 "$W/prep.log"; rm -rf "$W"; return 1; }
    for g in 0 all; do
        gpus=(); [ "$g" = all ] && gpus=(--gpus all)
        python3 -m actvar_export serve --repo "$W/repo" "${gpus[@]}" --http-port 18000 --grpc-port 18001 > "$W/serve_$g.log" 2>&1 &
        pid=$!
        for i in $(seq 600); do grep -q "tritonserver ready" "$W/serve_$g.log" && break; kill -0 $pid 2>/dev/null || break; sleep 1; done
        if ! grep -q "tritonserver ready" "$W/serve_$g.log"; then
            echo "!! serve ($g) did not become ready"; tail -5 "$W/serve_$g.log"; kill -TERM $pid 2>/dev/null; wait $pid; rc=1; continue
        fi
        python3 -m actvar_export loadtest --url grpc://127.0.0.1:18001 --concurrency "${TG_CONCURRENCY:-32}" \
            --requests 128 --distinct 16 > /dev/null 2>&1     # warm-up (CUDA graphs of every instance)
        echo "-- instances on GPU $g"
        python3 -m actvar_export loadtest --url grpc://127.0.0.1:18001 --concurrency "${TG_CONCURRENCY:-32}" \
            --requests "${TG_REQUESTS:-1024}" --distinct 16 --bundle "$W/b" --json "$OUT/loadtest_gpus_$g.json" 2> "$W/load_$g.err" ||
            { rc=1; tail -3 "$W/load_$g.err"; }
        kill -TERM $pid; wait $pid
    done
    python3 - "$OUT/loadtest_gpus_0.json" "$OUT/loadtest_gpus_all.json" "$n" <<'PY' || rc=1
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:3])
ratio = many["images_per_s"] / one["images_per_s"]
print(f"images/s: GPU 0 {one['images_per_s']:.2f}, all {sys.argv[3]} GPUs {many['images_per_s']:.2f}: ratio {ratio:.2f}; "
      f"wrong images {one['wrong_images']} + {many['wrong_images']}")
PY
    rm -rf "$W"
    return $rc
}

section_validate_gpu() {
    # d16 fp16 bundles (portable, and plugin: its ActVarExpertFFN/TokenScatter run through ONNX Runtime's
    # Python custom ops, or the GPU runtime once it lands) validated through ONNX Runtime's CUDA EP under the
    # rules of docs/validation.md; the reports (report.md, grid.png, errors.png) come back under $OUT.
    # Needs onnxruntime-gpu as section_ort installs it. VALIDATE_PROVIDERS (default cuda; cuda,cpu adds the CPU
    # provider's emulated fp16 run, CPU-bound: minutes at d16).
    echo "== validate_gpu: d16 fp16 bundles through the CUDA EP"
    local w=/tmp/validate_gpu_$$ rc=0
    mkdir -p "$w" /tmp/ortrt
    ort_gpu_site || return 1
    [ -f /tmp/ortrt/d16.pt ] || python3 -m actvar_export init-ckpt --depth 16 --out /tmp/ortrt/d16.pt > /dev/null || return 1
    ln -sf /tmp/ortrt/d16.pt "$w/d16.pt"
    for low in portable plugin; do
        python3 -m actvar_export build --ckpt "$w/d16.pt" --out "$w/b_$low" --batch "${VALIDATE_BATCH:-4}" --precision fp16 --lowering $low --force || { rc=1; continue; }
        python3 -m actvar_export validate --bundle "$w/b_$low" --ckpt "$w/d16.pt" --providers "${VALIDATE_PROVIDERS:-cuda}" \
            --report "$w/report_$low" 2>&1 | tee "$OUT/validate_d16_fp16_$low.log" | tail -20
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        # one file per report ($OUT returns few files); polygraphy/ (d16 caches, large) stays behind
        tar -C "$w/report_$low" -cf "$OUT/validate_d16_fp16_$low.tar" report.md report.json errors.png grid.png
    done
    rm -rf "$w"
    return $rc
}

ALL=(kernels)
for s in ort ortops plugin trtplugins cpp triton validate_gpu; do declare -F "section_$s" > /dev/null && ALL+=("$s"); done
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
