// SPDX-License-Identifier: GPL-2.0

//! Migration between system memory and device-private memory
//! (`migrate_vma_*`, `migrate_device_*`).
//!
//! C header: [`include/linux/migrate.h`](srctree/include/linux/migrate.h).
//!
//! A migration of a virtual address range goes, in this order:
//!
//! 1. [`Migration::setup`] (or [`Migration::setup_fault`] in a CPU fault):
//!    `migrate_vma_setup()` collects and locks the source pages and puts
//!    migration entries in the CPU page table. It gives a [`Collected`].
//! 2. [`Collected::source`] tells what is at each page;
//!    [`Collected::set_destination`] hands over a destination page, with
//!    the data copied in.
//! 3. [`Collected::pages`]: `migrate_vma_pages()` moves the struct page
//!    metadata. It gives a [`Migrated`], which tells which pages moved.
//! 4. Dropping the [`Migrated`] (or [`Migrated::finalize`]):
//!    `migrate_vma_finalize()` maps the new pages, or the old ones back.
//!
//! Dropping a [`Collected`] finalizes too, which restores every page: an
//! error path cannot leave migration entries behind.

use super::{
    pagemap::{DevicePage, DevicePageRef, Pagemap, GFP_HIGHUSER_MOVABLE},
    CpuFault, MirrorGuard, MirrorOps, MirroredAccess, MmapReadGuard, Owner, Seq,
};
use core::{marker::PhantomData, ptr::NonNull};
use kernel::{
    bindings,
    error::to_result,
    ffi::c_ulong,
    mm::virt::VmaRef,
    page::{PAGE_SHIFT, PAGE_SIZE},
    prelude::*, //
};

const PFN_VALID: c_ulong = bindings::MIGRATE_PFN_VALID as c_ulong;
const PFN_MIGRATE: c_ulong = bindings::MIGRATE_PFN_MIGRATE as c_ulong;
const PFN_WRITE: c_ulong = bindings::MIGRATE_PFN_WRITE as c_ulong;

/// The most pages one migration covers, as in C (`PTRS_PER_PTE`).
pub const MAX_MIGRATE_PAGES: usize = 512;

/// Which pages a migration collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// System memory, and holes (to migrate to the device).
    System,
    /// Device-private pages of the migration's owner (to migrate back).
    DevicePrivate,
}

/// What is at one page of a [`Collected`] migration.
pub enum Source<'a> {
    /// Nothing the migration can move: skip it.
    Skip,
    /// A hole or the zero page: the destination starts zeroed.
    Empty,
    /// A system page.
    System(SystemPageRef<'a>),
    /// A device-private page of a [`Pagemap`].
    Device(DevicePageRef<'a>),
}

/// A system page locked and referenced by a migration for `'a`.
///
/// # Invariants
///
/// `page` is a valid system page, referenced for `'a`.
#[derive(Clone, Copy)]
pub struct SystemPageRef<'a> {
    page: NonNull<bindings::page>,
    _ref: PhantomData<&'a ()>,
}

/// A new system page, locked, with one reference: the destination of a
/// migration back to system memory.
///
/// # Invariants
///
/// `page` is a system page we allocated, locked, with the one reference
/// the allocation gave.
pub struct SystemPage {
    page: NonNull<bindings::page>,
}

impl SystemPage {
    /// Allocates a page for user memory (`GFP_HIGHUSER_MOVABLE`).
    pub fn alloc() -> Result<Self> {
        Self::alloc_flags(GFP_HIGHUSER_MOVABLE)
    }

    fn alloc_flags(gfp: bindings::gfp_t) -> Result<Self> {
        // SAFETY: Allocating a page has no precondition.
        let page = NonNull::new(unsafe { bindings::alloc_pages_noprof(gfp, 0) }).ok_or(ENOMEM)?;
        // SAFETY: The page is ours alone; locking it cannot block for long.
        unsafe { bindings::lock_page(page.as_ptr()) };
        // INVARIANT: Just allocated and locked.
        Ok(Self { page })
    }

    /// Copies the data of the device page `src` into this page.
    pub fn copy_from_device(&mut self, src: &DevicePageRef<'_>) {
        // SAFETY: This page is ours; `src` and its backing page are valid
        // while it is borrowed.
        unsafe { bindings::copy_highpage(self.page.as_ptr(), src.backing()) };
    }

    fn into_raw(self) -> *mut bindings::page {
        let page = self.page.as_ptr();
        core::mem::forget(self);
        page
    }
}

impl Drop for SystemPage {
    fn drop(&mut self) {
        // SAFETY: By the type invariant we hold the lock and the reference.
        unsafe {
            bindings::unlock_page(self.page.as_ptr());
            bindings::put_page(self.page.as_ptr());
        }
    }
}

impl DevicePage {
    /// Copies `src` into this page's backing page, or zeroes it when there
    /// is no source page.
    pub fn copy_from_system(&mut self, src: Option<&SystemPageRef<'_>>) {
        let dst = self.backing();
        match src {
            // SAFETY: The backing page is ours while the device page is;
            // `src` is valid while borrowed.
            Some(src) => unsafe { bindings::copy_highpage(dst, src.page.as_ptr()) },
            // SAFETY: As above.
            None => unsafe { bindings::clear_highpage(dst) },
        }
    }
}

/// A destination page for [`Collected::set_destination`].
pub enum Destination {
    /// A device page, for a migration to the device.
    Device(DevicePage),
    /// A system page, for a migration back to system memory.
    System(SystemPage),
}

/// The `migrate_vma` arguments and pfn arrays of a migration that is set
/// up; finalized on drop.
///
/// # Invariants
///
/// `migrate_vma_setup()` succeeded on `args`, whose `src` and `dst` point
/// into `src` and `dst` (of `args.npages` entries each), and
/// `migrate_vma_finalize()` has not run yet. Every `dst` entry is zero or
/// a page whose lock and reference the migration owns.
struct Raw<'a> {
    args: bindings::migrate_vma,
    src: KVVec<c_ulong>,
    dst: KVVec<c_ulong>,
    _vma: PhantomData<&'a VmaRef>,
}

impl Raw<'_> {
    fn len(&self) -> usize {
        self.args.npages as usize
    }
}

impl Drop for Raw<'_> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the migration is set up and not
        // finalized; the VMA is still locked for `'a`.
        unsafe { bindings::migrate_vma_finalize(&mut self.args) };
    }
}

/// A migration entry point.
pub struct Migration;

impl Migration {
    /// Sets up the migration of `[start, end)`, inside `vma` and at most
    /// [`MAX_MIGRATE_PAGES`] pages (`migrate_vma_setup()`). The mmap read
    /// lock must be held, which `vma` proves. `owner` is the device's: the
    /// device-private pages to collect, and the owner of the invalidation.
    pub fn setup<'a>(
        _lock: &'a MmapReadGuard<'_>,
        vma: &'a VmaRef,
        start: usize,
        end: usize,
        select: Select,
        owner: Owner,
    ) -> Result<Collected<'a>> {
        Self::setup_raw(
            vma.as_ptr(),
            start,
            end,
            select,
            owner,
            core::ptr::null_mut(),
        )
    }

    /// Sets up the migration of `[start, end)` back to system memory from
    /// `migrate_to_ram`, with the faulting page as `fault_page`.
    pub fn setup_fault<'a>(
        fault: &'a CpuFault<'_>,
        start: usize,
        end: usize,
        owner: Owner,
    ) -> Result<Collected<'a>> {
        let vma = fault.vmf.__bindgen_anon_1.vma;
        Self::setup_raw(
            vma,
            start,
            end,
            Select::DevicePrivate,
            owner,
            fault.vmf.page,
        )
    }

    fn setup_raw<'a>(
        vma: *mut bindings::vm_area_struct,
        start: usize,
        end: usize,
        select: Select,
        owner: Owner,
        fault_page: *mut bindings::page,
    ) -> Result<Collected<'a>> {
        if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || start >= end {
            return Err(EINVAL);
        }
        let npages = (end - start) >> PAGE_SHIFT;
        if npages > MAX_MIGRATE_PAGES {
            return Err(EINVAL);
        }
        let mut src = KVVec::with_capacity(npages, GFP_KERNEL)?;
        let mut dst = KVVec::with_capacity(npages, GFP_KERNEL)?;
        src.resize(npages, 0, GFP_KERNEL)?;
        dst.resize(npages, 0, GFP_KERNEL)?;
        let flags = match select {
            Select::System => bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_SYSTEM,
            Select::DevicePrivate => {
                bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_DEVICE_PRIVATE
            }
        };
        let mut args = bindings::migrate_vma {
            vma,
            dst: dst.as_mut_ptr(),
            src: src.as_mut_ptr(),
            cpages: 0,
            npages: 0,
            start: start as c_ulong,
            end: end as c_ulong,
            pgmap_owner: owner.as_ptr(),
            flags: flags as c_ulong,
            fault_page,
        };
        // SAFETY: `vma` is locked for `'a` (the caller holds the mmap read
        // lock, or handles a fault on it); the arrays have room for every
        // page of `[start, end)` and do not move (they are on the heap).
        // `migrate_vma_setup` checks that the range is inside the VMA.
        to_result(unsafe { bindings::migrate_vma_setup(&mut args) })?;
        // INVARIANT: Set up; `dst` is all zeroes.
        Ok(Collected {
            raw: Raw {
                args,
                src,
                dst,
                _vma: PhantomData,
            },
        })
    }
}

/// A migration whose source pages are collected: fill in destinations,
/// then [`pages`](Self::pages).
pub struct Collected<'a> {
    raw: Raw<'a>,
}

impl<'a> Collected<'a> {
    /// Number of pages in the range.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether the range is empty (never, once set up).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of pages collected (`cpages`).
    pub fn collected(&self) -> usize {
        self.raw.args.cpages as usize
    }

    /// Whether the page at `index` is mapped writable.
    pub fn is_writable(&self, index: usize) -> bool {
        self.raw.src.get(index).is_some_and(|&e| e & PFN_WRITE != 0)
    }

    /// What is at the page at `index` (from the start of the range).
    pub fn source(&self, index: usize) -> Source<'_> {
        let Some(&entry) = self.raw.src.get(index) else {
            return Source::Skip;
        };
        if entry & PFN_MIGRATE == 0 {
            return Source::Skip;
        }
        // SAFETY: Decoding a `migrate_pfn` entry.
        let page = unsafe { bindings::migrate_pfn_to_page(entry) };
        let Some(page) = NonNull::new(page) else {
            return Source::Empty;
        };
        // SAFETY: The migration holds a reference to (and the lock of) every
        // source page it collected, until finalize, which needs `self`.
        if unsafe { bindings::is_zone_device_page(page.as_ptr()) } {
            // SAFETY: As above, the page is referenced while `self` is borrowed.
            return match unsafe { Pagemap::of_page(page.as_ptr()) } {
                // INVARIANT: A collected page is allocated, so it has a
                // backing page; both live while the migration holds it.
                Some(pagemap) => Source::Device(DevicePageRef { page, pagemap }),
                None => Source::Skip,
            };
        }
        // INVARIANT: As above, referenced while `self` is borrowed.
        Source::System(SystemPageRef {
            page,
            _ref: PhantomData,
        })
    }

    /// Hands `page` over as the destination of the page at `index`,
    /// writable in the CPU page table if `writable`. A destination given
    /// twice replaces the first, which is released.
    pub fn set_destination(&mut self, index: usize, page: Destination, writable: bool) -> Result {
        if index >= self.len() {
            return Err(EINVAL);
        }
        let raw = match page {
            Destination::Device(page) => page.into_raw(),
            Destination::System(page) => page.into_raw(),
        };
        let old = self.raw.dst[index];
        // SAFETY: `raw` is a page we own (locked, referenced).
        self.raw.dst[index] = unsafe { bindings::migrate_pfn(bindings::page_to_pfn(raw)) }
            | if writable { PFN_WRITE } else { 0 };
        // SAFETY: Decoding a `migrate_pfn` entry.
        let old = unsafe { bindings::migrate_pfn_to_page(old) };
        if !old.is_null() {
            // SAFETY: By the type invariant of `Raw`, the migration owned
            // its lock and reference; it no longer refers to it.
            unsafe {
                bindings::unlock_page(old);
                bindings::put_page(old);
            }
        }
        Ok(())
    }

    /// Moves the collected pages to their destinations
    /// (`migrate_vma_pages()`). Pages without a destination stay.
    pub fn pages(mut self) -> Migrated<'a> {
        // SAFETY: Set up and not finalized, by the type invariant of `Raw`.
        unsafe { bindings::migrate_vma_pages(&mut self.raw.args) };
        Migrated { raw: self.raw }
    }
}

/// A migration whose pages moved; finalized on drop.
pub struct Migrated<'a> {
    raw: Raw<'a>,
}

impl Migrated<'_> {
    /// Whether the page at `index` moved.
    pub fn moved(&self, index: usize) -> bool {
        self.raw
            .src
            .get(index)
            .is_some_and(|&e| e & PFN_MIGRATE != 0)
    }

    /// Pages that were present and moved (C's
    /// `dmirror_successful_migrated_pages`).
    pub fn moved_present(&self) -> usize {
        self.raw
            .src
            .iter()
            .filter(|&&e| e & PFN_VALID != 0 && e & PFN_MIGRATE != 0)
            .count()
    }

    /// Maps the device pages that this migration moved into `guard`'s
    /// device page table, by their backing pages, unless an invalidation
    /// hit the mirror since `seq` (then returns `false` and maps nothing).
    ///
    /// `seq` must have been taken before [`Migration::setup`] by a mirror
    /// whose ops ignore this migration's own invalidation, or the check
    /// always fails. With it, no invalidation ran between setup and now, so
    /// every moved page is going to be mapped by finalize; any later unmap
    /// invalidates, and so erases, the entries.
    pub fn map_into<T: MirrorOps>(&self, guard: &MirrorGuard<'_, T>, seq: Seq) -> Result<bool> {
        if guard.has_changed(seq) {
            return Ok(false);
        }
        let first = (self.raw.args.start as usize) >> PAGE_SHIFT;
        for index in 0..self.raw.len() {
            let src = self.raw.src[index];
            let dst = self.raw.dst[index];
            if src & PFN_MIGRATE == 0 {
                continue;
            }
            // SAFETY: Decoding a `migrate_pfn` entry.
            let page = unsafe { bindings::migrate_pfn_to_page(dst) };
            let Some(page) = NonNull::new(page) else {
                continue;
            };
            // SAFETY: The migration owns a reference to its destinations
            // until finalize.
            let Some(pagemap) = (unsafe { Pagemap::of_page(page.as_ptr()) }) else {
                continue;
            };
            let device = DevicePageRef { page, pagemap };
            let access = if dst & PFN_WRITE != 0 {
                MirroredAccess::Write
            } else {
                MirroredAccess::Read
            };
            // SAFETY: The backing page lives as long as the device page,
            // which finalize maps (its migration succeeded and nothing
            // invalidated the range since `seq`); it is erased from the
            // table with that mapping.
            unsafe { guard.store_raw(first + index, device.backing(), access) }?;
        }
        Ok(true)
    }

    /// Finalizes the migration (`migrate_vma_finalize()`): maps the moved
    /// pages, and the others back.
    pub fn finalize(self) {}
}

/// Migrates the in-use pages of `[first_pfn, first_pfn + npages)`, device
/// pages of [`Pagemap`]s, back to system memory (`migrate_device_range`).
pub(super) fn evict_range(first_pfn: usize, npages: usize) {
    let mut pfn = first_pfn;
    let end = first_pfn + npages;
    while pfn < end {
        let n = MAX_MIGRATE_PAGES.min(end - pfn);
        evict_batch(pfn, n);
        pfn += n;
    }
}

fn evict_batch(first_pfn: usize, npages: usize) {
    let mut src = KVVec::<c_ulong>::new();
    let mut dst = KVVec::<c_ulong>::new();
    if src.resize(npages, 0, GFP_KERNEL).is_err() || dst.resize(npages, 0, GFP_KERNEL).is_err() {
        // The caller evicts again until no page is left.
        return;
    }
    // SAFETY: The arrays have `npages` entries; the pfns are those of a
    // mapped pagemap. Pages in use are locked and referenced into `src`.
    let ret = unsafe {
        bindings::migrate_device_range(src.as_mut_ptr(), first_pfn as c_ulong, npages as c_ulong)
    };
    if ret != 0 {
        return;
    }
    for index in 0..npages {
        let entry = src[index];
        if entry & PFN_MIGRATE == 0 {
            continue;
        }
        // SAFETY: Decoding a `migrate_pfn` entry.
        let page = unsafe { bindings::migrate_pfn_to_page(entry) };
        let Some(page) = NonNull::new(page) else {
            continue;
        };
        // SAFETY: The migration holds a reference to the page.
        let Some(pagemap) = (unsafe { Pagemap::of_page(page.as_ptr()) }) else {
            continue;
        };
        let device = DevicePageRef { page, pagemap };
        // Eviction must not fail, as in C.
        let Ok(mut new) =
            SystemPage::alloc_flags(GFP_HIGHUSER_MOVABLE | (1 << bindings::___GFP_NOFAIL_BIT))
        else {
            continue;
        };
        new.copy_from_device(&device);
        let raw = new.into_raw();
        // SAFETY: `raw` is a page we own; it is handed over to the migration.
        dst[index] =
            unsafe { bindings::migrate_pfn(bindings::page_to_pfn(raw)) } | (entry & PFN_WRITE);
    }
    // SAFETY: `src` comes from `migrate_device_range` over these pfns, and
    // `dst` holds zeroes or pages we handed over, locked and referenced.
    unsafe {
        bindings::migrate_device_pages(src.as_mut_ptr(), dst.as_mut_ptr(), npages as c_ulong);
        bindings::migrate_device_finalize(src.as_mut_ptr(), dst.as_mut_ptr(), npages as c_ulong);
    }
}
