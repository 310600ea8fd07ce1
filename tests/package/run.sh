#!/usr/bin/env bash
# Packaging test (`make package-test`, part of `make test`): a user's view of an
# installed spo-runtime, away from the repository and with no SPO_ORT_LIBRARY.
#
#   tests/package/run.sh STAGED_PREFIX DIST_TARBALL VERSION ABI MODEL_DIR
#
# 1. The prefix from `make install` is moved elsewhere first (relocation).
# 2. Its libspo_runtime.so.ABI carries SONAME libspo_runtime.so.ABI.
# 3. tests/package/consumer.c is copied to a temp folder and built once through
#    pkg-config and once through CMake find_package; both run and generate.
# 4. The `make dist` tarball is unpacked elsewhere and its bin/spo generates a PNG.
set -euo pipefail
staged=$1 tarball=$2 version=$3 abi=$4 model=$(cd "$5" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset SPO_ORT_LIBRARY ORT_DYLIB_PATH LD_LIBRARY_PATH
fail() { echo "package-test: $*" >&2; exit 1; }

prefix=$work/moved/prefix
mkdir -p "$work/moved"
mv "$staged" "$prefix"

soname=$(readelf -d "$prefix/lib/libspo_runtime.so.$abi" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
[ "$soname" = "libspo_runtime.so.$abi" ] || fail "SONAME is '$soname', want libspo_runtime.so.$abi"
# ONNX Runtime's MIT licence and notices travel with its library.
for f in LICENSE ThirdPartyNotices.txt; do
  [ -s "$prefix/share/doc/spo-runtime/onnxruntime/$f" ] || fail "no ONNX Runtime $f in the install"
done
[ "$(readlink "$prefix/lib/libspo_runtime.so")" = "libspo_runtime.so.$abi" ] ||
  fail "lib/libspo_runtime.so is not a link to libspo_runtime.so.$abi"

# The consumer must say it loaded ONNX Runtime from the prefix's lib/ and generate.
check_consumer() { # NAME BINARY
  local out
  out=$(cd "$work" && "$2" "$model") || fail "$1 consumer failed: $out"
  echo "$out" | sed "s/^/  [$1] /"
  grep -q "ONNX Runtime from $prefix/lib/libonnxruntime.so" <<<"$out" ||
    fail "$1 consumer did not load ONNX Runtime from $prefix/lib"
  grep -q "generated 1 image of [1-9][0-9]*x[1-9][0-9]*" <<<"$out" || fail "$1 consumer made no image"
}

mkdir -p "$work/pc"
cp "$here/consumer.c" "$work/pc/"
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
[ "$(pkg-config --modversion spo-runtime)" = "$version" ] || fail "pkg-config version is not $version"
libdir=$(pkg-config --variable=libdir spo-runtime)
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror -o "$work/pc/consumer" "$work/pc/consumer.c" \
  $(pkg-config --cflags --libs spo-runtime) -Wl,-rpath,"$libdir"
check_consumer pkg-config "$work/pc/consumer"

mkdir -p "$work/cmake/src"
cp "$here/consumer.c" "$here/CMakeLists.txt" "$work/cmake/src/"
cmake -S "$work/cmake/src" -B "$work/cmake/build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DSPO_WANT_VERSION="$version" >"$work/cmake/log" 2>&1 || { cat "$work/cmake/log"; fail "cmake configure failed"; }
cmake --build "$work/cmake/build" >>"$work/cmake/log" 2>&1 || { cat "$work/cmake/log"; fail "cmake build failed"; }
check_consumer cmake "$work/cmake/build/consumer"
# The version file refuses a release newer than the installed one.
if cmake -S "$work/cmake/src" -B "$work/cmake/too-new" -DCMAKE_PREFIX_PATH="$prefix" \
  -DSPO_WANT_VERSION=99.0 >"$work/cmake/log2" 2>&1; then
  fail "find_package(spo-runtime 99.0) succeeded against $version"
fi

mkdir -p "$work/unpacked"
tar -C "$work/unpacked" -xzf "$tarball"
cli=$(echo "$work"/unpacked/*/bin/spo)
[ -x "$cli" ] || fail "no bin/spo in $tarball"
out=$(cd "$work" && "$cli" generate -v --model "$model" --prompt "a lighthouse" --steps 2 \
  --seed 1 --out "$work/cli.png" 2>&1) || fail "the unpacked CLI failed: $out"
echo "$out" | sed 's/^/  [dist cli] /'
grep -q "ONNX Runtime .* loaded from $work/unpacked/[^/]*/lib/" <<<"$out" ||
  fail "the unpacked CLI did not load ONNX Runtime from its own lib/"
[ "$(head -c 4 "$work/cli.png" | tail -c 3)" = "PNG" ] || fail "the unpacked CLI wrote no PNG"
echo "package-test: install, pkg-config, CMake and the unpacked tarball all work (version $version, ABI $abi)"
