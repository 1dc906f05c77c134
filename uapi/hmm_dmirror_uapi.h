/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The dmirror ABI: identical in layout and numbers to upstream's
 * lib/test_hmm_uapi.h, so that either module serves either test program.
 * uapi/src/abi.rs is its Rust twin; `cargo test -p hmm-dmirror-uapi`
 * checks that the two agree.
 */
#ifndef _HMM_DMIRROR_UAPI_H
#define _HMM_DMIRROR_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>

/*
 * @addr: (in) user address the device will read/write
 * @ptr: (in) user address where device data is copied to/from
 * @npages: (in) number of pages to read/write
 * @cpages: (out) number of pages copied
 * @faults: (out) number of device page faults seen
 */
struct hmm_dmirror_cmd {
	__u64		addr;
	__u64		ptr;
	__u64		npages;
	__u64		cpages;
	__u64		faults;
};

#define HMM_DMIRROR_READ		_IOWR('H', 0x00, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_WRITE		_IOWR('H', 0x01, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_DEV	_IOWR('H', 0x02, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_SYS	_IOWR('H', 0x03, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_SNAPSHOT		_IOWR('H', 0x04, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_EXCLUSIVE		_IOWR('H', 0x05, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_CHECK_EXCLUSIVE	_IOWR('H', 0x06, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_RELEASE		_IOWR('H', 0x07, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_FLAGS		_IOWR('H', 0x08, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_READ_UNLOCKED	_IOWR('H', 0x09, struct hmm_dmirror_cmd)
/* The seed series' name for number 9: a read whose faults may drop mmap_lock. */
#define HMM_DMIRROR_READ_UNLOCKABLE	HMM_DMIRROR_READ_UNLOCKED

#define HMM_DMIRROR_FLAG_FAIL_ALLOC	(1ULL << 0)
/*
 * This module's test extension, not in lib/test_hmm.c (whose FLAGS ignores
 * it): the Nth device memory allocation of migrations to the device after
 * FLAGS fails, once. N is HMM_DMIRROR_FAIL_ALLOC_NTH(flags), from 1; 0
 * fails none.
 */
#define HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH	(1ULL << 1)
#define HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT	16
#define HMM_DMIRROR_FAIL_ALLOC_NTH(flags)	\
	(((flags) >> HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT) & 0xffff)

/* Values written to the buffer at hmm_dmirror_cmd.ptr by HMM_DMIRROR_SNAPSHOT. */
enum {
	HMM_DMIRROR_PROT_ERROR			= 0xFF,
	HMM_DMIRROR_PROT_NONE			= 0x00,
	HMM_DMIRROR_PROT_READ			= 0x01,
	HMM_DMIRROR_PROT_WRITE			= 0x02,
	HMM_DMIRROR_PROT_PMD			= 0x04,
	HMM_DMIRROR_PROT_PUD			= 0x08,
	HMM_DMIRROR_PROT_ZERO			= 0x10,
	HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL	= 0x20,
	HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE	= 0x30,
	HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL	= 0x40,
	HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE	= 0x50,
};

enum {
	/* 0 is reserved to catch uninitialized type fields */
	HMM_DMIRROR_MEMORY_DEVICE_PRIVATE = 1,
	HMM_DMIRROR_MEMORY_DEVICE_COHERENT,
};

#endif /* _HMM_DMIRROR_UAPI_H */
