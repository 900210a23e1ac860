#!/usr/bin/env bash
# Every check that needs a GPU, in one run with a time limit per step: the CUDA-marked tests,
# the loss and conformance tests (torch versions differ between machines), the GPU evaluation
# and training benchmarks, the data path (bench_data.py: img/s delivered by each loader), and
# `lagnet train --device cuda --compile` and `lagnet evaluate` end to end on real-size crops
# (bench_e2e.py), their img/s beside bench_gpu.py's step and forward rates. Logs and the
# benchmark JSON go to $OUT (default /tmp/lagnet-gpu-checks); each step's last lines are printed.
# The limits add up to 900 s, the device time a lent machine gives one session.
#
#   bash benchmarks/run_gpu_checks.sh               # on a machine with a CUDA GPU
#   SMOKE=1 PYTHON=python bash benchmarks/run_gpu_checks.sh   # the same steps, tiny, on the CPU
set -u
out=${OUT:-/tmp/lagnet-gpu-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
smoke=() images=400
if [ "${SMOKE:-0}" = 1 ]; then smoke=(--cpu-smoke) images=64; fi
status=0

step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-30}" "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi -L 2>/dev/null
"$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
    "CUDA", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "-")'
step cuda_tests 120 "$py" -m pytest -q -p no:cacheprovider -m cuda tests
step losses_conformance 60 "$py" -m pytest -q -p no:cacheprovider tests/test_losses.py \
    tests/test_conformance.py tests/test_kreciprocal_device.py
step bench_gpu_eval 60 "$py" benchmarks/bench_gpu_eval.py "${smoke[@]}"
step bench_gpu 400 "$py" benchmarks/bench_gpu.py "${smoke[@]}" --json "$out/bench_gpu.json" \
    --profile "$out/profile.txt"
step bench_data 60 "$py" benchmarks/bench_data.py --images "$images" --passes 2 \
    --json "$out/bench_data.json"
step bench_e2e 200 "$py" benchmarks/bench_e2e.py "${smoke[@]}" --gpu-json "$out/bench_gpu.json" \
    --json "$out/bench_e2e.json"
exit "$status"
