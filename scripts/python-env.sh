#!/usr/bin/env bash
# Creates (once) and prints the path of the cached Python venv used by onnx/.
# The venv lives outside the repo; it is rebuilt only when requirements change.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/onnx/requirements.txt"
cache=${SPO_CACHE_DIR:-$HOME/.cache/spo-runtime}
venv="$cache/venv"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "python-env: installing $req into $venv (first run downloads torch, several GB)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet -r "$req" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
