# SPDX-License-Identifier: GPL-2.0
# Shared by the scripts that run inside the VM (scripts/vm-run). Source it;
# do not run it.

# guest_module c|rust: set module_ko, the module file vm-run handed the
# guest, module_name, its name for rmmod, and module_params, what it is
# loaded with (vm-run --coherent gives the Rust module its coherent
# memory). The names are this long so that no caller's own variables get
# overwritten.
guest_module() {
	module_params=
	case $1 in
	c) module_ko=$DMIRROR_C_KO ;;
	rust)
		module_ko=$DMIRROR_RUST_KO
		module_params=${DMIRROR_RUST_ARGS:-}
		;;
	*)
		echo "unknown module '$1': c or rust" >&2
		return 2
		;;
	esac
	module_name=$(basename "$module_ko" .ko)
}

# bench_pin: the command prefix that pins a benchmark run, its userfaultfd
# handler threads included, to the guest's last vCPU, as make bench does
# (see scripts/bench-guest for why). Fails when taskset is missing.
bench_pin() {
	if ! command -v taskset > /dev/null; then
		echo "taskset (util-linux) is missing" >&2
		return 1
	fi
	echo "taskset -c $(($(nproc) - 1))"
}
