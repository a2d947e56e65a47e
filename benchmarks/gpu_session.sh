#!/usr/bin/env bash
# Everything a lent GPU should run, one stage per device call (each call gets a bare machine, so
# each stage builds first). Results land in $OUT as <stage>.tar.gz (paths relative to the repo:
# unpack in the checkout and commit) and <stage>.log. See README, "When a GPU is lent".
#
#   bash benchmarks/gpu_session.sh validate   # build, full test suite, benchmarks on cuda
#   bash benchmarks/gpu_session.sh train      # issue 9's GPU rows: ResNet-20 10 QAT epochs and
#                                             # ResNet-18 from scratch, runs in parallel
#   bash benchmarks/gpu_session.sh smoke      # the same steps, tiny, on the CPU (checks this file)
#
# Environment: OUT (default /tmp/gpu_session), BWRF_EXT_SHARED (the data and weights; default the
# carried copy .shared/ in the repo, see README), PY (default python3), SKIP_BUILD=1 (use the
# installed build), TRAIN_SECONDS (default 560: counted from the start of the script, build
# included; the training stops 40 s before it and packs what finished; rerunning the stage
# resumes nothing, since each call starts bare). Exit status: 1 if any step failed.
set -uo pipefail
stage=${1:?usage: gpu_session.sh validate|train|smoke}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export BWRF_EXT_SHARED=${BWRF_EXT_SHARED:-$PWD/.shared}
exec > >(tee "$OUT/$stage.log") 2>&1
tee_pid=$!
status=0
fail() { echo "FAILED: $*"; status=1; }

build() {
    [ "${SKIP_BUILD:-0}" = 1 ] && return 0
    nvidia-smi || true
    "$PY" -m pip install --no-build-isolation --no-deps -e . || { echo "FAILED: build"; exit 1; }
}

pack() {  # pack <name> <paths...>: what exists of them, into $OUT/<name>.tar.gz
    local name=$1
    shift
    local present=()
    for p in "$@"; do [ -e "$p" ] && present+=("$p"); done
    [ ${#present[@]} -gt 0 ] && tar czf "$OUT/$name.tar.gz" "${present[@]}"
    echo "packed into $OUT/$name.tar.gz: ${present[*]:-nothing}"
}

info() {
    "$PY" -c "import bwrf_ext, json, torch; print(json.dumps(bwrf_ext.build_info())); \
print('cuda available:', torch.cuda.is_available())"
}

case $stage in
validate | smoke)
    device=cuda quick=()
    # smoke: tiny, and the tables go to $OUT instead of over the committed CPU tables
    [ "$stage" = smoke ] && device=cpu quick=(--quick)
    build
    info
    echo "== tests (all of them: a failure does not stop the stage) =="
    "$PY" -m pytest python_tests -q -p no:cacheprovider ${quick:+-k "ops or layers"} || fail tests
    echo "== the op and layer tests on the pure-PyTorch reference (the fallback) =="
    BWRF_EXT_FORCE_REFERENCE=1 "$PY" -m pytest python_tests/test_ops.py python_tests/test_layers.py \
        -q -p no:cacheprovider ${quick:+-k "fake_quant"} || fail reference tests
    echo "== benchmarks, quick mode (each case once) =="
    "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable \
        --bench-device "$device" ${quick:+-k "not results_runs"} || fail benchmark tests
    echo "== benchmark tables on $device =="
    for script in lsq_ratios qat_step_ratios bwrf_step_ratios lean_partner_ratios blockkd_ratios \
        loader_ratios compile_step_ratios \
        contsup_memory; do
        echo "-- $script"
        where=()
        [ "$stage" = smoke ] && where=(--out "$OUT/tables/$script")
        # ${a[@]+"${a[@]}"}: an empty array under set -u, on any bash
        "$PY" -m "benchmarks.perf.$script" --device "$device" ${quick[@]+"${quick[@]}"} \
            ${where[@]+"${where[@]}"} || fail "$script"
    done
    if [ "$stage" = smoke ]; then pack smoke "$OUT/tables"; else pack validate benchmarks/results/perf/*cuda*; fi
    ;;
train)
    build
    info
    seconds=$((${TRAIN_SECONDS:-560} - SECONDS - 40)) # the build counted, 40 s kept for packing
    [ $seconds -lt 60 ] && seconds=60
    echo "training for at most $seconds s"
    # ResNet-18 (FP from scratch, then QAT) and ResNet-20 (10 QAT epochs) side by side on the GPU:
    # small nets leave it mostly idle, so parallel processes cost little each.
    timeout "$seconds" "$PY" -m benchmarks.accuracy.results_runs --suite cifar10-resnet18 --parallel 6 \
        --device cuda --workers 2 &
    resnet18=$!
    timeout "$seconds" "$PY" -m benchmarks.accuracy.results_runs --suite cifar10-long --parallel 6 \
        --device cuda --workers 2 &
    resnet20=$!
    wait $resnet18 || fail "cifar10-resnet18 (124: stopped at the deadline)"
    wait $resnet20 || fail "cifar10-long (124: stopped at the deadline)"
    # Whatever finished (records of unfinished runs stay out of the tables).
    "$PY" -m benchmarks.accuracy.results_runs --suite cifar10-resnet18 cifar10-long --table-only ||
        fail tables
    pack train benchmarks/results/accuracy/runs/cifar10-resnet18 benchmarks/results/accuracy/runs/cifar10-long \
        benchmarks/results/accuracy/results_*cifar10-resnet18* benchmarks/results/accuracy/results_*cifar10-long*
    ;;
*)
    echo "unknown stage $stage: validate, train or smoke" >&2
    exit 2
    ;;
esac
echo "stage $stage: exit status $status"
exec >&- 2>&- # close the pipe into tee, then let tee write the log's last lines
wait $tee_pid 2>/dev/null
exit $status
