#!/usr/bin/env bash
# Build the GPU check's payload (../shared/gpu/pack.sh) for what the stage runs: the server's
# dependencies and the few the benches import, not the whole `test` extra, whose Ray,
# Playwright and schemathesis the stage never uses and which would add several transfers.
# The real pyproject.toml is put back however this ends.
#
#   bash bench/gpu/pack.sh        # from the project's root; prints the transfers
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=${GPU_KIT:-../shared/gpu}
saved=$(mktemp)
cp pyproject.toml "$saved"
trap 'cp "$saved" pyproject.toml; rm -f "$saved"' EXIT
python3 - <<'PY'
import re
text = open("pyproject.toml").read()
# What bench/gpu_squeeze.py, throughput.py and harness.py import beyond the server's own.
stage = '    "requests>=2.31,<3",\n    "httpx>=0.27,<1",\n'
text, n = re.subn(r"(?ms)^test = \[\n.*?^\]", "test = [\n" + stage + "]", text, count=1)
assert n == 1, "no test extra in pyproject.toml"
open("pyproject.toml", "w").write(text)
PY
rm -rf .gpu
bash "$kit/pack.sh"
