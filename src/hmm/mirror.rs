// SPDX-License-Identifier: GPL-2.0

//! An mmu interval notifier with the device page table it keeps coherent.

use super::{DevicePageTable, Owner};
use core::ops::Deref;
use kernel::{
    bindings,
    error::to_result,
    ffi::c_ulong,
    mm::{Mm, MmWithUser},
    new_mutex,
    page::PAGE_SHIFT,
    prelude::*,
    sync::{lock::mutex::MutexBackend, lock::Guard, Mutex},
    types::Opaque, //
};

/// The kind of an address-space change (`enum mmu_notifier_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The range is unmapped (munmap, mremap).
    Unmap,
    /// Pages are cleared from the page tables (reclaim, madvise, ...).
    Clear,
    /// Protection changes over a whole VMA.
    ProtectionVma,
    /// Protection changes for individual pages.
    ProtectionPage,
    /// Soft-dirty tracking.
    SoftDirty,
    /// The address space is being torn down.
    Release,
    /// Pages are migrated; [`Invalidation::owner`] tells by whom.
    Migrate,
    /// A device takes exclusive access; [`Invalidation::owner`] tells who.
    Exclusive,
    /// An event this abstraction does not know.
    Other(u32),
}

/// An invalidation, as the notifier callback sees it.
pub struct Invalidation<'a> {
    range: &'a bindings::mmu_notifier_range,
}

impl Invalidation<'_> {
    /// First address of the invalidated range.
    pub fn start(&self) -> usize {
        self.range.start as usize
    }

    /// End (exclusive) of the invalidated range.
    pub fn end(&self) -> usize {
        self.range.end as usize
    }

    /// What is happening to the range.
    pub fn event(&self) -> Event {
        match self.range.event {
            bindings::mmu_notifier_event_MMU_NOTIFY_UNMAP => Event::Unmap,
            bindings::mmu_notifier_event_MMU_NOTIFY_CLEAR => Event::Clear,
            bindings::mmu_notifier_event_MMU_NOTIFY_PROTECTION_VMA => Event::ProtectionVma,
            bindings::mmu_notifier_event_MMU_NOTIFY_PROTECTION_PAGE => Event::ProtectionPage,
            bindings::mmu_notifier_event_MMU_NOTIFY_SOFT_DIRTY => Event::SoftDirty,
            bindings::mmu_notifier_event_MMU_NOTIFY_RELEASE => Event::Release,
            bindings::mmu_notifier_event_MMU_NOTIFY_MIGRATE => Event::Migrate,
            bindings::mmu_notifier_event_MMU_NOTIFY_EXCLUSIVE => Event::Exclusive,
            other => Event::Other(other),
        }
    }

    /// Who started a migration or exclusive-access event.
    pub fn owner(&self) -> Option<Owner> {
        Owner::from_ptr(self.range.owner)
    }

    /// Whether the callback may sleep. If not, it may only try the lock.
    pub fn is_blockable(&self) -> bool {
        // SAFETY: `self.range` is a valid notifier range.
        unsafe { bindings::mmu_notifier_range_blockable(self.range) }
    }
}

/// What a [`Mirror`]'s owner decides about invalidations.
pub trait MirrorOps: Send + Sync {
    /// Returns `true` for an invalidation the device does not need to see,
    /// for example its own migrations. The mirror then neither takes its
    /// lock nor bumps its sequence. Called without the lock held.
    fn ignores(&self, _invalidation: &Invalidation<'_>) -> bool {
        false
    }
}

/// A token from [`Mirror::read_begin`]: the notifier sequence that a
/// later [`MirrorGuard::has_changed`] compares against.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct Seq(pub(super) c_ulong);

/// An HMM mirror of a virtual address range: an `mmu_interval_notifier`,
/// the [`DevicePageTable`] it keeps coherent, and the driver lock that
/// serializes them.
///
/// On every invalidation the [`MirrorOps`] may ignore, the notifier takes
/// the lock (only tries it when the event is not blockable), sets the new
/// sequence and erases the range from the table. The sequence can be
/// checked, and the table reached, only through a [`MirrorGuard`], that
/// is with the same lock held.
///
/// # Invariants
///
/// `notifier` is inserted into `mm`'s interval tree, with the ops of
/// [`Self::OPS`], from initialization until drop.
#[pin_data(PinnedDrop)]
pub struct Mirror<T: MirrorOps> {
    ops: T,
    #[pin]
    table: Mutex<DevicePageTable>,
    #[pin]
    notifier: Opaque<bindings::mmu_interval_notifier>,
}

// SAFETY: The notifier is only touched by the mm core and through `&self`
// methods that the C API allows from any thread.
unsafe impl<T: MirrorOps> Send for Mirror<T> {}
// SAFETY: As above; the table is behind a mutex and `T: Sync`.
unsafe impl<T: MirrorOps> Sync for Mirror<T> {}

impl<T: MirrorOps> Mirror<T> {
    const OPS: bindings::mmu_interval_notifier_ops = bindings::mmu_interval_notifier_ops {
        invalidate: Some(Self::invalidate_callback),
        invalidate_start: None,
        invalidate_finish: None,
    };

    /// Mirrors `[start, start + length)` of `mm`. The notifier is live, and
    /// may be called, as soon as this initializer has run.
    pub fn new(
        mm: &MmWithUser,
        start: usize,
        length: usize,
        ops: T,
    ) -> impl PinInit<Self, Error> + use<'_, T> {
        try_pin_init!(Self {
            ops,
            table <- new_mutex!(DevicePageTable::new(), "Mirror::table"),
            // Inserted last: once it is in the tree, the callback may run
            // and expects the other fields to be initialized.
            notifier <- Opaque::try_ffi_init(|slot: *mut bindings::mmu_interval_notifier| {
                // Start from zeroes, as C's kzalloc'ed notifiers do.
                // SAFETY: `slot` is valid for writes of one notifier.
                unsafe { slot.write_bytes(0, 1) };
                // SAFETY: `slot` is pinned and outlives the insertion (it is
                // removed in `drop`). `mm` has `mm_users > 0`, as insertion
                // requires; the notifier takes its own `mmgrab` reference.
                to_result(unsafe {
                    bindings::mmu_interval_notifier_insert(slot, mm.as_raw(), start, length, &Self::OPS)
                })
            }),
        })
    }

    /// The ops given at creation.
    pub fn ops(&self) -> &T {
        &self.ops
    }

    /// The mirrored address space. The notifier holds an `mmgrab` reference.
    pub fn mm(&self) -> &Mm {
        // SAFETY: By the type invariant the notifier is inserted, so its `mm`
        // is set and grabbed until removal in `drop`.
        unsafe { Mm::from_raw((*self.notifier.get()).mm) }
    }

    /// Starts a read of the address space: waits for running invalidations
    /// to end and returns the sequence to check the result against.
    ///
    /// It may sleep; do not call it with the mmap lock held.
    pub fn read_begin(&self) -> Seq {
        // SAFETY: By the type invariant the notifier is inserted.
        Seq(unsafe { bindings::mmu_interval_read_begin(self.notifier.get()) })
    }

    /// Whether an invalidation hit the mirror since `seq` was taken. This
    /// is only a hint: without the mirror's lock, one may start right after.
    /// Decisions that rely on the data use [`MirrorGuard::has_changed`].
    pub fn check_retry(&self, seq: Seq) -> bool {
        // SAFETY: By the type invariant the notifier is inserted.
        unsafe { bindings::mmu_interval_check_retry(self.notifier.get(), seq.0) }
    }

    /// Takes the mirror's lock.
    pub fn lock(&self) -> MirrorGuard<'_, T> {
        MirrorGuard {
            mirror: self,
            table: self.table.lock(),
        }
    }

    pub(super) fn as_raw(&self) -> *mut bindings::mmu_interval_notifier {
        self.notifier.get()
    }

    /// # Safety
    ///
    /// Called by the mm core with the `notifier` of a live `Mirror<T>`.
    unsafe extern "C" fn invalidate_callback(
        notifier: *mut bindings::mmu_interval_notifier,
        range: *const bindings::mmu_notifier_range,
        cur_seq: c_ulong,
    ) -> bool {
        // SAFETY: `notifier` is the `notifier` field of a `Mirror<T>` (only
        // `new` inserts these ops), which outlives its insertion. Since it
        // is inserted last, all other fields are initialized.
        let this = unsafe {
            &*kernel::container_of!(Opaque::cast_from(notifier).cast_mut(), Self, notifier)
        };
        // SAFETY: The mm core passes a valid range for the callback's duration.
        let invalidation = Invalidation {
            range: unsafe { &*range },
        };

        if this.ops.ignores(&invalidation) {
            return true;
        }
        let table = if invalidation.is_blockable() {
            this.table.lock()
        } else {
            match this.table.try_lock() {
                Some(table) => table,
                None => return false,
            }
        };
        // SAFETY: Called from the invalidate callback of this notifier, with
        // the lock held that readers hold for `mmu_interval_read_retry`.
        unsafe { bindings::mmu_interval_set_seq(notifier, cur_seq) };
        // Exactly the pages of `[start, end)`. (`lib/test_hmm.c` drops the
        // page at `end` too; that would drop a device page next to one that
        // a CPU fault migrates back, which nothing maps again.)
        if invalidation.end() > invalidation.start() {
            table.erase(
                invalidation.start() >> PAGE_SHIFT,
                (invalidation.end() - 1) >> PAGE_SHIFT,
            );
        }
        true
    }
}

#[pinned_drop]
impl<T: MirrorOps> PinnedDrop for Mirror<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: By the type invariant the notifier is inserted. Removal
        // waits for running callbacks, so none can see the fields dropped
        // after this.
        unsafe { bindings::mmu_interval_notifier_remove(self.notifier.get()) };
    }
}

/// The lock of a [`Mirror`], held: access to its device page table, and
/// to the sequence check that makes a read of the address space valid.
pub struct MirrorGuard<'a, T: MirrorOps> {
    mirror: &'a Mirror<T>,
    table: Guard<'a, DevicePageTable, MutexBackend>,
}

impl<T: MirrorOps> MirrorGuard<'_, T> {
    /// Whether an invalidation hit the mirror since `seq` was taken: if so,
    /// what was read under that sequence is stale.
    pub fn has_changed(&self, seq: Seq) -> bool {
        // SAFETY: The notifier is inserted, and the lock that the
        // invalidate callback takes around `mmu_interval_set_seq` is held.
        unsafe { bindings::mmu_interval_read_retry(self.mirror.as_raw(), seq.0) }
    }

    /// The mirror this lock belongs to.
    pub fn mirror(&self) -> &Mirror<T> {
        self.mirror
    }

    /// Maps `page` at `index` with `access`.
    ///
    /// # Safety
    ///
    /// `page` must stay allocated until an invalidation of the mirror
    /// covers `index`, as the [`DevicePageTable`] invariant requires.
    pub(super) unsafe fn store_raw(
        &self,
        index: usize,
        page: *mut bindings::page,
        access: super::MirroredAccess,
    ) -> Result {
        let page = core::ptr::NonNull::new(page).ok_or(EFAULT)?;
        self.table.store_page(index, page, access)
    }
}

impl<T: MirrorOps> Deref for MirrorGuard<'_, T> {
    type Target = DevicePageTable;

    fn deref(&self) -> &DevicePageTable {
        &self.table
    }
}
