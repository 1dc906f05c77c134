// SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note

//! The dmirror ABI, the Rust twin of `uapi/hmm_dmirror_uapi.h`.
//!
//! This file has no dependencies and no crate attributes, so that the
//! kernel module can include it with `#[path]` and the userspace crate can
//! re-export it. The `const` assertions at the bottom pin every number.

/// The argument of every dmirror ioctl (`struct hmm_dmirror_cmd`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmmDmirrorCmd {
    /// (in) user address the device reads or writes.
    pub addr: u64,
    /// (in) user address of the buffer data is copied to or from.
    pub ptr: u64,
    /// (in) number of pages.
    pub npages: u64,
    /// (out) number of pages copied.
    pub cpages: u64,
    /// (out) number of device page faults seen.
    pub faults: u64,
}

impl HmmDmirrorCmd {
    /// Decodes the struct as the ioctl caller laid it out.
    pub fn from_ne_bytes(bytes: [u8; HMM_DMIRROR_CMD_SIZE]) -> Self {
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(word)
        };
        Self {
            addr: field(0),
            ptr: field(1),
            npages: field(2),
            cpages: field(3),
            faults: field(4),
        }
    }

    /// Encodes the struct for the ioctl caller.
    pub fn to_ne_bytes(&self) -> [u8; HMM_DMIRROR_CMD_SIZE] {
        let mut bytes = [0u8; HMM_DMIRROR_CMD_SIZE];
        let fields = [self.addr, self.ptr, self.npages, self.cpages, self.faults];
        for (chunk, field) in bytes.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&field.to_ne_bytes());
        }
        bytes
    }
}

/// `sizeof(struct hmm_dmirror_cmd)`.
pub const HMM_DMIRROR_CMD_SIZE: usize = core::mem::size_of::<HmmDmirrorCmd>();

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOWR('H', nr, struct hmm_dmirror_cmd)`, as the asm-generic encoding.
pub const fn dmirror_iowr(nr: u32) -> u32 {
    ((IOC_READ | IOC_WRITE) << IOC_DIRSHIFT)
        | ((HMM_DMIRROR_CMD_SIZE as u32) << IOC_SIZESHIFT)
        | ((b'H' as u32) << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
}

/// The ioctl number's `nr` field.
pub const fn ioc_nr(cmd: u32) -> u32 {
    (cmd >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)
}

/// Read pages through the mirror, faulting them in as needed.
pub const HMM_DMIRROR_READ: u32 = dmirror_iowr(0x00);
/// Write pages through the mirror, faulting them in writable.
pub const HMM_DMIRROR_WRITE: u32 = dmirror_iowr(0x01);
/// Migrate pages to device memory, then read them.
pub const HMM_DMIRROR_MIGRATE_TO_DEV: u32 = dmirror_iowr(0x02);
/// Migrate pages back to system memory.
pub const HMM_DMIRROR_MIGRATE_TO_SYS: u32 = dmirror_iowr(0x03);
/// Report one `HMM_DMIRROR_PROT_*` byte per page, without faulting.
pub const HMM_DMIRROR_SNAPSHOT: u32 = dmirror_iowr(0x04);
/// Take exclusive (atomic) device access to pages.
pub const HMM_DMIRROR_EXCLUSIVE: u32 = dmirror_iowr(0x05);
/// Fail with `EPERM` if any page is still exclusive.
pub const HMM_DMIRROR_CHECK_EXCLUSIVE: u32 = dmirror_iowr(0x06);
/// Evict and release all device memory of the device.
pub const HMM_DMIRROR_RELEASE: u32 = dmirror_iowr(0x07);
/// Set the mirror's flags to `npages`.
pub const HMM_DMIRROR_FLAGS: u32 = dmirror_iowr(0x08);
/// Upstream's name for number 9.
pub const HMM_DMIRROR_READ_UNLOCKED: u32 = dmirror_iowr(0x09);
/// The seed series' name for number 9: a read whose faults may drop the
/// mmap lock, served by `hmm_range_fault_unlockable()`.
pub const HMM_DMIRROR_READ_UNLOCKABLE: u32 = HMM_DMIRROR_READ_UNLOCKED;

/// `HMM_DMIRROR_FLAGS` bit: the next migration fails its first allocation.
pub const HMM_DMIRROR_FLAG_FAIL_ALLOC: u64 = 1 << 0;
/// `HMM_DMIRROR_FLAGS` bit, this module's test extension (C ignores it):
/// the Nth device memory allocation of migrations to the device after
/// FLAGS fails, once; N is in bits 16-31, from 1 (0: none).
pub const HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH: u64 = 1 << 1;
/// Where N sits in the flags of [`HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH`].
pub const HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT: u32 = 16;

/// The flags that make allocation `n` (from 1) fail.
pub const fn hmm_dmirror_fail_alloc_nth(n: u16) -> u64 {
    HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH | ((n as u64) << HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT)
}

/// N of [`HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH`] in `flags` (`HMM_DMIRROR_FAIL_ALLOC_NTH()`).
pub const fn hmm_dmirror_fail_alloc_nth_of(flags: u64) -> u64 {
    (flags >> HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT) & 0xffff
}

/// No valid mirror entry for this page.
pub const HMM_DMIRROR_PROT_ERROR: u8 = 0xFF;
/// Unpopulated entry, or one with no access.
pub const HMM_DMIRROR_PROT_NONE: u8 = 0x00;
/// Read-only entry.
pub const HMM_DMIRROR_PROT_READ: u8 = 0x01;
/// Read/write entry.
pub const HMM_DMIRROR_PROT_WRITE: u8 = 0x02;
/// Part of a PMD-sized mapping.
pub const HMM_DMIRROR_PROT_PMD: u8 = 0x04;
/// Part of a PUD-sized mapping.
pub const HMM_DMIRROR_PROT_PUD: u8 = 0x08;
/// The shared zero page.
pub const HMM_DMIRROR_PROT_ZERO: u8 = 0x10;
/// A device-private page of this device.
pub const HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL: u8 = 0x20;
/// A device-private page of another device.
pub const HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE: u8 = 0x30;
/// A device-coherent page of this device.
pub const HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL: u8 = 0x40;
/// A device-coherent page of another device.
pub const HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE: u8 = 0x50;

/// Devices 0 and 1: device-private memory.
pub const HMM_DMIRROR_MEMORY_DEVICE_PRIVATE: u32 = 1;
/// Devices 2 and 3: device-coherent memory.
pub const HMM_DMIRROR_MEMORY_DEVICE_COHERENT: u32 = 2;

// The ABI, pinned. A change here breaks the upstream hmm-tests binary.
const _: () = {
    assert!(HMM_DMIRROR_CMD_SIZE == 40);
    assert!(core::mem::align_of::<HmmDmirrorCmd>() == 8);
    assert!(core::mem::offset_of!(HmmDmirrorCmd, addr) == 0);
    assert!(core::mem::offset_of!(HmmDmirrorCmd, ptr) == 8);
    assert!(core::mem::offset_of!(HmmDmirrorCmd, npages) == 16);
    assert!(core::mem::offset_of!(HmmDmirrorCmd, cpages) == 24);
    assert!(core::mem::offset_of!(HmmDmirrorCmd, faults) == 32);
    assert!(HMM_DMIRROR_READ == 0xc028_4800);
    assert!(HMM_DMIRROR_WRITE == 0xc028_4801);
    assert!(HMM_DMIRROR_MIGRATE_TO_DEV == 0xc028_4802);
    assert!(HMM_DMIRROR_MIGRATE_TO_SYS == 0xc028_4803);
    assert!(HMM_DMIRROR_SNAPSHOT == 0xc028_4804);
    assert!(HMM_DMIRROR_EXCLUSIVE == 0xc028_4805);
    assert!(HMM_DMIRROR_CHECK_EXCLUSIVE == 0xc028_4806);
    assert!(HMM_DMIRROR_RELEASE == 0xc028_4807);
    assert!(HMM_DMIRROR_FLAGS == 0xc028_4808);
    assert!(HMM_DMIRROR_READ_UNLOCKED == 0xc028_4809);
    assert!(ioc_nr(HMM_DMIRROR_READ_UNLOCKABLE) == 9);
};
