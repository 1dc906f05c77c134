// SPDX-License-Identifier: GPL-2.0

//! Safe abstractions for HMM address-space mirroring.
//!
//! C headers: [`include/linux/hmm.h`](srctree/include/linux/hmm.h),
//! [`include/linux/mmu_notifier.h`](srctree/include/linux/mmu_notifier.h).
//!
//! A device that mirrors a process address space keeps a device page table
//! coherent with the CPU's. The pieces, as in `Documentation/mm/hmm.rst`:
//!
//! - [`Mirror`]: an mmu interval notifier, the device page table it keeps
//!   coherent and the driver lock that serializes the two. Invalidations
//!   bump the notifier sequence and clear the table under that lock.
//! - [`HmmRange`]: a window of the address space to fault or snapshot with
//!   `hmm_range_fault()`, and the retry protocol around it.
//! - [`MmapReadGuard`]: the mmap read lock, as a value that the lock-drop
//!   path ([`HmmRange::fault_unlockable`]) consumes and gives back only if
//!   the lock is still held.
//! - [`Pagemap`] and [`DevicePool`]: device memory. Device-private memory
//!   is simulated with a system page behind every device page;
//!   device-coherent memory is a fixed range of soft-reserved memory that
//!   the CPU maps. [`PagemapOps`] is what the
//!   device does on CPU faults (`migrate_to_ram`) and frees. A
//!   [`PoolAllocator`] hands out pages with the pools' lock held.
//! - [`Migration`]: `migrate_vma_*`, its setup → pages → finalize order
//!   enforced by the types [`Collected`] and [`Migrated`].
//!
//! This module is the only place of the crate with `unsafe` code.
//!
//! # Lock order
//!
//! From the outermost in:
//!
//! 1. the mmap lock ([`MmapReadGuard`]);
//! 2. the pools' lock ([`PoolAllocator`], and inside [`DevicePool`]'s
//!    methods);
//! 3. a mirror's lock ([`MirrorGuard`]). The notifier callback takes it
//!    inside every invalidation of the mirrored address space, under
//!    whatever the mm core holds then: page locks, the rmap locks, memory
//!    reclaim.
//!
//! So, while a [`MirrorGuard`] is held, nothing may start an invalidation
//! or wait for one: no [`HmmRange::fault`], no [`Migration`], no
//! [`ExclusivePage::make`], no eviction, no [`Mirror::read_begin`] and no
//! drop of a [`Mirror`]; and no allocation that may reclaim
//! (`GFP_KERNEL`). Each would wait for the callback, which waits for the
//! guard. [`Mirror::new`] registers with the mm, which takes the mmap lock
//! for writing: never call it under an [`MmapReadGuard`]. The types do not
//! rule these out (a lock held is not a type here); each method says so.
//!
//! The mmap lock is not recursive: a second read lock of the same mm by
//! the task that holds one waits for ever behind a waiting writer. So no
//! [`MmapReadGuard::lock`], [`MmapReadGuard::lock_killable`],
//! [`HmmRange::begin`] or [`HmmRange::resume`] while an [`MmapReadGuard`]
//! of the same mm lives, nor in [`PagemapOps::migrate_to_ram`], which the
//! mm core calls with the lock held.
//!
//! Pages held locked are a lock too: a [`Collected`] or [`Migrated`] holds
//! its source folios behind migration entries, an [`ExclusivePage`] its
//! folio behind a device-exclusive entry. While one lives, nothing of the
//! same task may touch its range: no fault, no user copy, no other
//! migration or [`ExclusivePage::make`]. Each would wait, unkillable, for
//! the lock the task itself holds. Nor may a user copy run under a
//! [`MirrorGuard`]: a copy-on-write fault invalidates.
//!
//! # Leaks
//!
//! Leaking a value with `mem::forget` is safe Rust, and here it costs a
//! hang, never undefined behaviour, with one exception. A forgotten
//! [`Collected`], [`Migrated`] or [`ExclusivePage`] keeps its folios
//! locked behind migration or device-exclusive entries, and a forgotten
//! [`DevicePage`] keeps its pagemap: whoever touches those pages, or
//! removes the pagemap, waits for ever. A forgotten [`PoolsRegistration`]
//! keeps its pagemaps mapped after the module is gone, with ops that
//! point into its freed text: the same hole as forgetting any
//! registration of the kernel crate (a `MiscDeviceRegistration`, say),
//! which the module's own structure, not a type, rules out.
//!
//! User space can hold a device page too: a device-coherent page that a
//! process pins with `vmsplice()` into a pipe it keeps open cannot be
//! migrated, so eviction leaves it, and dropping the
//! [`PoolsRegistration`] (module exit) waits until the pipe is closed, as
//! `memunmap_pages()` does for C.

mod exclusive;
mod migrate;
mod mirror;
mod mmap_lock;
mod page_table;
mod pagemap;
mod pool;
mod range;

pub use exclusive::ExclusivePage;
pub use migrate::{
    Collected, Destination, Migrated, Migration, Source, SystemPage, SystemPageRef,
    MAX_MIGRATE_PAGES,
};
pub use mirror::{Mirror, MirrorGuard, Seq};
pub use mmap_lock::MmapReadGuard;
pub use page_table::{DevicePageTable, MirroredAccess};
pub use pagemap::{
    CpuFault, DevicePage, DevicePageRef, FaultError, MemoryKind, Pagemap, PagemapOps, CHUNK_SIZE,
    FOLIO_ORDER, FOLIO_PAGES,
};
pub use pool::{DevicePool, PoolAllocator, PoolsRegistration, MAX_POOLS};
pub use range::{
    HmmRange, LockedRange, PageKind, Request, ValidPfn, MAX_WINDOW_PAGES, PMD_SHIFT, PUD_SHIFT,
};

use kernel::{
    bindings,
    ffi::{self, c_void},
};

/// An identity for device memory: the `owner` of a `dev_pagemap`, of a
/// migration, or of an mmu notifier event.
///
/// It is only ever compared, never dereferenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner(usize);

impl Owner {
    /// The identity of a `'static` object, for example a per-device static.
    pub fn of<T>(object: &'static T) -> Self {
        Owner(core::ptr::from_ref(object) as usize)
    }

    /// The identity of `object` for as long as it lives at its address,
    /// for example a field of a pinned object. It must not be zero-sized,
    /// or it may share its address with other objects. Not public: the
    /// owner of a mirror's own migrations is made this way from a private
    /// field, so that no other owner can equal it.
    pub(super) fn of_pinned<T>(object: &T) -> Self {
        Owner(core::ptr::from_ref(object) as usize)
    }

    fn from_ptr(ptr: *mut c_void) -> Option<Self> {
        (!ptr.is_null()).then_some(Owner(ptr as usize))
    }

    fn as_ptr(self) -> *mut c_void {
        self.0 as *mut c_void
    }
}

/// Unlocks the folio of `page` and drops a reference to it.
///
/// # Safety
///
/// The caller holds the folio's lock and a reference to it, and gives up
/// both.
unsafe fn folio_unlock_put(page: *mut bindings::page) {
    // SAFETY: The caller's reference keeps `page` and its folio live.
    let folio = unsafe { bindings::page_folio(page) };
    // SAFETY: The caller holds the folio lock and gives it up here.
    unsafe { bindings::folio_unlock(folio) };
    // SAFETY: The caller holds a reference and gives it up here.
    unsafe { bindings::folio_put(folio) };
}

/// The page `i` pages after `page` in `page`'s folio, if the folio
/// reaches that far.
///
/// # Safety
///
/// `page` is referenced for the call, so its folio does not change.
unsafe fn folio_page_after(
    page: core::ptr::NonNull<bindings::page>,
    i: usize,
) -> Option<core::ptr::NonNull<bindings::page>> {
    // SAFETY: `page` is referenced, per the caller, so its folio and the
    // folio's first page are valid.
    let (pfn, head, order) = unsafe {
        let folio = bindings::page_folio(page.as_ptr());
        (
            bindings::page_to_pfn(page.as_ptr()) as usize,
            bindings::page_to_pfn(bindings::folio_page(folio, 0)) as usize,
            bindings::folio_order(folio),
        )
    };
    // `pfn` is in the folio, so the pages left from it do not wrap;
    // comparing `i` with them does not overflow for any `i`.
    if i >= head + (1usize << order) - pfn {
        return None;
    }
    // SAFETY: A pfn of the same referenced folio, so one with a memmap.
    core::ptr::NonNull::new(unsafe { bindings::pfn_to_page((pfn + i) as ffi::c_ulong) })
}

/// Whether the current task has a fatal signal pending: a fault loop that
/// may retry for ever checks this to return `EINTR` instead.
pub fn fatal_signal_pending() -> bool {
    // SAFETY: `current` is valid in the process context that calls this.
    unsafe { bindings::fatal_signal_pending(bindings::get_current()) != 0 }
}
