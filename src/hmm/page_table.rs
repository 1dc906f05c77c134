// SPDX-License-Identifier: GPL-2.0

//! The device page table: which CPU pages the device currently maps.

use super::{
    exclusive::ExclusivePage,
    pagemap::{DevicePageRef, Pagemap},
    ValidPfn,
};
use core::{
    ops::Range,
    ptr::NonNull,
    sync::atomic::{AtomicUsize, Ordering},
};
use kernel::{
    alloc::{Allocator, Vec},
    bindings,
    ffi::{c_ulong, c_void},
    page::PAGE_SIZE,
    prelude::*,
    types::Opaque, //
};

// `erase` uses `xa_store_range()`, which only multi-index XArrays have.
#[cfg(not(CONFIG_XARRAY_MULTI))]
compile_error!("the device page table needs CONFIG_XARRAY_MULTI (THP selects it)");

/// How the device may access a mirrored page. The values are the XArray
/// pointer tags `lib/test_hmm.c` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MirroredAccess {
    /// Read-only.
    Read = 0,
    /// Exclusive (atomic) access: the CPU mapping was replaced.
    Atomic = 1,
    /// Read and write.
    Write = 3,
}

/// The XArray mark (`XA_MARK_0`) of exclusive-access entries: erasing a
/// range finds the page references to give back without visiting every
/// entry.
const EXCLUSIVE_MARK: bindings::xa_mark_t = 0;

/// Entries that [`DevicePageTable::read_pages`] and
/// [`DevicePageTable::write_pages`] fetch per XArray walk.
const BATCH: usize = 64;

/// A device page table: page frame index (virtual address >> `PAGE_SHIFT`)
/// to the `struct page` mapped there and the device's access to it.
///
/// It holds no page references, as a device page table would not (but
/// for exclusive-access entries, see [`Self::store_exclusive`]): the
/// [`Mirror`](super::Mirror) that owns it clears an address range before
/// the CPU unmaps it, and is the only way to reach the table.
///
/// # Invariants
///
/// - `xa` is an initialized XArray whose entries are `struct page` pointers
///   tagged with a [`MirroredAccess`].
/// - Every page in it stays allocated while it is in the table: entries
///   come from [`ValidPfn`]s, or are the pages holding the data of device
///   pages that the CPU maps (a private device page keeps its backing page
///   while it is allocated; a coherent one is its own), and the owning
///   mirror erases them when the CPU mapping is invalidated, before the
///   device page can be freed, under the lock that guards the table.
/// - An entry tagged [`MirroredAccess::Atomic`] owns a reference to its
///   page, and is the only kind that carries [`EXCLUSIVE_MARK`].
/// - No entry has an index above `max_index`. (Stores and erases run under
///   the owning mirror's lock, which orders them.)
#[pin_data(PinnedDrop)]
pub struct DevicePageTable {
    #[pin]
    xa: Opaque<bindings::xarray>,
    /// No entry has a higher index: erasing stops here.
    max_index: AtomicUsize,
}

// SAFETY: The XArray has its own lock, and the pages it points to are not
// tied to a thread. Not `Sync`: storing an entry is several steps (the
// entry, its mark, `max_index`) that only the mirror's lock makes atomic.
unsafe impl Send for DevicePageTable {}

impl DevicePageTable {
    /// Creates an empty table. Only a [`Mirror`](super::Mirror) makes one,
    /// as only its notifier erases entries before their pages go.
    pub(super) fn new() -> impl PinInit<Self> {
        // INVARIANT: An empty XArray; `max_index` bounds no entry yet.
        pin_init!(Self {
            // SAFETY: `xa_init_flags` initializes the XArray at `xa`.
            xa <- Opaque::ffi_init(|xa| unsafe { bindings::xa_init_flags(xa, 0) }),
            max_index: AtomicUsize::new(0),
        })
    }

    fn load(&self, index: usize) -> Option<(NonNull<bindings::page>, MirroredAccess)> {
        // SAFETY: `self.xa` is initialized; `xa_load` takes the RCU read lock.
        Self::decode(unsafe { bindings::xa_load(self.xa.get(), index) })
    }

    /// The page and access of an entry; `None` for no entry.
    fn decode(entry: *mut c_void) -> Option<(NonNull<bindings::page>, MirroredAccess)> {
        // SAFETY: Untagging only masks the low bits of the entry.
        let page = NonNull::new(unsafe { bindings::xa_untag_pointer(entry) }.cast())?;
        // SAFETY: Reading the tag only looks at the low bits of the entry.
        let access = match unsafe { bindings::xa_pointer_tag(entry) } {
            0 => MirroredAccess::Read,
            1 => MirroredAccess::Atomic,
            _ => MirroredAccess::Write,
        };
        Some((page, access))
    }

    /// Calls `f(page, access)` for the entries at `indices`, in order, as
    /// long as there is one and `f` returns `true`. Returns how many it
    /// called `f` for and that returned `true`.
    ///
    /// The entries come [`BATCH`] at a time from one `xa_extract()`, one
    /// RCU section and one descent of the tree, instead of an `xa_load()`
    /// each: that is most of the cost of reading a mirrored page.
    fn for_each_mapped(
        &self,
        indices: Range<usize>,
        mut f: impl FnMut(NonNull<bindings::page>, MirroredAccess) -> bool,
    ) -> usize {
        let mut index = indices.start;
        let mut entries = [core::ptr::null_mut(); BATCH];
        while index < indices.end {
            let n = BATCH.min(indices.end - index);
            // SAFETY: `self.xa` is initialized, `xa_extract` takes the RCU
            // read lock; `entries` has room for `n` entries.
            let found = unsafe {
                bindings::xa_extract(
                    self.xa.get(),
                    entries.as_mut_ptr(),
                    index as c_ulong,
                    (index + n - 1) as c_ulong,
                    n as u32,
                    bindings::XA_PRESENT,
                )
            } as usize;
            // Entries are copied without their indices: only a full batch
            // tells that every index has one. Else look them up one by one
            // to stop at the first hole.
            let batch = index..index + n;
            let entry = |i: usize| {
                if found == n {
                    Self::decode(entries[i - batch.start])
                } else {
                    self.load(i)
                }
            };
            for i in batch.clone() {
                match entry(i) {
                    Some((page, access)) if f(page, access) => index += 1,
                    _ => return index - indices.start,
                }
            }
        }
        index - indices.start
    }

    /// The device's access to the page at `index`, if it maps one.
    pub fn access(&self, index: usize) -> Option<MirroredAccess> {
        self.load(index).map(|(_, access)| access)
    }

    /// Maps the page of `pfn` at its index, writable if the CPU maps it so.
    /// Fails with `EFAULT` if `pfn` has no page. The way in is
    /// [`LockedRange::map`](super::LockedRange::map).
    ///
    /// # Safety
    ///
    /// This is the table of `pfn`'s mirror, whose lock the caller holds.
    pub(super) unsafe fn store(&self, pfn: &ValidPfn<'_>) -> Result {
        let page = pfn.page_ptr().ok_or(EFAULT)?;
        // A device-private page is stored by its backing page, which holds
        // its data; one this abstraction did not make is not mirrored.
        // SAFETY: By the invariant of `ValidPfn` the page is allocated and
        // mapped at `pfn.index()` while `pfn` lives, which the mirror's lock
        // held by our caller ensures.
        let page = if unsafe { bindings::is_device_private_page(page.as_ptr()) } {
            // SAFETY: `page` is a valid page, kept by the CPU mapping (so
            // kept referenced) while `pfn`'s mirror lock is held, which is
            // for as long as the `&Pagemap` returned is used here.
            let pagemap = unsafe { Pagemap::of_page(page.as_ptr()) }.ok_or(EFAULT)?;
            // INVARIANT: A mapped device page is allocated, so it has a
            // backing page, valid while the device page is.
            NonNull::new(DevicePageRef { page, pagemap }.backing()).ok_or(EFAULT)?
        } else {
            page
        };
        let access = if pfn.is_writable() {
            MirroredAccess::Write
        } else {
            MirroredAccess::Read
        };
        // SAFETY: Our caller holds the lock of the mirror that owns this
        // table and `pfn`. The entry sits where
        // the CPU maps the page, and the mirror's notifier erases it before
        // the page is unmapped, so before it can be freed; a backing page
        // lives while its device page does. `Write` and `Read` own nothing.
        unsafe { self.store_page(pfn.index(), page, access) }
    }

    /// Maps `page` at `index` with `access`.
    ///
    /// # Safety
    ///
    /// This is the table of a live [`Mirror`](super::Mirror), whose lock
    /// the caller holds. `page` stays allocated until the mirror's notifier
    /// erases `index`; with [`MirroredAccess::Atomic`], the caller hands
    /// over a reference to it, which the entry then owns.
    pub(super) unsafe fn store_page(
        &self,
        index: usize,
        page: NonNull<bindings::page>,
        access: MirroredAccess,
    ) -> Result {
        // SAFETY: Tagging only sets the low bits of the (aligned) page pointer.
        let entry = unsafe { bindings::xa_tag_pointer(page.as_ptr().cast(), access as c_ulong) };
        // GFP_ATOMIC, as in C: the lock around the table is also taken by
        // invalidations that memory reclaim may start.
        // SAFETY: `self.xa` is initialized.
        // INVARIANT: The caller gives a page that stays allocated until the
        // mirror erases it, and a reference with an `Atomic` one; its lock,
        // held, orders this with erases and the `max_index` update below.
        let old = unsafe { bindings::xa_store(self.xa.get(), index, entry, bindings::GFP_ATOMIC) };
        // SAFETY: `xa_err` only decodes the entry.
        kernel::error::to_result(unsafe { bindings::xa_err(old) })?;
        self.max_index.fetch_max(index, Ordering::Relaxed);
        // Marks outlive a store over an entry; keep them on `Atomic` only.
        if access == MirroredAccess::Atomic {
            // SAFETY: `self.xa` is initialized and has an entry at `index`.
            unsafe { bindings::xa_set_mark(self.xa.get(), index, EXCLUSIVE_MARK) };
        } else if Self::is_exclusive(old) {
            // SAFETY: `self.xa` is initialized and has an entry at
            // `index`, just stored.
            unsafe { bindings::xa_clear_mark(self.xa.get(), index, EXCLUSIVE_MARK) };
        }
        // SAFETY: `old` was an entry of the table, and is one no more.
        unsafe { Self::release(old) };
        Ok(())
    }

    /// Whether `entry` (or null) is tagged [`MirroredAccess::Atomic`].
    fn is_exclusive(entry: *mut c_void) -> bool {
        // SAFETY: Reading the tag only looks at the low bits of the entry.
        !entry.is_null()
            && unsafe { bindings::xa_pointer_tag(entry) } == MirroredAccess::Atomic as u32
    }

    /// Drops what a removed entry owned: the page reference of an `Atomic`
    /// entry.
    ///
    /// # Safety
    ///
    /// `entry` was an entry of the table (or null), and no longer is.
    unsafe fn release(entry: *mut c_void) {
        if !Self::is_exclusive(entry) {
            return;
        }
        // SAFETY: By the type invariant an `Atomic` entry owns a reference
        // to its page, which the caller hands over.
        unsafe {
            bindings::folio_put(bindings::page_folio(
                bindings::xa_untag_pointer(entry).cast(),
            ))
        };
    }

    /// Maps `page`, which the device now has exclusive access to, at
    /// `index`. The entry holds a reference to the page until it is erased,
    /// so it never outlives the page, whatever happens to the CPU mapping.
    /// [`MirrorGuard::store_exclusive`](super::MirrorGuard::store_exclusive)
    /// is the way in: it checks the sequence.
    ///
    /// # Safety
    ///
    /// This is the table of `page`'s mirror, whose lock the caller holds.
    pub(super) unsafe fn store_exclusive(&self, page: &ExclusivePage<'_>) -> Result {
        let index = page.index();
        let page = page.page();
        // SAFETY: `page` is referenced while `ExclusivePage` is borrowed;
        // this takes a reference of the table's own.
        unsafe { bindings::folio_get(bindings::page_folio(page.as_ptr())) };
        // SAFETY: Our caller holds the lock of the mirror that owns this
        // table. The entry owns the reference just taken, so the
        // page stays allocated until it is erased.
        let stored = unsafe { self.store_page(index, page, MirroredAccess::Atomic) };
        if stored.is_err() {
            // SAFETY: Not stored: give back the reference taken above.
            unsafe { bindings::folio_put(bindings::page_folio(page.as_ptr())) };
        }
        stored
    }

    /// Appends a copy of the pages at `indices` to `dst`, in order, up to
    /// the first the device does not map; returns how many it copied.
    /// `dst` must have room for them all: this runs under the mirror's
    /// lock, which reclaim may need, so it does not allocate.
    pub fn read_pages<A: Allocator>(
        &self,
        indices: Range<usize>,
        dst: &mut Vec<u8, A>,
    ) -> Result<usize> {
        let need = indices.len().checked_mul(PAGE_SIZE).ok_or(EINVAL)?;
        if dst.spare_capacity_mut().len() < need {
            return Err(ENOMEM);
        }
        Ok(self.for_each_mapped(indices, |page, _| {
            let spare = dst.spare_capacity_mut();
            // Checked above for the whole range; checked again here so
            // that the copy's bound does not rest on the walk's.
            if spare.len() < PAGE_SIZE {
                return false;
            }
            // SAFETY: By the type invariant `page` is allocated while it is
            // in the table, and the caller's borrow of the table holds the
            // lock that erasing takes. `spare` has room for `PAGE_SIZE`
            // bytes, checked just above.
            unsafe {
                bindings::memcpy_from_page(spare.as_mut_ptr().cast(), page.as_ptr(), 0, PAGE_SIZE)
            };
            // SAFETY: The `PAGE_SIZE` bytes past the old length were just
            // written.
            unsafe { dst.inc_len(PAGE_SIZE) };
            true
        }))
    }

    /// Copies `src`, one page per index, into the pages at `indices`, in
    /// order, up to the first the device does not map writable; returns
    /// how many it wrote.
    pub fn write_pages(&self, indices: Range<usize>, src: &[[u8; PAGE_SIZE]]) -> usize {
        let mut src = src.iter();
        self.for_each_mapped(indices, |page, access| {
            let Some(data) = src.next() else {
                return false;
            };
            if access != MirroredAccess::Write {
                return false;
            }
            // SAFETY: As in `read_pages`, `page` is allocated; `data` is one
            // page long.
            unsafe { bindings::memcpy_to_page(page.as_ptr(), 0, data.as_ptr().cast(), PAGE_SIZE) };
            true
        })
    }

    /// Whether the device has exclusive access to any page in
    /// `first..=last`. Only marked entries are visited, so a huge span
    /// costs what the table holds of them.
    pub fn any_exclusive(&self, first: usize, last: usize) -> bool {
        let mut found = false;
        self.for_each_exclusive(first, last, |_, _| {
            found = true;
            false
        });
        found
    }

    /// Calls `f(index, entry)` for the exclusive entries in `first..=last`
    /// (those with [`EXCLUSIVE_MARK`]), in index order, while it returns
    /// `true`.
    fn for_each_exclusive(
        &self,
        first: usize,
        last: usize,
        mut f: impl FnMut(usize, *mut c_void) -> bool,
    ) {
        let mut index = first as c_ulong;
        let last = last as c_ulong;
        // SAFETY: `self.xa` is initialized; `xa_find` takes the RCU read lock.
        let mut entry =
            unsafe { bindings::xa_find(self.xa.get(), &mut index, last, EXCLUSIVE_MARK) };
        while !entry.is_null() && f(index as usize, entry) {
            // SAFETY: `self.xa` is initialized; `xa_find_after` takes the
            // RCU read lock itself.
            entry =
                unsafe { bindings::xa_find_after(self.xa.get(), &mut index, last, EXCLUSIVE_MARK) };
        }
    }

    /// Erases the entries for indices `first..=last`.
    ///
    /// This runs in every invalidation of the address space, over as many
    /// pages as it covers, mostly where the table has nothing: one lookup
    /// tells so, as in C. Else the exclusive entries give their reference
    /// back one by one, and the rest go in one walk under one XArray lock,
    /// up to the highest index stored: `xa_store_range()` visits every
    /// empty slot of the range, hundreds for one that ends at the top of
    /// the address space.
    pub(super) fn erase(&self, first: usize, last: usize) {
        let last = last.min(self.max_index.load(Ordering::Relaxed));
        if first > last {
            return;
        }
        let mut found = first as c_ulong;
        // SAFETY: `self.xa` is initialized; `xa_find` takes the RCU read lock.
        let entry = unsafe {
            bindings::xa_find(
                self.xa.get(),
                &mut found,
                last as c_ulong,
                bindings::XA_PRESENT,
            )
        };
        if entry.is_null() {
            return;
        }
        let first = found as usize;
        self.for_each_exclusive(first, last, |index, _| {
            // SAFETY: `self.xa` is initialized.
            let old = unsafe { bindings::xa_erase(self.xa.get(), index) };
            // SAFETY: `old` was an entry of the table, and is one no more.
            unsafe { Self::release(old) };
            true
        });
        // SAFETY: `self.xa` is initialized. Storing null never allocates;
        // what is left in the range owns nothing.
        unsafe {
            bindings::xa_store_range(
                self.xa.get(),
                first as c_ulong,
                last as c_ulong,
                core::ptr::null_mut(),
                bindings::GFP_ATOMIC,
            )
        };
    }
}

#[pinned_drop]
impl PinnedDrop for DevicePageTable {
    fn drop(self: Pin<&mut Self>) {
        // Only the exclusive entries own something; `xa_destroy` frees the
        // rest, without `erase`'s walk.
        self.for_each_exclusive(0, usize::MAX, |_, entry| {
            // SAFETY: The table is going away: no entry outlives this.
            unsafe { Self::release(entry) };
            true
        });
        // SAFETY: `self.xa` is initialized and no longer used after this.
        unsafe { bindings::xa_destroy(self.xa.get()) };
    }
}
