# spo-runtime: the two commands are `make demo` and `make test`. Each target sets
# up what it needs (apt packages, ONNX Runtime from PyPI, the Python venv),
# idempotently.

SHELL := /bin/bash
CARGO ?= cargo
PROFILE := release
# Cargo's output folder: CARGO_TARGET_DIR when set (relative to this folder, as
# cargo reads it), else target/.
TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),$(CURDIR)/target))
LIBDIR := $(TARGET_DIR)/$(PROFILE)
ORT_DIR := $(CURDIR)/third_party/onnxruntime/cpu
export SPO_ORT_LIBRARY ?= $(ORT_DIR)/libonnxruntime.so
# The CLI that scripts and Python tests run (they default to target/release/spo).
export SPO_CLI := $(LIBDIR)/spo
CFLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -g -I$(CURDIR)/include
CLIBS := -L$(LIBDIR) -lspo_runtime -Wl,-rpath,$(LIBDIR) -lpthread -lm
VALGRIND := valgrind --quiet --error-exitcode=1 --leak-check=full \
	--errors-for-leak-kinds=definite,indirect --suppressions=$(CURDIR)/tests/c/valgrind.supp
# The package version (Cargo.toml) and the C ABI version (the header, from src/ffi).
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n1)
ABI := $(shell sed -n 's/^\#define SPO_ABI_VERSION //p' include/spo_runtime.h)
PREFIX ?= /usr/local
DIST_NAME := spo-runtime-$(VERSION)-linux-$(shell uname -m)
DIST_TARBALL := $(CURDIR)/out/$(DIST_NAME).tar.gz
C_TESTS := $(patsubst tests/c/%.c,tests/c/build/%,$(wildcard tests/c/*.c))

.PHONY: all demo spo-demo test setup apt ort build lint rust-test c-test py-test symbols header clean broken-models examples cpp-test bench \
	install dist package-test

all: build

## Set-up ---------------------------------------------------------------------
setup: apt ort

apt:
	@missing=""; for t in valgrind:valgrind gcc:gcc nm:binutils cmake:cmake pkg-config:pkg-config; do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && apt-get install -y -qq $$missing; fi

ort:
	@bash scripts/fetch-onnxruntime.sh >/dev/null

build: ort
	$(CARGO) build --$(PROFILE) --locked
	@# Binaries find ONNX Runtime beside libspo_runtime.so (search step 4).
	@ln -sf $(ORT_DIR)/libonnxruntime.so* $(LIBDIR)/
	@# Programs linked against it record its SONAME (libspo_runtime.so.ABI, build.rs).
	@ln -sf libspo_runtime.so $(LIBDIR)/libspo_runtime.so.$(ABI)

## The main job ----------------------------------------------------------------
# A real text-to-image run on the bundled shapes model (a tiny SDXL trained on
# synthetic shapes; see README "The shapes model").
demo: setup build
	@mkdir -p out
	$(LIBDIR)/spo generate --model models/shapes-sdxl --prompt "a red circle on a blue background" \
	  --steps 25 --guidance 5 --scheduler ddim --seed 42 --width 128 --height 128 --out out/demo.png
	@echo "demo: wrote out/demo.png"

# SPO on the shapes model with its size preference model (a few CPU minutes):
# trains a LoRA with `spo train --preset toy`, then scores captions and seeds
# that training never saw, with and without it; writes a before/after grid.
spo-demo: setup build
	@venv=$$(bash scripts/python-env.sh) && PYTHONPATH=onnx $$venv/bin/python -m spo_onnx.shapes.toy_world \
	  --work out/spo-demo --grid out/spo-demo.png

# C samples, built against the committed header and run once by `make test`.
EXAMPLES := $(patsubst examples/c/%.c,tests/c/build/example-%,$(wildcard examples/c/*.c))
tests/c/build/example-%: examples/c/%.c examples/c/png_write.h include/spo_runtime.h build
	@mkdir -p tests/c/build
	$(CC) $(CFLAGS) $< -o $@ $(CLIBS)

CXXFLAGS_SPO := -std=c++17 -Wall -Wextra -Werror -g -I$(CURDIR)/include -I$(CURDIR)/bindings/cpp
tests/c/build/example-cpp-%: examples/cpp/%.cpp bindings/cpp/spo_runtime.hpp include/spo_runtime.h build
	@mkdir -p tests/c/build
	$(CXX) $(CXXFLAGS_SPO) $< -o $@ $(CLIBS)

# The C++ wrapper's test, built with exceptions, with -fno-exceptions (Result<T>)
# and with SPO_NO_EXCEPTIONS over exceptions; its images must match bindings-ref's.
# The first two run under valgrind (about 5 minutes each); the third, which
# differs only in how a throwing callback is reported, runs natively.
CPP_TESTS := tests/c/build/cpp/binding-exc tests/c/build/cpp/binding-noexc tests/c/build/cpp/binding-result
tests/c/build/cpp/binding-%: tests/cpp/binding.cpp bindings/cpp/spo_runtime.hpp include/spo_runtime.h build
	@mkdir -p tests/c/build/cpp
	$(CXX) $(CXXFLAGS_SPO) -DSPO_TEST_VERSION='"$(VERSION)"' \
	  $(if $(findstring noexc,$@),-fno-exceptions -DSPO_NO_EXCEPTIONS,$(if $(findstring result,$@),-DSPO_NO_EXCEPTIONS)) \
	  $< -o $@ $(CLIBS)

cpp-test: $(CPP_TESTS) bindings-ref
	@for t in $(filter-out %-result,$(CPP_TESTS)); do echo "== valgrind $$t"; $(VALGRIND) $$t $(BIND_CASE) $(BIND_BUILD) || exit 1; done
	tests/c/build/cpp/binding-result $(BIND_CASE) $(BIND_BUILD)

examples: $(EXAMPLES) tests/c/build/example-cpp-txt2img tests/c/build/example-cpp-train
	./tests/c/build/example-cpp-txt2img tests/fixtures/tiny-sd15 "a lighthouse" $(LORA_15_B)
	./tests/c/build/example-cpp-train tests/fixtures/tiny-sd15 tests/fixtures/train/tiny-sd15/graphs tests/fixtures/preference/colour tests/c/build/cpp-trained.safetensors
	./tests/c/build/example-hello
	./tests/c/build/example-txt2img tests/fixtures/tiny-sd15 "a lighthouse" tests/c/build/txt2img.png 4
	@head -c 8 tests/c/build/txt2img.png | od -An -c | grep -q 'P   N   G' || { echo "txt2img did not write a PNG"; exit 1; }

## Tests -------------------------------------------------------------------------
test: setup lint rust-test symbols c-test examples cpp-test package-test py-test bindings-test
	@echo "make test: all checks passed"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@# The fuzz targets (run with `cargo +nightly fuzz run NAME`) must keep compiling.
	cd fuzz && $(CARGO) check --locked --quiet

rust-test: ort
	$(CARGO) test --$(PROFILE) --locked

# The cdylib must export the C API and nothing else.
symbols: build
	@extra=$$(nm -D --defined-only $(LIBDIR)/libspo_runtime.so | awk '{print $$3}' | grep -v '^spo_' || true); \
	if [ -n "$$extra" ]; then echo "non-spo_ exported symbols:"; echo "$$extra"; exit 1; fi; \
	echo "symbols: only spo_* exported ($$(nm -D --defined-only $(LIBDIR)/libspo_runtime.so | grep -c ' spo_'))"

tests/c/build/%: tests/c/%.c tests/c/check.h include/spo_runtime.h build
	@mkdir -p tests/c/build
	$(CC) $(CFLAGS) $< -o $@ $(CLIBS)

# Broken model folders for tests/c/pipeline.c: a truncated UNet graph, a missing tokenizer.
broken-models:
	@rm -rf tests/c/build/broken-truncated tests/c/build/broken-notokenizer
	@mkdir -p tests/c/build
	@cp -rL tests/fixtures/tiny-sd15 tests/c/build/broken-truncated
	@truncate -s 2000 tests/c/build/broken-truncated/unet/model.onnx
	@cp -rL tests/fixtures/tiny-sd15 tests/c/build/broken-notokenizer
	@rm -rf tests/c/build/broken-notokenizer/tokenizer

c-test: $(C_TESTS) broken-models
	@for t in $(C_TESTS); do echo "== valgrind $$t"; $(VALGRIND) $$t || exit 1; done

py-test:
	@if ls tests/python/test_*.py >/dev/null 2>&1; then \
	  venv=$$(bash scripts/python-env.sh) && cd $(CURDIR) && PYTHONPATH=onnx $$venv/bin/python -m pytest -q tests/python; \
	else echo "py-test: no Python tests"; fi

## Packaging -------------------------------------------------------------------
# A relocatable tree: include/ (C header, C++ wrapper), lib/ (libspo_runtime.so.ABI
# and its link, ONNX Runtime beside it, pkg-config and CMake files), bin/spo (run
# path $$ORIGIN/../lib), share/doc/spo-runtime/. Debug info is stripped.
install: build
	@[ -n "$(PREFIX)" ] || { echo "install: PREFIX is empty"; exit 1; }
	install -d $(PREFIX)/include $(PREFIX)/bin $(PREFIX)/lib/pkgconfig \
	  $(PREFIX)/lib/cmake/spo-runtime $(PREFIX)/share/doc/spo-runtime
	install -m 644 include/spo_runtime.h bindings/cpp/spo_runtime.hpp $(PREFIX)/include/
	install -m 755 $(LIBDIR)/libspo_runtime.so $(PREFIX)/lib/libspo_runtime.so.$(ABI)
	ln -sf libspo_runtime.so.$(ABI) $(PREFIX)/lib/libspo_runtime.so
	cp -P $(ORT_DIR)/libonnxruntime*.so* $(PREFIX)/lib/
	install -m 755 $(LIBDIR)/spo $(PREFIX)/bin/spo
	strip --strip-debug $(PREFIX)/lib/libspo_runtime.so.$(ABI) $(PREFIX)/bin/spo
	sed -e 's/@VERSION@/$(VERSION)/g' -e 's/@ABI@/$(ABI)/g' packaging/spo-runtime.pc.in \
	  > $(PREFIX)/lib/pkgconfig/spo-runtime.pc
	for f in spo-runtime-config spo-runtime-config-version; do \
	  sed -e 's/@VERSION@/$(VERSION)/g' -e 's/@ABI@/$(ABI)/g' packaging/$$f.cmake.in \
	    > $(PREFIX)/lib/cmake/spo-runtime/$$f.cmake; done
	install -m 644 README.md $(PREFIX)/share/doc/spo-runtime/
	install -d $(PREFIX)/share/doc/spo-runtime/onnxruntime
	install -m 644 $(ORT_DIR)/LICENSE $(ORT_DIR)/ThirdPartyNotices.txt $(PREFIX)/share/doc/spo-runtime/onnxruntime/

# The same tree as a tarball: out/spo-runtime-VERSION-linux-ARCH.tar.gz.
dist:
	rm -rf out/dist
	$(MAKE) --no-print-directory install PREFIX=$(CURDIR)/out/dist/$(DIST_NAME)
	tar -C out/dist -czf $(DIST_TARBALL) $(DIST_NAME)
	rm -rf out/dist
	@echo "dist: $(DIST_TARBALL) ($$(du -h $(DIST_TARBALL) | cut -f1))"

# Installs into a temp prefix and builds programs of a user's own against it.
package-test: dist
	@stage=$$(mktemp -d) && trap 'rm -rf "$$stage"' EXIT && \
	$(MAKE) --no-print-directory -s install PREFIX=$$stage/prefix >/dev/null && \
	bash tests/package/run.sh $$stage/prefix $(DIST_TARBALL) $(VERSION) $(ABI) tests/fixtures/tiny-sd15

## Bindings: Go, C# and the engine-style host (bindings-test) ---------------------------
# Each target installs its Debian tools when missing. The Go and C# tests compare
# with images that tests/bindings/reference.c makes through the C API alone.
BIND_BUILD := tests/c/build/bindings
BIND_APT := apt-get update -qq && apt-get install -y -qq --no-install-recommends
MCS := mcs -warn:4 -warnaserror
# The Go tool needs a cache folder; without HOME (some CI shells) it goes under tests/c/build.
GOCACHE ?= $(if $(HOME),$(HOME)/.cache/go-build,$(CURDIR)/tests/c/build/go-cache)
GO := GOPROXY=off GOCACHE=$(GOCACHE) go
BIND_CASE := tests/bindings/case.txt
LORA_15_B := tests/fixtures/lora/tiny-sd15/lora_b/kohya_flat.safetensors

.PHONY: bindings-test bindings-ref go-test csharp-test engine-host-test

bindings-test: go-test csharp-test engine-host-test

$(BIND_BUILD)/reference: tests/bindings/reference.c include/spo_runtime.h build
	@mkdir -p $(BIND_BUILD)
	$(CC) $(CFLAGS) $< -o $@ $(CLIBS)

bindings-ref: $(BIND_BUILD)/reference $(BIND_CASE)
	$(BIND_BUILD)/reference $(BIND_CASE) $(BIND_BUILD)/ref.rgb
	$(BIND_BUILD)/reference $(BIND_CASE) $(BIND_BUILD)/ref-lora.rgb lora

go-test: bindings-ref
	@command -v go >/dev/null || { echo "installing: golang-go"; $(BIND_APT) golang-go; }
	cd bindings/go && test -z "$$(gofmt -l .)" && $(GO) vet ./... && \
	  SPO_BINDINGS_CASE=$(CURDIR)/$(BIND_CASE) SPO_BINDINGS_REF=$(CURDIR)/$(BIND_BUILD) $(GO) test -race -count=1 ./...
	cd examples/go && test -z "$$(gofmt -l .)" && $(GO) vet ./... && \
	  $(GO) build -o $(CURDIR)/$(BIND_BUILD)/example-go .
	$(BIND_BUILD)/example-go tests/fixtures/tiny-sd15 "a lighthouse" $(BIND_BUILD)/go.png $(LORA_15_B)

csharp-test: bindings-ref
	@missing=""; for t in mcs:mono-mcs mono:mono-runtime; do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(BIND_APT) $$missing; fi
	@mkdir -p $(BIND_BUILD)/csharp
	$(MCS) -target:library -out:$(BIND_BUILD)/csharp/SpoRuntime.dll bindings/csharp/*.cs
	$(MCS) -r:$(BIND_BUILD)/csharp/SpoRuntime.dll -r:System.Core.dll -out:$(BIND_BUILD)/csharp/Tests.exe tests/bindings/csharp/Tests.cs
	$(MCS) -r:$(BIND_BUILD)/csharp/SpoRuntime.dll -out:$(BIND_BUILD)/csharp/Txt2Img.exe examples/csharp/Txt2Img.cs
	LD_LIBRARY_PATH=$(LIBDIR) mono --debug $(BIND_BUILD)/csharp/Tests.exe $(CURDIR) $(BIND_CASE) $(BIND_BUILD)
	LD_LIBRARY_PATH=$(LIBDIR) mono $(BIND_BUILD)/csharp/Txt2Img.exe tests/fixtures/tiny-sd15 "a lighthouse" \
	  $(BIND_BUILD)/csharp.ppm $(LORA_15_B)

# The host loads the library with dlopen: it is built without -lspo_runtime.
$(BIND_BUILD)/engine-host: examples/engine-host/host.c include/spo_runtime.h
	@mkdir -p $(BIND_BUILD)
	$(CC) $(CFLAGS) $< -o $@ -ldl -lm

engine-host-test: $(BIND_BUILD)/engine-host build
	@! readelf -d $< | grep -q spo_runtime || { echo "engine-host must not link libspo_runtime"; exit 1; }
	$(VALGRIND) $< $(LIBDIR)/libspo_runtime.so tests/fixtures/tiny-sd15 $(BIND_BUILD)/preview.pgm
	@head -c 2 $(BIND_BUILD)/preview.pgm | grep -q P5 || { echo "engine-host did not write a PGM"; exit 1; }
## End of the bindings block ---------------------------------------------------------------

## Maintenance --------------------------------------------------------------------
# Regenerates include/spo_runtime.h from src/ffi (commit the result).
header:
	SPO_UPDATE_HEADER=1 $(CARGO) test --$(PROFILE) --test header

clean:
	$(CARGO) clean
	rm -rf tests/c/build

## Benchmarks (programs that print ratios measured in the same run; not tests) -------
bench: build
	bash scripts/bench.sh --model tests/fixtures/tiny-sd15 --steps 20 --repeats 5
	bash scripts/bench.sh --model tests/fixtures/tiny-sdxl --steps 20 --repeats 5
	bash scripts/bench_grad.sh --repeats 5 --rounds 2
	bash scripts/bench_train.sh --rounds 4
