// SPDX-License-Identifier: GPL-2.0

//! The mmap read lock as a value.

use kernel::{
    bindings,
    error::to_result,
    ffi::c_ulong,
    mm::{virt::VmaRef, MmWithUser},
    prelude::*,
    types::NotThreadSafe, //
};

/// A held mmap read lock.
///
/// Like [`kernel::mm::MmapReadGuard`], but it tells which address space it
/// locks, which lets [`HmmRange`](super::HmmRange) check that it faults the
/// address space whose lock is held, and it can be taken killably. Code that
/// may drop the lock takes the guard by value and hands it back only if the
/// lock is still held.
///
/// # Invariants
///
/// The mmap read lock of `mm` is held for as long as this value exists.
pub struct MmapReadGuard<'a> {
    mm: &'a MmWithUser,
    _nts: NotThreadSafe,
}

impl<'a> MmapReadGuard<'a> {
    /// Takes the mmap read lock of `mm`.
    pub fn lock(mm: &'a MmWithUser) -> Self {
        // SAFETY: `mm` is a valid address space with `mm_users > 0` for `'a`.
        unsafe { bindings::mmap_read_lock(mm.as_raw()) };
        // INVARIANT: The lock was just taken.
        Self {
            mm,
            _nts: NotThreadSafe,
        }
    }

    /// Takes the mmap read lock of `mm`, or fails with `EINTR` when a fatal
    /// signal arrives while waiting.
    pub fn lock_killable(mm: &'a MmWithUser) -> Result<Self> {
        // SAFETY: `mm` is a valid address space with `mm_users > 0` for `'a`.
        to_result(unsafe { bindings::mmap_read_lock_killable(mm.as_raw()) })?;
        // INVARIANT: The lock was just taken.
        Ok(Self {
            mm,
            _nts: NotThreadSafe,
        })
    }

    /// The address space whose lock this is.
    pub fn mm(&self) -> &'a MmWithUser {
        self.mm
    }

    /// The VMA that contains `addr`, if any; valid while the lock is held.
    pub fn vma_lookup(&self, addr: usize) -> Option<&VmaRef> {
        // SAFETY: The mmap read lock of `mm` is held, as `vma_lookup` needs.
        let vma = unsafe { bindings::vma_lookup(self.mm.as_raw(), addr as c_ulong) };
        if vma.is_null() {
            return None;
        }
        // SAFETY: `vma` is a VMA of `mm`, valid while its mmap read lock is
        // held, which is for as long as `self` is borrowed.
        Some(unsafe { VmaRef::from_raw(vma) })
    }

    /// Disposes of the guard without unlocking, after C code released the
    /// lock on our behalf.
    pub(super) fn forget_released(self) {
        core::mem::forget(self);
    }
}

impl Drop for MmapReadGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the lock is held; it is released once.
        unsafe { bindings::mmap_read_unlock(self.mm.as_raw()) };
    }
}
