// SPDX-License-Identifier: GPL-2.0

//! Device memory: a `dev_pagemap` of `MEMORY_DEVICE_PRIVATE` or
//! `MEMORY_DEVICE_COHERENT` pages and the pages it hands out.
//!
//! C header: [`include/linux/memremap.h`](srctree/include/linux/memremap.h).
//!
//! A [`Pagemap`] is one chunk of device memory, given `struct page`s by
//! `memremap_pages()`:
//!
//! - **Device-private** ([`MemoryKind::Private`]): a free physical address
//!   range from `request_free_mem_region()`. The CPU cannot reach it; a
//!   device keeps the data. This abstraction simulates that device memory
//!   the way `lib/test_hmm.c` does: every allocated device page owns a
//!   system page, its *backing* page, that holds its data. The pagemap
//!   keeps the backing page of each of its pages in an array indexed by
//!   page, so that a large (PMD-sized) device folio that the mm splits
//!   needs nothing from the device: each piece keeps its backing pages.
//!   They are freed with the device page (`folio_free`).
//! - **Device-coherent** ([`MemoryKind::Coherent`]): a fixed range of
//!   soft-reserved memory (`memmap=...%...-1+0xefffffff`, or special
//!   purpose memory from the firmware) that the CPU maps like system
//!   memory. A page's data is the page itself. It is mapped once and
//!   serves both sizes: a large folio takes a wholly free, aligned group
//!   of pages; a small page any free page, from a group already broken
//!   up first. Freed pages, whole folios or the pieces of a split one,
//!   coalesce.
//!
//! Several pagemaps may share one [`Owner`], which identifies them to
//! `hmm_range_fault()` and to migrations.

use super::Owner;
use core::{
    marker::PhantomData,
    ptr::NonNull,
    sync::atomic::{AtomicPtr, Ordering},
};
use kernel::{
    bindings,
    c_str,
    ffi::{c_int, c_ulong, c_void},
    new_spinlock,
    page::{PAGE_SHIFT, PAGE_SIZE},
    prelude::*,
    sync::{Arc, SpinLock},
    types::Opaque, //
};

/// Size of one pagemap, as in C (`DEVMEM_CHUNK_SIZE`).
pub const CHUNK_SIZE: usize = 256 << 20;
const CHUNK_PAGES: usize = CHUNK_SIZE >> PAGE_SHIFT;
/// Order of a large (PMD-sized) device folio.
pub const FOLIO_ORDER: u32 = bindings::HPAGE_PMD_ORDER;
/// Pages in a large device folio.
pub const FOLIO_PAGES: usize = 1 << FOLIO_ORDER;
const CHUNK_FOLIOS: usize = CHUNK_PAGES / FOLIO_PAGES;

/// `GFP_HIGHUSER` (`GFP_USER | __GFP_HIGHMEM`), which the bindings lack.
pub(super) const GFP_HIGHUSER: bindings::gfp_t =
    bindings::GFP_KERNEL | (1 << bindings::___GFP_HARDWALL_BIT) | bindings::__GFP_HIGHMEM;
/// `GFP_HIGHUSER_MOVABLE`, for pages that will be mapped to user space.
pub(super) const GFP_HIGHUSER_MOVABLE: bindings::gfp_t =
    GFP_HIGHUSER | (1 << bindings::___GFP_MOVABLE_BIT);

/// The kind of memory a [`Pagemap`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// `MEMORY_DEVICE_PRIVATE`: only the device reaches it; simulated with
    /// a backing page per device page.
    Private,
    /// `MEMORY_DEVICE_COHERENT`: the CPU maps it as it maps system memory.
    Coherent,
}

/// What a device does for the pages of its [`Pagemap`]s
/// (`struct dev_pagemap_ops`).
pub trait PagemapOps: Send + Sync {
    /// The CPU touched a device-private page of `pagemap` (`migrate_to_ram`;
    /// never called for coherent pages, which the CPU maps):
    /// migrate it back to system memory, for example with
    /// [`Migration::setup_fault`](super::Migration::setup_fault). The fault
    /// is retried when this returns: an `Ok` that left the page where it
    /// was faults again, for ever under `hmm_range_fault()`, which does not
    /// check for signals between such retries. 7.3 calls it with the
    /// mmap read lock held (a fault under the VMA lock alone is retried
    /// first, mm/memory.c `do_swap_page`) and the page referenced.
    fn migrate_to_ram(&self, pagemap: &Pagemap, fault: &CpuFault<'_>) -> Result<(), FaultError>;

    /// A page of `pagemap` was freed (`folio_free`), after its backing page
    /// was. The page is back on the pagemap's free list, unless the pagemap
    /// is being removed. Called in any context; must not sleep.
    fn folio_free(&self, _pagemap: &Pagemap) {}
}

/// Why a [`PagemapOps::migrate_to_ram`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// Out of memory (`VM_FAULT_OOM`).
    Oom,
    /// The access cannot be satisfied (`VM_FAULT_SIGBUS`).
    Sigbus,
}

/// A CPU fault on a device-private page, as `migrate_to_ram` sees it.
///
/// The fields are read out of the `vm_fault` once, when the callback
/// starts: the mm core owns that struct and may write to it.
///
/// # Invariants
///
/// `vma` and `page` are those of the fault being handled, for `'a`: the
/// mmap read lock of the VMA's mm is held and `page`, a device page of a
/// live [`Pagemap`], is referenced.
pub struct CpuFault<'a> {
    address: usize,
    pte: bool,
    pub(super) vma: *mut bindings::vm_area_struct,
    pub(super) page: NonNull<bindings::page>,
    _fault: PhantomData<&'a bindings::vm_fault>,
}

impl CpuFault<'_> {
    /// The faulting virtual address.
    pub fn address(&self) -> usize {
        self.address
    }

    /// Whether the page was found through a PTE (a small mapping), rather
    /// than a PMD.
    pub fn is_pte(&self) -> bool {
        self.pte
    }

    /// The order of the faulting device folio.
    pub fn folio_order(&self) -> u32 {
        // SAFETY: By the type invariant the page is referenced.
        unsafe { bindings::folio_order(bindings::page_folio(self.page.as_ptr())) }
    }
}

/// The free pages of a pagemap, and whether it is going away.
struct FreeList {
    pages: FreePages,
    /// Pages handed out and not freed yet.
    allocated: usize,
    /// Set before the pagemap is removed: no more allocations, and freed
    /// pages do not go back on the list.
    removing: bool,
}

/// Which pages of a pagemap are free.
enum FreePages {
    /// A device-private pagemap made for one size, as in C. Its `struct
    /// page`s need not be reinitialized across sizes: a group is never
    /// broken up for small pages. The pieces of a large folio that the mm
    /// split come back as small pages.
    Sized {
        /// Indices of free pages for small allocations. Its capacity is the
        /// pagemap's page count, so pushing back a freed page never
        /// allocates.
        small: KVVec<u32>,
        /// Free aligned groups of [`FOLIO_PAGES`] pages, by group number,
        /// for large allocations (capacity: every group).
        large: KVVec<u32>,
    },
    /// A pagemap that serves both sizes from every page (coherent memory).
    Any(FreeMap),
}

impl FreePages {
    /// A free page (`order` 0) or aligned group (`FOLIO_ORDER`), taken off
    /// the list: the index of its first page.
    fn take(&mut self, order: u32) -> Option<usize> {
        match self {
            FreePages::Sized { small, large } => match order {
                0 => small.pop().map(|index| index as usize),
                _ => large.pop().map(|group| group as usize * FOLIO_PAGES),
            },
            FreePages::Any(map) => map.take(order),
        }
    }

    /// Puts the `1 << order` pages from `index` back, never allocating:
    /// a whole group as a group, anything else page by page.
    fn give_back(&mut self, index: usize, order: u32) {
        let nr = 1usize << order;
        match self {
            FreePages::Sized { small, large } => {
                // The capacities cover every page and group.
                if order == FOLIO_ORDER && index % FOLIO_PAGES == 0 {
                    let _ = large.push_within_capacity((index / FOLIO_PAGES) as u32);
                } else {
                    for i in index..index + nr {
                        let _ = small.push_within_capacity(i as u32);
                    }
                }
            }
            FreePages::Any(map) => map.give_back(index, nr),
        }
    }

    /// Forgets every free page: the pagemap is going away.
    fn clear(&mut self) {
        match self {
            FreePages::Sized { small, large } => {
                small.clear();
                large.clear();
            }
            FreePages::Any(map) => map.clear(),
        }
    }
}

/// One bit per page, set while the page is free, and the number of free
/// pages in each aligned group of [`FOLIO_PAGES`].
struct FreeMap {
    bits: KVVec<u64>,
    group_free: KVVec<u16>,
}

/// Words of [`FreeMap::bits`] per group.
const GROUP_WORDS: usize = FOLIO_PAGES / 64;

impl FreeMap {
    /// `pages` pages, a multiple of [`FOLIO_PAGES`], all free.
    fn all_free(pages: usize) -> Result<Self> {
        let groups = pages / FOLIO_PAGES;
        let mut bits = KVVec::with_capacity(groups * GROUP_WORDS, GFP_KERNEL)?;
        bits.resize(groups * GROUP_WORDS, u64::MAX, GFP_KERNEL)?;
        let mut group_free = KVVec::with_capacity(groups, GFP_KERNEL)?;
        group_free.resize(groups, FOLIO_PAGES as u16, GFP_KERNEL)?;
        Ok(Self { bits, group_free })
    }

    fn take(&mut self, order: u32) -> Option<usize> {
        let whole = FOLIO_PAGES as u16;
        if order > 0 {
            // A wholly free group, the lowest.
            let group = self.group_free.iter().position(|&n| n == whole)?;
            self.group_free[group] = 0;
            self.bits[group * GROUP_WORDS..(group + 1) * GROUP_WORDS].fill(0);
            return Some(group * FOLIO_PAGES);
        }
        // A group already broken up first, so that whole ones stay for
        // large folios.
        let group = self
            .group_free
            .iter()
            .position(|&n| n != 0 && n != whole)
            .or_else(|| self.group_free.iter().position(|&n| n != 0))?;
        let first = group * GROUP_WORDS;
        let (word, bits) = self.bits[first..first + GROUP_WORDS]
            .iter()
            .enumerate()
            .find(|(_, &bits)| bits != 0)?;
        let bit = bits.trailing_zeros() as usize;
        self.bits[first + word] &= !(1u64 << bit);
        self.group_free[group] -= 1;
        Some((first + word) * 64 + bit)
    }

    fn give_back(&mut self, index: usize, nr: usize) {
        for page in index..index + nr {
            let (word, bit) = (page / 64, 1u64 << (page % 64));
            match self.bits.get_mut(word) {
                Some(bits) if *bits & bit == 0 => {
                    *bits |= bit;
                    self.group_free[page / FOLIO_PAGES] += 1;
                }
                // Only a kernel bug frees a page twice: count it once.
                _ => pr_warn!("device page {} freed twice\n", page),
            }
        }
    }

    fn clear(&mut self) {
        self.bits.fill(0);
        self.group_free.fill(0);
    }
}

/// A physical address range reserved in `iomem_resource`: free address
/// space for device-private memory, or soft-reserved memory for
/// device-coherent memory.
///
/// # Invariants
///
/// `[start, start + size)` is a region of `iomem_resource` that this value
/// reserved (busy) and releases on drop.
struct MemRegion {
    start: u64,
    size: u64,
}

impl MemRegion {
    fn request(size: usize) -> Result<Self> {
        // SAFETY: `iomem_resource` is the static root of the I/O memory
        // resource tree; the request takes its lock. The name is static.
        let res = unsafe {
            bindings::request_free_mem_region(
                core::ptr::addr_of_mut!(bindings::iomem_resource),
                size as c_ulong,
                c_str!("hmm_dmirror").as_char_ptr(),
            )
        };
        if res.is_null() {
            return Err(ENOMEM);
        }
        let res = kernel::error::from_err_ptr(res)?;
        // SAFETY: `res` is the resource just inserted; it stays until
        // released below.
        let (start, end) = unsafe { ((*res).start, (*res).end) };
        // INVARIANT: The region was just reserved.
        Ok(Self {
            start,
            size: end - start + 1,
        })
    }

    /// Claims `[start, start + size)`, which must be soft-reserved memory
    /// throughout (`EINVAL` otherwise) that nobody claimed (`EBUSY`). The
    /// claim is what keeps a second pagemap of ours, or of any driver that
    /// claims its memory first (DAX, kmem), off the range:
    /// `memremap_pages()` WARNs on a range that has one already. A driver
    /// that maps soft-reserved memory without claiming it is not seen.
    fn claim_soft_reserved(start: u64, size: usize) -> Result<Self> {
        let end = start.checked_add(size as u64).ok_or(EINVAL)?;
        // Aligned for large folios.
        if start % (PAGE_SIZE << FOLIO_ORDER) as u64 != 0 || size == 0 {
            return Err(EINVAL);
        }
        // Soft-reserved throughout: the parts of the soft-reserved ranges
        // inside the window add up to all of it. (`region_intersects_*`
        // would take a window half in a hole: a hole does not count
        // against it.) Memory that is not there would be mapped as RAM.
        let mut covered: u64 = 0;
        // SAFETY: Walks the soft-reserved resource tree under its lock;
        // the callback only adds to `covered`, which outlives the call.
        unsafe {
            bindings::walk_soft_reserve_res(
                start,
                end - 1,
                core::ptr::from_mut(&mut covered).cast(),
                Some(Self::add_length),
            )
        };
        if covered != size as u64 {
            return Err(EINVAL);
        }
        // SAFETY: `iomem_resource` is the static root of the I/O memory
        // resource tree; the request takes its lock. The name is static.
        let res = unsafe {
            bindings::__request_region(
                core::ptr::addr_of_mut!(bindings::iomem_resource),
                start,
                size as u64,
                c_str!("hmm_dmirror").as_char_ptr(),
                0,
            )
        };
        if res.is_null() {
            return Err(EBUSY);
        }
        // INVARIANT: The region was just reserved, busy.
        Ok(Self {
            start,
            size: size as u64,
        })
    }
}

impl MemRegion {
    /// `walk_soft_reserve_res()` callback: adds the length of `res`, which
    /// the walk clipped to its window, to the `u64` at `arg`.
    ///
    /// # Safety
    ///
    /// `res` is a valid resource and `arg` points to a `u64` that nothing
    /// else accesses during the call.
    unsafe extern "C" fn add_length(res: *mut bindings::resource, arg: *mut c_void) -> c_int {
        // SAFETY: `res` is valid for the call, per the caller.
        let (start, end) = unsafe { ((*res).start, (*res).end) };
        // SAFETY: `arg` is the `u64` our caller handed to the walk.
        unsafe { *arg.cast::<u64>() += end - start + 1 };
        0
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the region is reserved, by us.
        unsafe {
            bindings::__release_region(
                core::ptr::addr_of_mut!(bindings::iomem_resource),
                self.start,
                self.size,
            )
        };
    }
}

/// The ops table of every [`Pagemap`]. Its address tells a pagemap made by
/// this abstraction from any other.
static PAGEMAP_OPS: bindings::dev_pagemap_ops = bindings::dev_pagemap_ops {
    folio_free: Some(Pagemap::folio_free_callback),
    migrate_to_ram: Some(Pagemap::migrate_to_ram_callback),
    memory_failure: None,
    folio_split: None,
};

/// One chunk of device memory: a `dev_pagemap` over [`CHUNK_SIZE`] bytes
/// of physical address space, with a free list.
///
/// # Invariants
///
/// - `pgmap` is mapped with `memremap_pages()` (the type of `kind`, ops
///   [`PAGEMAP_OPS`], owner `owner`, the single range of `region`) from
///   initialization until drop.
/// - Private memory: `backing[i]` is the backing page of page `i` while
///   it is allocated: a system page (order 0) that the device page owns;
///   null while free. Coherent memory: `backing` is empty; a page holds
///   its own data.
/// - Every page that `free.pages` lists as free has refcount zero, and is
///   listed at most once.
#[pin_data(PinnedDrop)]
pub struct Pagemap {
    kind: MemoryKind,
    ops: &'static dyn PagemapOps,
    owner: Owner,
    first_pfn: usize,
    backing: KVVec<AtomicPtr<bindings::page>>,
    #[pin]
    free: SpinLock<FreeList>,
    region: MemRegion,
    #[pin]
    pgmap: Opaque<bindings::dev_pagemap>,
}

// SAFETY: The pagemap is only changed by the mm core and through the free
// list, which has its own lock.
unsafe impl Send for Pagemap {}
// SAFETY: Shared references change the pagemap only through the free
// list's spinlock and the backing array's atomics; the `dev_pagemap` is
// the mm core's, which synchronizes its own use.
unsafe impl Sync for Pagemap {}

impl Pagemap {
    /// Reserves [`CHUNK_SIZE`] bytes of free physical address space and
    /// maps device-private pages over it, owned by `owner`. Faults on them
    /// go to `ops`. Its pages are for large folios if `large_folios`, else for
    /// small pages.
    pub(super) fn new_private(
        owner: Owner,
        ops: &'static dyn PagemapOps,
        large_folios: bool,
    ) -> Result<Arc<Self>> {
        let region = MemRegion::request(CHUNK_SIZE)?;
        if region.size as usize != CHUNK_SIZE {
            return Err(ENOMEM);
        }
        let mut small = KVVec::with_capacity(CHUNK_PAGES, GFP_KERNEL)?;
        let mut large = KVVec::with_capacity(CHUNK_FOLIOS, GFP_KERNEL)?;
        // Handed out from the lowest address up, as C does.
        if large_folios {
            for group in (0..CHUNK_FOLIOS as u32).rev() {
                large.push(group, GFP_KERNEL)?;
            }
        } else {
            for index in (0..CHUNK_PAGES as u32).rev() {
                small.push(index, GFP_KERNEL)?;
            }
        }
        let mut backing = KVVec::with_capacity(CHUNK_PAGES, GFP_KERNEL)?;
        for _ in 0..CHUNK_PAGES {
            backing.push(AtomicPtr::new(core::ptr::null_mut()), GFP_KERNEL)?;
        }
        Self::map(
            MemoryKind::Private,
            region,
            FreePages::Sized { small, large },
            backing,
            owner,
            ops,
        )
    }

    /// Maps device-coherent pages over the [`CHUNK_SIZE`] bytes of
    /// soft-reserved memory at physical address `start`, owned by `owner`,
    /// for pages of both sizes. `EINVAL` unless the range is soft-reserved
    /// memory and `start` is aligned for a large folio; `EBUSY` if it is
    /// claimed already.
    pub(super) fn new_coherent(
        start: u64,
        owner: Owner,
        ops: &'static dyn PagemapOps,
    ) -> Result<Arc<Self>> {
        let region = MemRegion::claim_soft_reserved(start, CHUNK_SIZE)?;
        let free = FreePages::Any(FreeMap::all_free(CHUNK_PAGES)?);
        Self::map(MemoryKind::Coherent, region, free, KVVec::new(), owner, ops)
    }

    /// Maps the pages of `region`, all free, as memory of `kind`.
    /// `backing` has an entry per page for private memory.
    fn map(
        kind: MemoryKind,
        region: MemRegion,
        pages: FreePages,
        backing: KVVec<AtomicPtr<bindings::page>>,
        owner: Owner,
        ops: &'static dyn PagemapOps,
    ) -> Result<Arc<Self>> {
        let (start, size) = (region.start, region.size);
        let type_ = match kind {
            MemoryKind::Private => bindings::memory_type_MEMORY_DEVICE_PRIVATE,
            MemoryKind::Coherent => bindings::memory_type_MEMORY_DEVICE_COHERENT,
        };
        Arc::pin_init(
            try_pin_init!(Self {
                kind,
                ops,
                owner,
                first_pfn: (start >> PAGE_SHIFT) as usize,
                backing,
                free <- new_spinlock!(
                    FreeList {
                        pages,
                        allocated: 0,
                        removing: false,
                    },
                    "Pagemap::free"
                ),
                region,
                // Mapped last: once mapped, the callbacks may run.
                // INVARIANT: Mapped here with `PAGEMAP_OPS`, `owner`, the
                // type of `kind` and the one range of `region`, unmapped in
                // `drop`; the free list lists every page once, all free.
                pgmap <- Opaque::try_ffi_init(move |slot: *mut bindings::dev_pagemap| {
                    // SAFETY: `slot` is valid for writes of one pagemap;
                    // zeroes are its documented initial state.
                    unsafe { slot.write_bytes(0, 1) };
                    // SAFETY: `slot` was just zeroed; these are plain
                    // fields, and `range` the union member for one range.
                    unsafe {
                        let range = (*slot).__bindgen_anon_1.range.as_mut();
                        range.start = start;
                        range.end = start + size - 1;
                        (*slot).nr_range = 1;
                        (*slot).type_ = type_;
                        (*slot).ops = &PAGEMAP_OPS;
                        (*slot).owner = owner.as_ptr();
                    }
                    // SAFETY: `slot` is a pinned, filled-in pagemap over a
                    // range we reserved: free address space, or
                    // soft-reserved memory that nobody else claimed. It is
                    // unmapped in `drop`, before the range is released.
                    // `NUMA_NO_NODE` picks the local node.
                    let ptr = unsafe { bindings::memremap_pages(slot, bindings::NUMA_NO_NODE) };
                    if ptr.is_null() {
                        return Err(EFAULT);
                    }
                    kernel::error::from_err_ptr(ptr).map(|_| ())
                }),
            }),
            GFP_KERNEL,
        )
    }

    /// The kind of memory of this pagemap.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The owner of this pagemap's pages.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The pagemap of `page`, if it is a page of a [`Pagemap`].
    ///
    /// # Safety
    ///
    /// `page` must be a valid page that stays referenced for `'a`.
    pub(super) unsafe fn of_page<'a>(page: *mut bindings::page) -> Option<&'a Pagemap> {
        // SAFETY: `page` is valid, per the caller.
        if !unsafe { bindings::is_zone_device_page(page) } {
            return None;
        }
        // SAFETY: A ZONE_DEVICE page has a pagemap, alive while it is
        // referenced.
        let pgmap = unsafe { bindings::page_pgmap(page) };
        // SAFETY: `pgmap` is the page's pagemap, live while the page is
        // referenced; `ops` is set before mapping and never changes.
        if !core::ptr::eq(unsafe { (*pgmap).ops }, &PAGEMAP_OPS) {
            return None;
        }
        // SAFETY: Only `Pagemap::map` maps pagemaps with these ops, and
        // always as the `pgmap` field of a `Pagemap`, which stays until the
        // pagemap is unmapped, after its last page is freed.
        Some(unsafe { &*kernel::container_of!(Opaque::cast_from(pgmap), Pagemap, pgmap) })
    }

    /// Allocates a page: a device page (with a fresh backing page if private), locked,
    /// with one reference. Fails with `ENOSPC` when the pagemap is full or
    /// being removed, and `ENOMEM` when no backing page is available.
    pub(super) fn alloc_page(&self) -> Result<DevicePage> {
        self.alloc(0)
    }

    /// Allocates a large device folio of [`FOLIO_PAGES`] pages, PMD
    /// aligned (each with a backing page if private); locked, with one reference.
    /// Fails as [`alloc_page`](Self::alloc_page). A private pagemap has
    /// them only if made for large folios, a coherent one while a group is
    /// wholly free.
    pub(super) fn alloc_folio(&self) -> Result<DevicePage> {
        self.alloc(FOLIO_ORDER)
    }

    fn alloc(&self, order: u32) -> Result<DevicePage> {
        let nr = 1usize << order;
        // A free page (or group) first: a full pagemap costs no backing
        // allocation.
        let index = {
            let mut list = self.free.lock();
            let index = match list.removing {
                true => None,
                false => list.pages.take(order),
            };
            if index.is_some() {
                list.allocated += nr;
            }
            index
        };
        // Full, or being removed: `ENOSPC`, which tells callers to try
        // another pagemap.
        let index = index.ok_or(ENOSPC)?;
        if self.kind == MemoryKind::Private {
            self.alloc_backing(index, order)?;
        }
        // SAFETY: The index is within the mapped range, which has a memmap.
        let page = unsafe { bindings::pfn_to_page((self.first_pfn + index) as c_ulong) };
        // SAFETY: By the type invariant the pages were free (refcount zero)
        // and they are ours now; the pagemap is mapped and not being
        // removed. The page becomes a folio of `order`: the call resets
        // every page it covers, a page left a tail of a freed large folio
        // included (its compound head and order), takes pagemap
        // references, sets the refcount to one and locks the folio. The
        // free pages beside it may keep a stale compound head or order
        // (a coherent pagemap breaks up groups): no pfn walker can take a
        // reference to a page whose refcount is zero, and eviction steps
        // over such a page one pfn at a time (patch 0012).
        unsafe { bindings::zone_device_folio_init(page.cast(), self.pgmap.get(), order) };
        // INVARIANT: The folio is locked, referenced once and, if private,
        // has backing pages.
        Ok(DevicePage {
            // SAFETY: `pfn_to_page` of a mapped pfn is not null.
            page: unsafe { NonNull::new_unchecked(page) },
            order,
            filled: false,
        })
    }

    /// Gives the private pages from `index` on, taken off the free list,
    /// backing pages; puts them back on failure (`ENOMEM`).
    fn alloc_backing(&self, index: usize, order: u32) -> Result {
        let nr = 1usize << order;
        // One block, split into independent pages, so that the pieces of a
        // split device folio can be freed one by one.
        // SAFETY: Allocating pages has no precondition.
        let Some(first) =
            NonNull::new(unsafe { bindings::alloc_pages_noprof(GFP_HIGHUSER, order) })
        else {
            let mut list = self.free.lock();
            list.allocated -= nr;
            if !list.removing {
                // INVARIANT: Still free, and off the list since taken.
                list.pages.give_back(index, order);
            }
            return Err(ENOMEM);
        };
        // SAFETY: `first` is a fresh non-compound block of this order.
        let first_backing = unsafe { bindings::page_to_pfn(first.as_ptr()) } as usize;
        if order > 0 {
            // SAFETY: `first` is a fresh non-compound block of `order`,
            // ours alone; afterwards each page is an order-0 page.
            unsafe { bindings::split_page(first.as_ptr(), order) };
        }
        for i in 0..nr {
            // SAFETY: A pfn of the block allocated above.
            let page = unsafe { bindings::pfn_to_page((first_backing + i) as c_ulong) };
            // INVARIANT: The device page is ours now, and owns this page.
            self.backing[index + i].store(page, Ordering::Release);
        }
        Ok(())
    }

    /// Where the data of `page`, an allocated page of this pagemap, is:
    /// its backing page, or the page itself for coherent memory.
    fn backing_of(&self, page: NonNull<bindings::page>) -> *mut bindings::page {
        if self.kind == MemoryKind::Coherent {
            return page.as_ptr();
        }
        // SAFETY: `page` is a page of this pagemap, so it has a pfn in range.
        let pfn = unsafe { bindings::page_to_pfn(page.as_ptr()) } as usize;
        self.backing
            .get(pfn.wrapping_sub(self.first_pfn))
            .map_or(core::ptr::null_mut(), |b| b.load(Ordering::Acquire))
    }

    /// Migrates every page of this pagemap that is in use back to system
    /// memory (`migrate_device_range`), as C's `dmirror_device_evict_chunk`.
    /// Pages that cannot be migrated right now (locked or held elsewhere)
    /// are left where they are. It invalidates: not with a mirror's lock
    /// held.
    pub fn evict(&self) {
        // SAFETY: This pagemap's own range, mapped while it lives.
        unsafe { super::migrate::evict_range(self.first_pfn, CHUNK_PAGES) };
    }

    /// Pages handed out and not freed yet.
    pub fn allocated(&self) -> usize {
        self.free.lock().allocated
    }

    /// # Safety
    ///
    /// Called by the mm core with a folio of a pagemap that uses
    /// [`PAGEMAP_OPS`], whose refcount dropped to zero.
    unsafe extern "C" fn folio_free_callback(folio: *mut bindings::folio) {
        // SAFETY: `folio` is valid for the callback's duration.
        let page = unsafe { bindings::folio_page(folio, 0) };
        // SAFETY: The pagemap is live until this folio's pagemap references
        // are dropped, after this callback; its ops are `PAGEMAP_OPS`.
        let Some(this) = (unsafe { Self::of_page(page) }) else {
            return;
        };
        // SAFETY: `folio` is valid for the callback's duration.
        let order = unsafe { bindings::folio_order(folio) };
        let nr = 1usize << order;
        // SAFETY: `page` belongs to this pagemap's range.
        let index = (unsafe { bindings::page_to_pfn(page) } as usize) - this.first_pfn;
        for i in 0..nr {
            let Some(slot) = this.backing.get(index + i) else {
                break;
            };
            let backing = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if !backing.is_null() {
                // SAFETY: By the type invariant the device page owned its
                // backing page; the device page is free now, so it owns it
                // no longer.
                unsafe { bindings::__free_pages(backing, 0) };
            }
        }
        {
            let mut list = this.free.lock();
            list.allocated = list.allocated.saturating_sub(nr);
            if !list.removing {
                // INVARIANT: The pages' refcount is zero and they were not
                // listed while allocated. This never allocates.
                list.pages.give_back(index, order);
            }
        }
        this.ops.folio_free(this);
    }

    /// # Safety
    ///
    /// Called by the mm core for a CPU fault on a device-private page of a
    /// pagemap that uses [`PAGEMAP_OPS`], with the mmap read lock of the
    /// VMA's mm held (see [`PagemapOps::migrate_to_ram`]) and the page
    /// referenced.
    unsafe extern "C" fn migrate_to_ram_callback(
        vmf: *mut bindings::vm_fault,
    ) -> bindings::vm_fault_t {
        // SAFETY: `vmf` is valid for the callback's duration; the mm core
        // set these fields before the call and does not change them in it.
        let (address, pte, vma, page) = unsafe {
            (
                (*vmf).__bindgen_anon_1.address,
                !(*vmf).pte.is_null(),
                (*vmf).__bindgen_anon_1.vma,
                (*vmf).page,
            )
        };
        let Some(page) = NonNull::new(page) else {
            return bindings::vm_fault_reason_VM_FAULT_SIGBUS;
        };
        // SAFETY: The faulting page is referenced by the fault path for
        // the callback's duration.
        let Some(this) = (unsafe { Self::of_page(page.as_ptr()) }) else {
            return bindings::vm_fault_reason_VM_FAULT_SIGBUS;
        };
        // INVARIANT: The VMA and page of the fault being handled, locked
        // and referenced by the caller until we return.
        let fault = CpuFault {
            address,
            pte,
            vma,
            page,
            _fault: PhantomData,
        };
        match this.ops.migrate_to_ram(this, &fault) {
            Ok(()) => 0,
            Err(FaultError::Oom) => bindings::vm_fault_reason_VM_FAULT_OOM,
            Err(FaultError::Sigbus) => bindings::vm_fault_reason_VM_FAULT_SIGBUS,
        }
    }
}

#[pinned_drop]
impl PinnedDrop for Pagemap {
    fn drop(self: Pin<&mut Self>) {
        {
            let mut list = self.free.lock();
            list.removing = true;
            list.pages.clear();
        }
        // Evict until no page is left in use: a page may be locked by a
        // migration that runs right now, and only be mapped when it ends.
        // `memunmap_pages()` waits for every page to be freed. Only the
        // pools drop a pagemap: `DevicePool::remove_chunks` only one with
        // no page left, `PoolsRegistration` at module exit, when no
        // migration or `DevicePage` can hold one any more.
        let mut rounds = 0u32;
        while self.allocated() != 0 {
            self.evict();
            if self.allocated() == 0 {
                break;
            }
            rounds += 1;
            if rounds % 100 == 0 {
                pr_warn!(
                    "waiting for {} device pages to be freed\n",
                    self.allocated()
                );
            }
            kernel::time::delay::fsleep(kernel::time::Delta::from_millis(10));
        }
        // SAFETY: By the type invariant the pagemap is mapped; it is
        // unmapped once, before `region` is released (fields drop after
        // this). No page of it is allocated any more.
        unsafe { bindings::memunmap_pages(self.pgmap.get()) };
    }
}

/// An allocated device folio, fresh from [`Pagemap::alloc_page`] or
/// [`Pagemap::alloc_folio`]: locked, with the one reference that the
/// allocation gave.
///
/// Dropping it unlocks it and puts that reference, which frees it. Giving
/// it to a migration as a destination hands both over; its data is zeroed
/// then unless a copy filled it, as fresh memory holds whatever its last
/// user left.
///
/// # Invariants
///
/// `page` is the first page of a device folio of order `order` of a live
/// [`Pagemap`], locked by us, with a reference we own, and with backing
/// pages if the pagemap is private. If `filled`, the data of every page
/// was written since the allocation.
pub struct DevicePage {
    page: NonNull<bindings::page>,
    order: u32,
    filled: bool,
}

impl DevicePage {
    /// Number of pages: 1, or [`FOLIO_PAGES`] for a large folio.
    pub fn nr_pages(&self) -> usize {
        1 << self.order
    }

    /// Whether this is a large folio.
    pub fn is_large(&self) -> bool {
        self.order > 0
    }

    /// The page holding the data of page `i` of the folio (its backing
    /// page, or itself); null if out of range.
    pub(super) fn backing_at(&self, i: usize) -> *mut bindings::page {
        if i >= self.nr_pages() {
            return core::ptr::null_mut();
        }
        // SAFETY: By the type invariant the folio is allocated and
        // referenced, so its pagemap is live; page `i` is in the folio.
        let Some(pagemap) = (unsafe { Pagemap::of_page(self.page.as_ptr()) }) else {
            return core::ptr::null_mut();
        };
        // SAFETY: A page of the folio, by pfn.
        let page = unsafe {
            bindings::pfn_to_page(bindings::page_to_pfn(self.page.as_ptr()) + i as c_ulong)
        };
        // SAFETY: `pfn_to_page` of a mapped pfn is not null.
        pagemap.backing_of(unsafe { NonNull::new_unchecked(page) })
    }

    /// Records that a copy wrote the data of every page.
    pub(super) fn set_filled(&mut self) {
        // INVARIANT: Only called after every page's data was written.
        self.filled = true;
    }

    /// Zeroes the folio's data unless a copy filled it.
    pub(super) fn zero_unless_filled(&mut self) {
        if self.filled {
            return;
        }
        for i in 0..self.nr_pages() {
            let backing = self.backing_at(i);
            if !backing.is_null() {
                // SAFETY: The page is ours while the device folio is: an
                // order-0 backing page, or a page of the coherent folio
                // itself, which the direct map covers (`memremap_pages()`
                // maps coherent memory like RAM).
                unsafe { bindings::clear_highpage(backing) };
            }
        }
        self.set_filled();
    }

    /// Gives the folio up, lock and reference included, as a raw pointer.
    pub(super) fn into_raw(self) -> *mut bindings::page {
        let page = self.page.as_ptr();
        core::mem::forget(self);
        page
    }
}

impl Drop for DevicePage {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the page is locked by us and we own
        // a reference; after this we own neither.
        unsafe { super::folio_unlock_put(self.page.as_ptr()) };
    }
}

/// A device page of some [`Pagemap`], referenced (and usually locked) by
/// someone else for `'a`, for example as the source of a migration.
///
/// # Invariants
///
/// `page` is an allocated device page of a live [`Pagemap`], so it has a
/// backing page if private, and all stay valid for `'a`.
#[derive(Clone, Copy)]
pub struct DevicePageRef<'a> {
    pub(super) page: NonNull<bindings::page>,
    pub(super) pagemap: &'a Pagemap,
}

impl<'a> DevicePageRef<'a> {
    /// The pagemap the page belongs to.
    pub fn pagemap(&self) -> &'a Pagemap {
        self.pagemap
    }

    /// The page that holds the page's data: its backing page, or itself.
    pub(super) fn backing(&self) -> *mut bindings::page {
        self.pagemap.backing_of(self.page)
    }

    /// The backing page of the page `i` pages after this one, if that is
    /// still in this page's folio; null otherwise.
    pub(super) fn backing_after(&self, i: usize) -> *mut bindings::page {
        // SAFETY: By the type invariant the page is referenced.
        unsafe { super::folio_page_after(self.page, i) }
            .map_or(core::ptr::null_mut(), |page| self.pagemap.backing_of(page))
    }
}
