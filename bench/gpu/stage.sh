#!/usr/bin/env bash
# The GPU stage: every measurement of the GPU check, in the last of its transfers
# (bench/gpu/README.md). Each step runs under `timeout` with its share of the time that is left,
# prints its rows as they finish, and is skipped (said so in the report) when too little is
# left, so a slow step cannot take the others' results with it. Results go to $OUT: stage.md
# (the tables), stage.log (everything else), memory_profile.json and .png (calibration).
#
#   eval "$(bash .gpu/kit/unpack.sh)" && bash bench/gpu/stage.sh SECONDS
#
# Steps: a. warm-up and GPU float16 against CPU int8 transcripts (English, Chinese, Spanish);
# b. `python -m server calibrate` on a copy of base (batch 1/4/16 x beam 1/5 x words off/on),
# the measured peak against the planner's estimate per cell; c. the seed scenario (torch fills
# the card until 4096, 1024, 256 MiB are free; the seed request alone and from 4 clients);
# d. throughput: faster-whisper sequential and BatchedInferencePipeline in process, then the
# server with 1 and 8 clients.
#
# A dry run on this CPU, with the project's .venv (short audio, small grid, 2 clients):
#   STAGE_DEVICE=cpu OUT=/tmp/stage bash bench/gpu/stage.sh 420
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
budget=${1:-480}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
device=${STAGE_DEVICE:-cuda}
py=${PYTHON:-python3}
if [[ $device == cuda ]]; then
  compute=float16 minutes=10 grid=(--batch 1 4 16 --beam 1 5) squeeze_free=(4096 1024 256)
  squeeze_clients=(1 4) clients=(1 8) rounds=2
else
  [[ -z ${PYTHON:-} && -x .venv/bin/python ]] && py=.venv/bin/python
  compute=int8 minutes=1 grid=(--batch 1 2 --beam 1 --no-words) squeeze_free=(0)
  squeeze_clients=(1 2) clients=(1 2) rounds=1
fi
model=${STAGE_MODEL:-${GPU_MODELS:+$GPU_MODELS/base}}
[[ -n $model && -d $model ]] || model=$PWD/models/whisper-base
report=$OUT/stage.md log=$OUT/stage.log
: >"$report"
: >"$log"
# Keep 15 s at the end for the report; everything else is shared among the steps still to run.
deadline=$((SECONDS + budget - 15))
export PYTHONUNBUFFERED=1

say() { printf '%s\n' "$*" | tee -a "$report"; }
section() { printf '\n## %s\n\n' "$1" | tee -a "$report"; }
# step WEIGHT LEFT_WEIGHT MIN_SECONDS command...: run under a limit of WEIGHT/LEFT_WEIGHT of the
# time left (at least MIN_SECONDS, at most what is left); stdout to the report, stderr to the
# log; skipped when less than MIN_SECONDS is left.
step() {
  local weight=$1 of=$2 min=$3
  shift 3
  local left=$((deadline - SECONDS))
  if ((left < min)); then
    say "(skipped: ${left} s left, this step needs at least ${min} s: $*)"
    return 0
  fi
  local limit=$((left * weight / of))
  ((limit < min)) && limit=$min
  ((limit > left)) && limit=$left
  local started=$SECONDS
  echo "+ [limit ${limit} s] $*" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$report" 2>>"$log"
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=", stopped at its time limit; the rows above are what it finished"
  printf '\n(exit %s after %s s of %s s%s)\n' "$rc" "$((SECONDS - started))" "$limit" "$note" \
    | tee -a "$log" >>"$report"
}

section "Machine"
{
  command -v nvidia-smi >/dev/null \
    && nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv
  "$py" - "$device" <<'PY'
import sys
import ctranslate2, faster_whisper
from server.memory.probes import cublas_needs, cuda_available
print(sys.version.split()[0], "ctranslate2", ctranslate2.__version__, "faster-whisper",
      faster_whisper.__version__, "cuda devices", ctranslate2.get_cuda_device_count())
print("compute types:", sorted(ctranslate2.get_supported_compute_types(sys.argv[1])))
print(cublas_needs(), "-> cuda_available:", cuda_available())
PY
} >>"$report" 2>>"$log"
say "model: $model ($compute); budget ${budget} s"

section "a. Warm-up and GPU against CPU transcripts"
step 2 11 60 "$py" bench/gpu/parity.py --model "base=$model" --device "$device" \
  --compute-type "$compute"

section "b. Calibration: measured peak against the planner's estimate"
calibrated=/tmp/stage-calibrate-base
rm -rf "$calibrated" && mkdir -p "$calibrated"
for f in "$model"/*; do ln -s "$f" "$calibrated/"; done
rm -f "$calibrated/memory_profile.json"
WHISPER_MODEL=$calibrated WHISPER_DEVICE=$device WHISPER_COMPUTE_TYPE=$compute \
  step 3 9 60 "$py" -m server calibrate "${grid[@]}"
cp "$calibrated/memory_profile.json" "$calibrated/memory_profile.png" "$OUT/" 2>/dev/null

section "c. The seed scenario: the card filled, the seed request alone and from 4 clients"
step 3 6 90 "$py" bench/gpu_squeeze.py --model "$model" --device "$device" \
  --free "${squeeze_free[@]}" --concurrency "${squeeze_clients[@]}" --minutes "$minutes"

section "d. Throughput ($compute, short clips)"
step 1 3 45 "$py" bench/throughput.py --model "$model" --device "$device" \
  --compute-type "$compute" --modes sequential pipeline --rounds "$rounds" --short-only
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
WHISPER_MODEL=$model WHISPER_DEVICE=$device WHISPER_COMPUTE_TYPE=$compute WHISPER_PORT=$port \
  WHISPER_HOST=127.0.0.1 "$py" -m server serve >>"$log" 2>&1 &
server=$!
"$py" - "$port" <<'PY' >>"$log" 2>&1
import sys, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("the server was not ready in 120 s")
PY
step 2 2 45 "$py" bench/throughput.py --url "http://127.0.0.1:$port" --server-pid "$server" \
  --label "server, batching auto" --concurrency "${clients[@]}" --rounds "$rounds" --short-only
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null

section "Done"
say "$((SECONDS)) s of ${budget} s used"
