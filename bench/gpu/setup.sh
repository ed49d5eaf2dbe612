#!/usr/bin/env bash
# On the GPU host: reassemble what bench/gpu/bundle.sh made (its groups under one folder,
# default .gpu) and print the environment to use. Idempotent; cheap to run in every command.
#
#   eval "$(bash bench/gpu/setup.sh .gpu)"
#
# Wheels go to /tmp/gpu-site, each extra model (bundle.sh --model) to /tmp/gpu-models/NAME, cuBLAS 12 to /tmp/gpu-cuda12.
# Without cuBLAS parts, libcublas.so.12 is pointed at the image's CUDA 13 cuBLAS (found through
# the nvidia-cublas package or /usr/local/cuda). That is a shortcut: compare its transcripts
# with a CPU run (bench/gpu/session.sh does) before trusting its numbers.
set -euo pipefail
src=${1:-.gpu}
site=/tmp/gpu-site models=/tmp/gpu-models cu=/tmp/gpu-cuda12
shopt -s nullglob
fail() { echo "echo 'bench/gpu/setup.sh: $1' >&2; false"; exit 0; }
# cat in the order of the file names (parts may sit in any group: m2/x.part00, m1/x.part01)
cat_parts() {
  local paths
  mapfile -t paths < <(printf '%s\n' "$@" | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2)
  cat "${paths[@]}"
}
if [[ ! -f $site/.done ]]; then
  # A wheel bigger than a group comes as NAME.whl.partNN pieces, maybe across groups.
  mkdir -p /tmp/gpu-wheels
  for first in "$src"/w*/*.whl.part00; do
    whole=$(basename "${first%.part00}")
    cat_parts "$src"/w*/"$whole".part[0-9][0-9] >"/tmp/gpu-wheels/$whole"
  done
  wheels=("$src"/w*/*.whl /tmp/gpu-wheels/*.whl)
  ((${#wheels[@]})) || fail "no wheels under $src/w*"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}" >&2
  touch "$site/.done"
fi
# Models: NAME--FILE, big files as NAME--FILE.partNN across groups.
if [[ ! -f $models/.done ]] && compgen -G "$src/m*/*--*" >/dev/null; then
  for f in "$src"/m*/*--*; do
    base=$(basename "$f")
    name=${base%%--*} file=${base#*--}
    mkdir -p "$models/$name"
    case $file in
      *.part00) cat_parts "$src"/m*/"$name--${file%.part00}".part[0-9][0-9] >"$models/$name/${file%.part00}" ;;
      *.part[0-9][0-9]) ;; # joined with its .part00
      *) cp "$f" "$models/$name/$file" ;;
    esac
  done
  touch "$models/.done"
fi
mkdir -p "$cu"
if [[ ! -f $cu/.done ]]; then
  parts=("$src"/c*/cublas.tar.xz*)
  if ((${#parts[@]})); then
    cat_parts "${parts[@]}" |
      xz -dc | tar -C "$cu" -xf -
  else
    lib=$(python3 - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [sys.prefix, "/usr/local/cuda"]
hits = [p for r in roots for p in glob.glob(os.path.join(r, "**", "libcublas.so.1[3-9]*"), recursive=True)]
print(sorted(hits)[0] if hits else "")
PY
)
    [[ -n $lib ]] || fail "no cuBLAS found to link"
    ln -sf "$lib" "$cu/libcublas.so.12"
    ln -sf "$(dirname "$lib")/$(basename "$lib" | sed 's/libcublas/libcublasLt/')" "$cu/libcublasLt.so.12"
  fi
  touch "$cu/.done"
fi
echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
echo "export LD_LIBRARY_PATH=$cu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
echo "export GPU_BUNDLE_MODELS=$models"
exit 0
