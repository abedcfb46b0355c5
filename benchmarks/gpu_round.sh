#!/usr/bin/env bash
# One GPU round on a lent H200 (the device machine: torch and triton, no network, no venv): the kernel and
# decode benchmarks, an ncu profile of RLA, then the CUDA test target, each under its own time limit so
# that one stall cannot eat the others' time. Everything it writes is copied to $OUT (default: gpu-round/).
#
#   GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_round.sh      # on the GPU box, from the repo root
#
# Pure-Python packages the box lacks (pydantic, webdataset, fla for the kernel bench's comparison rows)
# travel as wheels in .whl/ (README, "Benchmarks", says how to fetch them); they are installed into /tmp/site first.
set -u
OUT=${OUT:-gpu-round}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >"$OUT/pip.log" 2>&1 || { echo "wheel install failed: $(tail -3 "$OUT/pip.log")"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export GIT_COMMIT=${GIT_COMMIT:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-12s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -1 "$OUT/$name.log")" | tee -a "$OUT/steps.txt"
}

step kernels "${KERNELS_S:-120}" python3 -m kernels.bench --T 8192 --out "$OUT/kernels-h200.json" --md "$OUT/kernels-h200.md"
step decode "${DECODE_S:-120}" python3 benchmarks/bench_decode.py --out "$OUT/decode-h200.json"
step ncu-rla "${NCU_S:-60}" sh -c "ncu --profile-from-start off --clock-control none --print-units base \
  --metrics gpu__time_duration.sum --csv python3 kernels/rla/profile.py > '$OUT/ncu-rla.csv'"
step ncu-sum 30 python3 kernels/rla/profile.py --summarize "$OUT/ncu-rla.csv"
step test-gpu "${TEST_GPU_S:-150}" make -s test-gpu PY=python3
echo "--- steps"; cat "$OUT/steps.txt"
for f in kernels decode ncu-sum test-gpu; do echo "--- $f (last lines)"; tail -25 "$OUT/$f.log"; done
