#!/usr/bin/env bash
# Sections of scripts/device_check.sh as one background pipeline on the GPU machine, so that a device call never
# holds the machine idle and a slow section cannot eat the others' time. Each device call stays short:
#   scripts/device_pipeline.sh piece K                  # copy the carried .wheelparts/pK to /tmp/parts (one call per piece)
#   scripts/device_pipeline.sh start "prep:600"         # e.g. with the first piece: plugin libraries, checkpoints
#   scripts/device_pipeline.sh start "ort:480 validate_gpu:300 ortops:150 plugin:300 cpp:200 triton:300"
#                                                       # name:timeout-seconds, run in this order in the background;
#                                                       # the environment of this call (ORT_CONFIGS=..., ...) is theirs
#   scripts/device_pipeline.sh poll [SECONDS]           # wait up to SECONDS (default 100) for the pipeline to end,
#                                                       # print its progress, and put every result so far into
#                                                       # $OUT/results.tgz (the device tool returns $OUT)
# The machine releases after ~30 s without a call: poll back to back until "ALLDONE". Results and logs live under
# /tmp/pipeline (section logs s_<name>.log, the sections' own JSON), which outlives each call's $OUT. Carry .sdk
# with the `start` call when a section needs the SDK headers (ortops, cpp, trtplugins).
set -uo pipefail
cd "$(dirname "$0")/.."
P=/tmp/pipeline
case "${1:-}" in
piece)
    mkdir -p /tmp/parts && cp ".wheelparts/p$2"/* /tmp/parts/ && ls /tmp/parts ;;
start)
    # the sections run from a private copy of the checkout (with .sdk when carried): the device tool copies the
    # checkout afresh on every call and drops what a call does not carry, under a running pipeline otherwise
    # (a build/ of an earlier pipeline, e.g. `prep` started while the wheel pieces travel, is kept)
    grep -qs ALLDONE "$P/pipe.log" || [ ! -s "$P/pipe.log" ] || { echo "a pipeline is still running"; cat "$P/pipe.log"; exit 1; }
    mkdir -p "$P" "$P.src" && find "$P.src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} + && : > "$P/pipe.log"
    tar --exclude=./.wheelparts --exclude=./build --exclude=./device_out -cf - . | tar -xf - -C "$P.src" || exit 1
    (setsid nohup bash -c '
        cd "$1"; P=$2; shift 2
        for item in $1; do
            name=${item%%:*}; limit=${item##*:}
            echo "START $name $(date +%T)" >> "$P/pipe.log"
            OUT=$P timeout "$limit" bash scripts/device_check.sh "$name" > "$P/s_$name.log" 2>&1
            echo "END $name rc=$? $(date +%T)" >> "$P/pipe.log"
        done
        echo ALLDONE >> "$P/pipe.log"' _ "$P.src" "$P" "$2" > /dev/null 2>&1 < /dev/null &)
    sleep 1; cat "$P/pipe.log" ;;
poll)
    end=$((SECONDS + ${2:-100}))
    while [ $SECONDS -lt $end ] && ! grep -q ALLDONE "$P/pipe.log" 2> /dev/null; do sleep 5; done
    cat "$P/pipe.log"
    last=$(ls -t "$P"/s_*.log 2> /dev/null | head -1)
    [ -n "$last" ] && { echo "--- $last"; tr '\r' '\n' < "$last" | grep -v '%|' | tail -8; }
    [ -n "${OUT:-}" ] && tar -C "$P" -czf "$OUT/results.tgz" . && echo "results: $OUT/results.tgz" ;;
*)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
