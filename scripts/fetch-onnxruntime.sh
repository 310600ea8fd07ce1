#!/usr/bin/env bash
# Extracts the official ONNX Runtime shared libraries from the PyPI wheel into
# third_party/onnxruntime/<flavour>/ (git-ignored). Idempotent: does nothing when
# the library is already there. Uses only pip, the registry's ordinary client.
#
#   scripts/fetch-onnxruntime.sh          # CPU build  (onnxruntime==1.31.1)
#   scripts/fetch-onnxruntime.sh --cuda   # CUDA build (onnxruntime-gpu==1.31.1)
set -euo pipefail
version=1.31.1
pkg=onnxruntime
flavour=cpu
if [ "${1:-}" = "--cuda" ]; then pkg=onnxruntime-gpu; flavour=cuda; fi
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/third_party/onnxruntime/$flavour"
if ls "$dest"/libonnxruntime.so.* >/dev/null 2>&1 && [ -f "$dest/LICENSE" ] && [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$version" ]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$pkg==$version" >&2
wheel=$(ls "$tmp"/*.whl)
mkdir -p "$dest"
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        # The libraries, and the licence and third-party notices that ship with them.
        lib = name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime")
        if lib or name in ("onnxruntime/LICENSE", "onnxruntime/ThirdPartyNotices.txt"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PY
# ort's load-dynamic opens the unversioned name; keep a symlink to the real file.
real=$(ls "$dest"/libonnxruntime.so.* | head -n1)
ln -sf "$(basename "$real")" "$dest/libonnxruntime.so"
echo "$version" > "$dest/VERSION"
echo "$dest"
