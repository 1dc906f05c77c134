// SPDX-License-Identifier: GPL-2.0

//! Migration between system memory and device memory
//! (`migrate_vma_*`, `migrate_device_*`).
//!
//! C header: [`include/linux/migrate.h`](srctree/include/linux/migrate.h).
//!
//! A migration of a virtual address range goes, in this order:
//!
//! 1. [`Migration::to_device`], [`Migration::to_system`] (or
//!    [`Migration::setup_fault`] in a CPU fault): `migrate_vma_setup()`
//!    collects and locks the source pages and puts migration entries in
//!    the CPU page table. It gives a [`Collected`].
//! 2. [`Collected::source`] tells what is at each page;
//!    [`Collected::set_destination`] hands over a destination page, with
//!    the data copied in.
//! 3. [`Collected::pages`]: `migrate_vma_pages()` moves the struct page
//!    metadata. It gives a [`Migrated`], which tells which pages moved.
//! 4. Dropping the [`Migrated`] (or [`Migrated::finalize`]):
//!    `migrate_vma_finalize()` maps the new pages, or the old ones back.
//!
//! Dropping a [`Collected`] releases the destinations set so far and
//! finalizes too, which restores every page: an error path cannot leave
//! migration entries behind, nor map a destination that
//! `migrate_vma_pages()` never checked.

use super::{
    folio_unlock_put,
    pagemap::{DevicePage, DevicePageRef, Pagemap, FOLIO_ORDER, GFP_HIGHUSER_MOVABLE},
    CpuFault, Mirror, MirrorGuard, MirroredAccess, MmapReadGuard, Owner, Seq,
};
use core::{marker::PhantomData, ptr::NonNull};
use kernel::{
    bindings,
    error::to_result,
    ffi::c_ulong,
    mm::virt::{flags as vm_flags, VmaRef},
    page::{PAGE_SHIFT, PAGE_SIZE},
    prelude::*, //
};

const PFN_VALID: c_ulong = bindings::MIGRATE_PFN_VALID as c_ulong;
const PFN_MIGRATE: c_ulong = bindings::MIGRATE_PFN_MIGRATE as c_ulong;
const PFN_WRITE: c_ulong = bindings::MIGRATE_PFN_WRITE as c_ulong;
const PFN_COMPOUND: c_ulong = bindings::MIGRATE_PFN_COMPOUND as c_ulong;

/// The most pages one migration covers: two PMDs' worth, twice C's, so
/// that a migration can take a hole that spans PMDs whole.
pub const MAX_MIGRATE_PAGES: usize = 1024;

/// Which pages a migration collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Select {
    /// System memory, and holes (to migrate to the device).
    System,
    /// Device-private pages of the migration's owner (a CPU fault).
    DevicePrivate,
    /// Device-private and device-coherent pages of the migration's owner
    /// (to migrate back).
    Device,
}

/// What is at one page of a [`Collected`] migration.
pub enum Source<'a> {
    /// Nothing the migration can move: skip it.
    Skip,
    /// A hole or the zero page: the destination starts zeroed.
    Empty,
    /// A system page.
    System(SystemPageRef<'a>),
    /// A device page of a [`Pagemap`], private or coherent.
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

impl SystemPageRef<'_> {
    /// Page `i` of this page's folio, counting from this page; null past
    /// the end of the folio.
    fn subpage(&self, i: usize) -> *mut bindings::page {
        // SAFETY: By the type invariant the page is referenced.
        unsafe { super::folio_page_after(self.page, i) }
            .map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }
}

/// A new system page, locked, with one reference: the destination of a
/// migration back to system memory. A page that no copy filled is zeroed
/// when it becomes a destination: a fresh page holds whatever its last
/// user left there.
///
/// # Invariants
///
/// `page` is the first page of a system folio of order `order` that we
/// allocated, locked, with the one reference the allocation gave. If
/// `filled`, every page of the folio was written since.
pub struct SystemPage {
    page: NonNull<bindings::page>,
    order: u32,
    filled: bool,
}

impl SystemPage {
    /// Allocates a page for user memory (`GFP_HIGHUSER_MOVABLE`).
    pub fn alloc() -> Result<Self> {
        Self::alloc_flags(GFP_HIGHUSER_MOVABLE)
    }

    fn alloc_flags(gfp: bindings::gfp_t) -> Result<Self> {
        // SAFETY: Allocating a page has no precondition.
        let page = NonNull::new(unsafe { bindings::alloc_pages_noprof(gfp, 0) }).ok_or(ENOMEM)?;
        Ok(Self::locked(page, 0))
    }

    /// Takes a fresh folio of `order` whose first page is `page`.
    fn locked(page: NonNull<bindings::page>, order: u32) -> Self {
        // SAFETY: The folio is ours alone (so live); locking it does not
        // block.
        unsafe { bindings::folio_lock(bindings::page_folio(page.as_ptr())) };
        // INVARIANT: Just allocated and locked; not written yet.
        Self {
            page,
            order,
            filled: false,
        }
    }

    /// Page `i` of the folio, `i` below its page count.
    fn page_at(&self, i: usize) -> *mut bindings::page {
        // SAFETY: Page `i` of our own folio, by pfn.
        unsafe { bindings::pfn_to_page(bindings::page_to_pfn(self.page.as_ptr()) + i as c_ulong) }
    }

    /// Zeroes the folio unless a copy filled it.
    fn zero_unless_filled(&mut self) {
        if self.filled {
            return;
        }
        for i in 0..(1usize << self.order) {
            // SAFETY: A page of our own folio, which has a kernel mapping
            // when it is used.
            unsafe { bindings::clear_highpage(self.page_at(i)) };
        }
        // INVARIANT: Every page was just written.
        self.filled = true;
    }

    /// Copies the data of the device folio `src` (as many pages as this
    /// one has, from `src` on) into this one. Pages past the end of `src`'s
    /// folio are zeroed.
    pub fn copy_from_device(&mut self, src: &DevicePageRef<'_>) {
        for i in 0..(1usize << self.order) {
            self.copy_page_from_device(i, src, i);
        }
        // INVARIANT: Every page was copied or zeroed.
        self.filled = true;
    }

    /// Copies page `from` of `src`'s folio (counting from `src`) into page
    /// `i` of this one (zeroes it past the end of `src`'s folio).
    fn copy_page_from_device(&mut self, i: usize, src: &DevicePageRef<'_>, from: usize) {
        if i >= 1usize << self.order {
            return;
        }
        let dst = self.page_at(i);
        let backing = src.backing_after(from);
        if backing.is_null() {
            // SAFETY: `dst` is ours.
            unsafe { bindings::clear_highpage(dst) };
        } else {
            // SAFETY: `dst` is ours; the page holding `src`'s data (a
            // backing page, or the coherent page itself, in the direct map)
            // is valid while `src` is borrowed.
            unsafe { bindings::copy_highpage(dst, backing) };
        }
    }

    /// A page with the data of page `i` of the device folio `src`, for a
    /// large folio that moves back as small pages.
    pub fn alloc_copy_of(src: &DevicePageRef<'_>, i: usize) -> Result<Self> {
        let mut page = Self::alloc()?;
        page.copy_page_from_device(0, src, i);
        // INVARIANT: Its one page was copied or zeroed.
        page.filled = true;
        Ok(page)
    }

    /// Whether this is a large folio.
    pub fn is_large(&self) -> bool {
        self.order > 0
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
        unsafe { folio_unlock_put(self.page.as_ptr()) };
    }
}

impl DevicePage {
    /// Copies `src` (as many pages as this folio has, from `src` on) into
    /// this folio's backing pages, or zeroes them where there is no source
    /// page.
    pub fn copy_from_system(&mut self, src: Option<&SystemPageRef<'_>>) {
        self.copy_from_system_at(src, 0);
    }

    /// Like [`copy_from_system`](Self::copy_from_system), from the page
    /// `offset` pages after `src`, for a large source folio that moves as
    /// small pages.
    pub fn copy_from_system_at(&mut self, src: Option<&SystemPageRef<'_>>, offset: usize) {
        for i in 0..self.nr_pages() {
            let dst = self.backing_at(i);
            if dst.is_null() {
                continue;
            }
            let from = src.map_or(core::ptr::null_mut(), |src| {
                src.subpage(offset.saturating_add(i))
            });
            if from.is_null() {
                // SAFETY: `dst`, a backing page or a page of the coherent
                // folio, is ours while the device folio is.
                unsafe { bindings::clear_highpage(dst) };
            } else {
                // SAFETY: `dst`, a backing page or a page of the coherent
                // folio, is ours while the device folio is; `from` is
                // referenced while `src` is borrowed. Both have a kernel
                // mapping (coherent memory is in the direct map).
                unsafe { bindings::copy_highpage(dst, from) };
            }
        }
        self.set_filled();
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
/// a page whose lock and reference the migration owns. `pages_moved` is
/// whether `migrate_vma_pages()` has run.
struct Raw<'a> {
    args: bindings::migrate_vma,
    src: KVVec<c_ulong>,
    dst: KVVec<c_ulong>,
    pages_moved: bool,
    /// Whether the VMA is writable, as a hole that gets a page will be.
    holes_writable: bool,
    /// The mirror a migration to the device is for, and its sequence
    /// taken before setup.
    mirror: Option<(&'a Mirror, Seq)>,
    _vma: PhantomData<&'a VmaRef>,
}

impl Raw<'_> {
    fn len(&self) -> usize {
        self.args.npages
    }

    /// The source entry that says what the page at `index` is: the
    /// compound entry at the start of its PMD when setup collected the
    /// PMD whole (the entries after it are empty, and moving small pages
    /// there splits what it names), else its own.
    fn source_of(&self, index: usize) -> usize {
        let own = self.src[index];
        let into_pmd = ((self.args.start >> PAGE_SHIFT) + index) % (1usize << FOLIO_ORDER);
        match index.checked_sub(into_pmd) {
            Some(head) if head != index && own == 0 && self.src[head] & PFN_COMPOUND != 0 => {
                self.src[head]
            }
            _ => own,
        }
    }

    /// Gives back the destination at `index`, if any, and clears it.
    fn release_destination(&mut self, index: usize) {
        let entry = core::mem::take(&mut self.dst[index]);
        // SAFETY: Decoding a `migrate_pfn` entry.
        let page = unsafe { bindings::migrate_pfn_to_page(entry) };
        if page.is_null() {
            return;
        }
        // SAFETY: By the type invariant the migration owned the page's lock
        // and reference; `dst` no longer names it.
        unsafe { folio_unlock_put(page) };
    }
}

impl Drop for Raw<'_> {
    fn drop(&mut self) {
        if !self.pages_moved {
            // Without `migrate_vma_pages()`, finalize would map every
            // destination whose source is still marked MIGRATE in place of
            // the source, unchecked (mm/migrate_device.c). Give them back
            // instead, as finalize does for the pages that did not move.
            for index in 0..self.dst.len() {
                self.release_destination(index);
            }
        }
        // SAFETY: By the type invariant the migration is set up and not
        // finalized; the VMA is still locked for `'a`. Every `dst` entry is
        // zero, or went through `migrate_vma_pages()`.
        unsafe { bindings::migrate_vma_finalize(&mut self.args) };
    }
}

/// `EINVAL` unless `vma` is of the address space whose mmap read lock
/// `lock` is. The page walk asserts that lock; a VMA of another mm would be
/// walked without it. (One reached through its per-VMA lock is fine here:
/// `lock` holds the mmap lock of its mm as well.)
fn check_vma_locked(lock: &MmapReadGuard<'_>, vma: &VmaRef) -> Result {
    if !core::ptr::eq(vma.mm().as_raw(), lock.mm().as_raw()) {
        return Err(EINVAL);
    }
    Ok(())
}

/// A migration entry point. Setup and finalize invalidate the range, and
/// the notifier callbacks take the mirrors' locks: never migrate with a
/// [`MirrorGuard`] held.
pub struct Migration;

impl Migration {
    /// Sets up the migration of `[start, end)` to `mirror`'s device: the
    /// system pages and holes of the range, inside `vma` and at most
    /// [`MAX_MIGRATE_PAGES`] pages (`migrate_vma_setup()`). `vma` must be
    /// of the address space whose mmap read lock `lock` is, and the range
    /// inside `mirror`'s interval of that address space: else `EINVAL`.
    /// With `compound`, PMD-sized folios (and holes) are collected whole
    /// (`MIGRATE_VMA_SELECT_COMPOUND`).
    ///
    /// The invalidation is `mirror`'s own, and the mirror's sequence is
    /// taken just before it, so that [`Migrated::map_into`] can map the
    /// moved pages into the mirror unless something else invalidated them.
    pub fn to_device<'a>(
        lock: &'a MmapReadGuard<'_>,
        vma: &'a VmaRef,
        start: usize,
        end: usize,
        compound: bool,
        mirror: &'a Mirror,
    ) -> Result<Collected<'a>> {
        check_vma_locked(lock, vma)?;
        if !mirror.mirrors(lock.mm()) || !mirror.covers(start, end) {
            return Err(EINVAL);
        }
        // Before setup, whose invalidations it must see. With the mmap
        // lock held, `read_begin` waits only for invalidations that do not
        // need it.
        let seq = mirror.read_begin();
        let holes_writable = vma.flags() & vm_flags::WRITE != 0;
        // SAFETY: `vma` is alive for `'a`, and of the mm whose mmap read
        // lock `lock` holds for `'a`, as checked above.
        let mut collected = unsafe {
            Self::setup_raw(
                vma.as_ptr(),
                start,
                end,
                Select::System,
                compound,
                mirror.migration_owner(),
                core::ptr::null_mut(),
                holes_writable,
            )
        }?;
        collected.raw.mirror = Some((mirror, seq));
        Ok(collected)
    }

    /// Sets up the migration of `[start, end)` back to system memory: the
    /// device-private and device-coherent pages of `owner` in the range
    /// (a coherent THP that a PMD maps only with patch 0016), as in
    /// [`to_device`](Self::to_device).
    pub fn to_system<'a>(
        lock: &'a MmapReadGuard<'_>,
        vma: &'a VmaRef,
        start: usize,
        end: usize,
        compound: bool,
        owner: Owner,
    ) -> Result<Collected<'a>> {
        check_vma_locked(lock, vma)?;
        // SAFETY: `vma` is alive for `'a`, and of the mm whose mmap read lock
        // `lock` holds for `'a`, as checked above.
        unsafe {
            Self::setup_raw(
                vma.as_ptr(),
                start,
                end,
                Select::Device,
                compound,
                owner,
                core::ptr::null_mut(),
                false,
            )
        }
    }

    /// Sets up the migration of `[start, end)` back to system memory from
    /// `migrate_to_ram`, with the faulting page as `fault_page`.
    pub fn setup_fault<'a>(
        fault: &'a CpuFault<'_>,
        start: usize,
        end: usize,
        compound: bool,
        owner: Owner,
    ) -> Result<Collected<'a>> {
        // SAFETY: By `CpuFault`'s invariant its VMA is locked, with the
        // mmap read lock of its mm, for `'a`.
        unsafe {
            Self::setup_raw(
                fault.vma,
                start,
                end,
                Select::DevicePrivate,
                compound,
                owner,
                fault.page.as_ptr(),
                false,
            )
        }
    }

    /// # Safety
    ///
    /// `vma` is a VMA that stays alive for `'a`, and the mmap read lock of
    /// its mm is held for `'a`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn setup_raw<'a>(
        vma: *mut bindings::vm_area_struct,
        start: usize,
        end: usize,
        select: Select,
        compound: bool,
        owner: Owner,
        fault_page: *mut bindings::page,
        holes_writable: bool,
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
        let mut flags = match select {
            Select::System => bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_SYSTEM,
            Select::DevicePrivate => {
                bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_DEVICE_PRIVATE
            }
            Select::Device => {
                bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_DEVICE_PRIVATE
                    | bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_DEVICE_COHERENT
            }
        };
        if compound {
            flags |= bindings::migrate_vma_direction_MIGRATE_VMA_SELECT_COMPOUND;
        }
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
        // SAFETY: `vma` is alive and its mm's mmap read lock held for `'a`,
        // per our caller; the arrays have room for every page of
        // `[start, end)` and do not move (they are on the heap).
        // `migrate_vma_setup` checks that the range is inside the VMA.
        to_result(unsafe { bindings::migrate_vma_setup(&mut args) })?;
        // INVARIANT: Set up; `dst` is all zeroes.
        Ok(Collected {
            raw: Raw {
                args,
                src,
                dst,
                pages_moved: false,
                holes_writable,
                mirror: None,
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
        self.raw.args.cpages
    }

    /// Whether the page at `index` is mapped writable (for a page of a
    /// PMD collected whole: whether the PMD is).
    pub fn is_writable(&self, index: usize) -> bool {
        index < self.len() && self.raw.source_of(index) & PFN_WRITE != 0
    }

    /// Whether the page at `index` is a whole PMD-sized folio, or hole,
    /// collected as one entry (`MIGRATE_PFN_COMPOUND`); the entries of the
    /// rest of it are empty.
    pub fn is_compound(&self, index: usize) -> bool {
        self.raw
            .src
            .get(index)
            .is_some_and(|&e| e & PFN_COMPOUND != 0)
    }

    /// A large system folio for the page at `index`, to move a large
    /// device folio back whole (`vma_alloc_folio()`); `ENOMEM` if none.
    pub fn alloc_system_folio(&self, index: usize) -> Result<SystemPage> {
        if index >= self.len() {
            return Err(EINVAL);
        }
        let addr = self.raw.args.start + index * PAGE_SIZE;
        // SAFETY: The VMA is locked for `'a`, and `addr` is inside it.
        let folio = unsafe {
            bindings::vma_alloc_folio_noprof(
                GFP_HIGHUSER_MOVABLE | bindings::__GFP_NOWARN,
                FOLIO_ORDER as i32,
                self.raw.args.vma,
                addr as c_ulong,
            )
        };
        let folio = NonNull::new(folio).ok_or(ENOMEM)?;
        // The folio is its first page.
        Ok(SystemPage::locked(folio.cast(), FOLIO_ORDER))
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
            // SAFETY: A collected source page is referenced, and locked,
            // by the migration until finalize, which needs `self`.
            return match unsafe { Pagemap::of_page(page.as_ptr()) } {
                // INVARIANT: A collected page is allocated, so it has a
                // backing page if private (a coherent page is its own);
                // all live while the migration holds it.
                Some(pagemap) => Source::Device(DevicePageRef { page, pagemap }),
                None => Source::Skip,
            };
        }
        // INVARIANT: A collected system page, referenced by the migration
        // until finalize, so while `self` is borrowed.
        Source::System(SystemPageRef {
            page,
            _ref: PhantomData,
        })
    }

    /// Hands `page` over as the destination of the page at `index`, to be
    /// mirrored writable if `writable` and the CPU maps it writable (as
    /// the source was, or for a hole as the VMA allows). A large folio moves a
    /// compound entry whole; small pages at a compound entry and the ones
    /// after it split the source folio, or fill a hole page by page (the
    /// pages left without one stay a hole). A destination given twice replaces
    /// the first, which is released. A large folio at an entry that is not
    /// compound is `EINVAL`: the core would move it over pages that are
    /// not the migration's.
    pub fn set_destination(&mut self, index: usize, page: Destination, writable: bool) -> Result {
        let large = match &page {
            Destination::Device(page) => page.is_large(),
            Destination::System(page) => page.is_large(),
        };
        if index >= self.len() || (large && !self.is_compound(index)) {
            return Err(EINVAL);
        }
        // Never more than the CPU will have: the mm core maps the new page
        // as the source was (a hole: as the VMA allows), whatever `dst`
        // says, and `map_into` mirrors it by the `dst` bit. A page of a PMD
        // collected whole has an empty entry of its own: the PMD's entry
        // says what it was, read-only included.
        let src = self.raw.source_of(index);
        // SAFETY: Decoding a `migrate_pfn` entry.
        let hole = unsafe { bindings::migrate_pfn_to_page(src) }.is_null();
        let writable = writable
            && if hole {
                self.raw.holes_writable
            } else {
                src & PFN_WRITE != 0
            };
        // Nothing of what the page held before reaches the process.
        let raw = match page {
            Destination::Device(mut page) => {
                page.zero_unless_filled();
                page.into_raw()
            }
            Destination::System(mut page) => {
                page.zero_unless_filled();
                page.into_raw()
            }
        };
        self.raw.release_destination(index);
        // INVARIANT: `raw` is a page we own (locked, referenced), handed to
        // the migration.
        // SAFETY: `raw` is a live page.
        self.raw.dst[index] = unsafe { bindings::migrate_pfn(bindings::page_to_pfn(raw)) }
            | if writable { PFN_WRITE } else { 0 }
            | if large { PFN_COMPOUND } else { 0 };
        Ok(())
    }

    /// Moves the collected pages to their destinations
    /// (`migrate_vma_pages()`). Pages without a destination stay.
    pub fn pages(mut self) -> Migrated<'a> {
        // SAFETY: Set up and not finalized, by the type invariant of `Raw`.
        // A compound hole may have small destinations with gaps among them:
        // the core leaves the pages without one a hole (patch 0010).
        unsafe { bindings::migrate_vma_pages(&mut self.raw.args) };
        // INVARIANT: `migrate_vma_pages()` has run.
        self.raw.pages_moved = true;
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
    /// `dmirror_successful_migrated_pages`, which counts a large folio
    /// that moved whole as one page).
    pub fn moved_present(&self) -> usize {
        let len = self.raw.len();
        self.raw
            .src
            .iter()
            .enumerate()
            .filter(|(_, &e)| e & PFN_VALID != 0 && e & PFN_MIGRATE != 0)
            .map(|(index, &e)| match e & PFN_COMPOUND {
                0 => 1,
                _ => (1usize << FOLIO_ORDER).min(len - index),
            })
            .sum()
    }

    /// Maps the device pages that this migration to the device moved into
    /// its mirror, whose lock `guard` is, by their backing pages. Maps
    /// nothing, and returns `false`, if anything but the mirror's own
    /// migrations invalidated it since [`Migration::to_device`] took its
    /// sequence: then a page that moved may be unmapped again already.
    /// Otherwise finalize maps every moved page, and any later
    /// invalidation erases what this maps.
    pub fn map_into(&self, guard: &MirrorGuard<'_>) -> Result<bool> {
        let seq = match self.raw.mirror {
            Some((mirror, seq)) if core::ptr::eq(mirror, guard.mirror()) => seq,
            _ => return Err(EINVAL),
        };
        if !guard.only_own_migrations_since(seq) {
            return Ok(false);
        }
        let first = self.raw.args.start >> PAGE_SHIFT;
        for index in 0..self.raw.len() {
            let src = self.raw.src[index];
            let dst = self.raw.dst[index];
            if src & PFN_MIGRATE == 0 {
                continue;
            }
            // SAFETY: The migration owns a reference to its destinations
            // until finalize, which needs `self`.
            let Some(device) = (unsafe { device_page(dst) }) else {
                continue;
            };
            let access = if dst & PFN_WRITE != 0 {
                MirroredAccess::Write
            } else {
                MirroredAccess::Read
            };
            let pages = if dst & PFN_COMPOUND != 0 {
                (1usize << FOLIO_ORDER).min(self.raw.len() - index)
            } else {
                1
            };
            for i in 0..pages {
                // The first page's needs no folio arithmetic.
                let backing = match i {
                    0 => device.backing(),
                    _ => device.backing_after(i),
                };
                // SAFETY: The backing pages live as long as the device
                // folio, which finalize maps (its migration succeeded and
                // only this mirror's own migrations, which cannot touch a
                // page this one holds, invalidated it since `seq`, taken
                // before setup); they are erased from the table with that
                // mapping.
                unsafe { guard.store_raw(first + index + i, backing, access) }?;
            }
        }
        Ok(true)
    }

    /// Finalizes the migration (`migrate_vma_finalize()`): maps the moved
    /// pages, and the others back.
    pub fn finalize(self) {}
}

/// The page of a [`Pagemap`] that the `migrate_pfn` entry `entry` names,
/// if it names one.
///
/// # Safety
///
/// The page of `entry`, if any, stays referenced for `'a`.
unsafe fn device_page<'a>(entry: c_ulong) -> Option<DevicePageRef<'a>> {
    // SAFETY: Decoding a `migrate_pfn` entry.
    let page = NonNull::new(unsafe { bindings::migrate_pfn_to_page(entry) })?;
    // SAFETY: The caller keeps the page referenced for `'a`.
    let pagemap = unsafe { Pagemap::of_page(page.as_ptr()) }?;
    // INVARIANT: A page a migration holds is allocated, so it has a
    // backing page if private (a coherent page is its own); all stay
    // valid while it is referenced.
    Some(DevicePageRef { page, pagemap })
}

/// Migrates the in-use pages of `[first_pfn, first_pfn + npages)`, device
/// pages of [`Pagemap`]s, back to system memory (`migrate_device_range`).
///
/// # Safety
///
/// The pfns are those of a [`Pagemap`] that stays mapped during the call.
pub(super) unsafe fn evict_range(first_pfn: usize, npages: usize) {
    let mut pfn = first_pfn;
    let end = first_pfn + npages;
    while pfn < end {
        let n = MAX_MIGRATE_PAGES.min(end - pfn);
        // SAFETY: A part of our caller's range, of a mapped pagemap.
        unsafe { evict_batch(pfn, n) };
        pfn += n;
    }
}

/// # Safety
///
/// As [`evict_range`], for at most [`MAX_MIGRATE_PAGES`] pages.
unsafe fn evict_batch(first_pfn: usize, npages: usize) {
    let mut src = KVVec::<c_ulong>::new();
    let mut dst = KVVec::<c_ulong>::new();
    if src.resize(npages, 0, GFP_KERNEL).is_err() || dst.resize(npages, 0, GFP_KERNEL).is_err() {
        // The caller evicts again until no page is left.
        return;
    }
    // SAFETY: The arrays have `npages` entries; the pfns are those of a
    // mapped pagemap, per our caller, so they have a memmap. Pages in use
    // are locked and referenced into `src`.
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
        // SAFETY: The migration holds a reference to the page until
        // `migrate_device_finalize` below.
        let Some(device) = (unsafe { device_page(entry) }) else {
            continue;
        };
        let new = if entry & PFN_COMPOUND != 0 {
            // A large folio moves whole or not at all; if there is no
            // large page now, the caller evicts again later.
            // SAFETY: Allocating a folio has no precondition.
            let folio = unsafe {
                bindings::folio_alloc_noprof(
                    GFP_HIGHUSER_MOVABLE | bindings::__GFP_NOWARN,
                    FOLIO_ORDER,
                )
            };
            match NonNull::new(folio) {
                // The folio is its first page.
                Some(folio) => SystemPage::locked(folio.cast(), FOLIO_ORDER),
                None => continue,
            }
        } else {
            // Eviction must not fail, as in C.
            match SystemPage::alloc_flags(GFP_HIGHUSER_MOVABLE | (1 << bindings::___GFP_NOFAIL_BIT))
            {
                Ok(page) => page,
                Err(_) => continue,
            }
        };
        let mut new = new;
        new.copy_from_device(&device);
        let large = new.is_large();
        let raw = new.into_raw();
        // SAFETY: `raw` is a page we own; it is handed over to the migration.
        dst[index] = unsafe { bindings::migrate_pfn(bindings::page_to_pfn(raw)) }
            | (entry & PFN_WRITE)
            | if large { PFN_COMPOUND } else { 0 };
    }
    // SAFETY: `src` comes from `migrate_device_range` over these pfns, and
    // `dst` holds zeroes or pages we handed over, locked and referenced.
    unsafe {
        bindings::migrate_device_pages(src.as_mut_ptr(), dst.as_mut_ptr(), npages as c_ulong);
        bindings::migrate_device_finalize(src.as_mut_ptr(), dst.as_mut_ptr(), npages as c_ulong);
    }
}
