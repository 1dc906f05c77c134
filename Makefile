# SPDX-License-Identifier: GPL-2.0
#
# The project's entry points. The kernel module itself is built by Kbuild
# (see Kbuild); this Makefile only drives the scripts.
#
#   make setup       install the toolchain (as root, idempotent)
#   make kernel      build the patched kernel, test_hmm.ko and hmm-tests
#   make kernel-debug, module-debug   the same on the debug kernel (KASAN, ...)
#   make             build the Rust module (rust_hmm_dmirror.ko)
#   make selftests   build the userspace selftest
#   make demo        run the demo in a VM
#   make check       set up, build and run every test
#   make check-debug the robustness run on the debug kernel
#   make bench       the C and Rust modules side by side, in one VM boot
#   make clippy      Clippy over the module with the kernel's lints
#   make rust-analyzer   write rust-project.json for the module

.PHONY: all module setup kernel kernel-debug module-debug selftests demo check check-debug bench clippy rust-analyzer clean

all: module

setup:
	@if [ "$$(id -u)" = 0 ]; then scripts/setup; else sudo scripts/setup; fi

kernel:
	scripts/build-kernel

module:
	scripts/build-module

kernel-debug:
	HMM_DMIRROR_FLAVOR=debug scripts/build-kernel

module-debug:
	HMM_DMIRROR_FLAVOR=debug scripts/build-module

selftests:
	cargo build --release --locked -p hmm-dmirror-selftests

demo:
	scripts/demo

check:
	scripts/check

check-debug:
	scripts/check-debug

bench:
	scripts/bench

clippy:
	scripts/clippy

rust-analyzer:
	scripts/build-module rust-analyzer

clean:
	-scripts/build-module clean
	cargo clean
