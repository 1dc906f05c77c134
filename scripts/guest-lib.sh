# SPDX-License-Identifier: GPL-2.0
# Shared by the scripts that run inside the VM (scripts/vm-run). Source it;
# do not run it.

# guest_module c|rust: set ko, the module file vm-run handed the guest,
# and name, the module's name for rmmod.
guest_module() {
	case $1 in
	c) ko=$DMIRROR_C_KO ;;
	rust) ko=$DMIRROR_RUST_KO ;;
	*)
		echo "unknown module '$1': c or rust" >&2
		return 2
		;;
	esac
	name=$(basename "$ko" .ko)
}
