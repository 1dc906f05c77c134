# SPDX-License-Identifier: GPL-2.0
# Shared settings for the project's scripts. Source it; do not run it.
#
# Everything version-like lives here, so that the kernel cache key and the
# set-up script agree on what "the toolchain" is.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Pinned tools.
BINDGEN_VERSION=0.73.2
VIRTME_NG_VERSION=1.42
LLVM_VERSION=19
KERNEL_SOURCE_PKG=linux-source-7.3

# Where installed tools and cached builds live: outside the work tree.
TOOLS_DIR=${HMM_DMIRROR_TOOLS:-/opt/rust-hmm-dmirror}
CACHE_DIR=${HMM_DMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rust-hmm-dmirror}

BINDGEN=$TOOLS_DIR/bin/bindgen
CLIPPY_DRIVER=/usr/bin/clippy-driver
VNG=$TOOLS_DIR/venv/bin/vng
export LIBCLANG_PATH=/usr/lib/llvm-$LLVM_VERSION/lib
# venv/bin goes last: vng runs its helpers from PATH, but its python3
# must not shadow the system one.
export PATH=/usr/lib/llvm-$LLVM_VERSION/bin:$TOOLS_DIR/bin:$PATH:$TOOLS_DIR/venv/bin

# Arguments every kernel and module build gets. rustup's rustc comes first
# in PATH on these machines but has no rust-src, so name Debian's.
KMAKE_ARGS=(LLVM=-$LLVM_VERSION RUSTC=/usr/bin/rustc BINDGEN="$BINDGEN" HOSTRUSTC=/usr/bin/rustc)

# use_flavor FLAVOR: pick the kernel to build or boot. "" is the test
# kernel; "debug" adds KASAN, kmemleak and fault injection. Each flavor has
# its own cache, its own module build and its own config fragments.
use_flavor() {
	FLAVOR=$1
	case $FLAVOR in
	"")
		FRAGMENTS=("$ROOT/config/vm.config" "$ROOT/config/dmirror.config")
		MODULE_DIR=$ROOT/build/module
		;;
	debug)
		FRAGMENTS=("$ROOT/config/vm.config" "$ROOT/config/dmirror.config" "$ROOT/config/debug.config")
		MODULE_DIR=$ROOT/build/module-debug
		;;
	*) die "unknown kernel flavor '$FLAVOR' (known: debug)" ;;
	esac
	KERNEL_CACHE=$CACHE_DIR/kernel${FLAVOR:+-$FLAVOR}
	# Where `make kernel` leaves the current build: a symlink into the cache.
	KDIR_LINK=$KERNEL_CACHE/current
	RUST_KO=$MODULE_DIR/rust_hmm_dmirror.ko
}

step() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# now_s: seconds since the epoch, for stage timings.
now_s() { date +%s; }
took() { printf '    (%ds)\n' $(( $(now_s) - $1 )); }

use_flavor "${HMM_DMIRROR_FLAVOR:-}"
