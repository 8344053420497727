# xvtpm — the two commands: `make demo` (main job) and `make test` (all tests); `make lint`
# (clippy, which CI runs before the tests) enforces the workspace lints (Cargo.toml,
# clippy.toml). All install missing Debian packages first (scripts/install-deps.sh).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: deps build demo test lint bench testbed vtpmdom vtpmdom-small deb clippy fmt clean

deps:
	scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --locked

## The main job: swtpm as physical TPM → vtpmmgr → two vTPMs → tpm2-tools, restart, destroy.
demo: build
	scripts/demo.sh $(CARGO_TARGET_DIR)/debug

## Every test: unit tests, integration tests with real swtpm and real libtpms.
test: build
	$(CARGO) test --workspace --locked --no-fail-fast

## Benchmarks (release build); results are appended to BENCHMARKS.md.
bench: deps
	$(CARGO) build --workspace --release --locked
	scripts/bench.sh $(CARGO_TARGET_DIR)/release

## The QEMU-based Xen testbed (real Xen 4.17 + Debian kernel under TCG).
testbed: build
	XVTPM_PROFILE=$${XVTPM_PROFILE:-debug} ci/testbed/run.sh

## The Debian package (binaries, systemd units, man pages, completions, /etc/xvtpm):
## target/deb/xvtpm_<version>_<arch>.deb, from a release build (XVTPM_PROFILE=debug for the debug one).
deb: deps
	$(CARGO) build --workspace --locked $(if $(filter debug,$(XVTPM_PROFILE)),,--release)
	scripts/build-deb.sh $(CARGO_TARGET_DIR)/$(if $(filter debug,$(XVTPM_PROFILE)),debug,release) $(CARGO_TARGET_DIR)/deb

## The boot image of a vTPM domain (kernel + initramfs with vtpm-domain as /init) for the
## running kernel (KVER=… for another installed one): target/vtpmdom/{vmlinuz,initrd,memory-mib} (128 MiB).
vtpmdom: deps
	$(CARGO) build --release -p vtpm-domain --locked
	scripts/build-vtpmdom.sh --vtpm-domain $(CARGO_TARGET_DIR)/release/vtpm-domain $${KVER:+--kver $$KVER}

## The same with the project's own small kernel instead (Linux 6.1 from Debian 12's linux-source-6.1,
## ci/testbed/vtpmdom-kernel.config; built once by ci/testbed/build-vtpmdom-kernel.sh into its cache,
## a few minutes on 2 cores): target/vtpmdom/{vmlinuz,initrd,memory-mib}, a domain of 40 MiB.
vtpmdom-small: deps
	$(CARGO) build --release -p vtpm-domain --locked
	set -o pipefail; ci/testbed/build-vtpmdom-kernel.sh | tee $(CARGO_TARGET_DIR)/vtpmdom-kernel.log
	scripts/build-vtpmdom.sh --vtpm-domain $(CARGO_TARGET_DIR)/release/vtpm-domain \
	  --kernel "$$(sed -n 's/^build-vtpmdom-kernel.sh: kernel: //p' $(CARGO_TARGET_DIR)/vtpmdom-kernel.log | tail -n 1)/vmlinux"

## The workspace lints as errors: no `unsafe` outside FFI modules, a SAFETY comment on every
## `unsafe` block, no raw log macro in the daemons (peer paths use xvtpm-log's rate limit).
lint: deps
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

clippy: lint

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
