// SPDX-License-Identifier: GPL-2.0

//! An mmu interval notifier with the device page table it keeps coherent.

use super::{DevicePageTable, ExclusivePage, Owner, ValidPfn};
use core::{cell::Cell, ops::Deref};
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

/// An invalidation, as the notifier callback sees it: the fields of the
/// `mmu_notifier_range`, read out once, since the mm core owns it.
struct Invalidation {
    start: usize,
    end: usize,
    event: bindings::mmu_notifier_event,
    owner: Option<Owner>,
    blockable: bool,
}

impl Invalidation {
    /// Reads the range of a notifier callback.
    ///
    /// # Safety
    ///
    /// `range` is valid for reads, as the mm core passes it to a callback.
    unsafe fn read(range: *const bindings::mmu_notifier_range) -> Self {
        // SAFETY: `range` is valid for reads, per the caller; the mm core
        // does not write to it while callbacks run.
        let (start, end, event, owner) =
            unsafe { ((*range).start, (*range).end, (*range).event, (*range).owner) };
        Self {
            start,
            end,
            event,
            owner: Owner::from_ptr(owner),
            // SAFETY: `range` is valid for reads, per the caller; this only
            // reads its flags.
            blockable: unsafe { bindings::mmu_notifier_range_blockable(range) },
        }
    }

    /// Whether pages of the range are being migrated, or made exclusive,
    /// by `owner`.
    fn is_migration_by(&self, owner: Owner) -> bool {
        matches!(
            self.event,
            bindings::mmu_notifier_event_MMU_NOTIFY_MIGRATE
                | bindings::mmu_notifier_event_MMU_NOTIFY_EXCLUSIVE
        ) && self.owner == Some(owner)
    }

    /// Whether the event makes a page exclusive to a device.
    fn is_exclusive(&self) -> bool {
        self.event == bindings::mmu_notifier_event_MMU_NOTIFY_EXCLUSIVE
    }
}

/// A token from [`Mirror::read_begin`]: the notifier sequence that a
/// later [`MirrorGuard::has_changed`] compares against, and the mirror it
/// is for. Checked against another mirror it always reads as changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Seq {
    pub(super) value: c_ulong,
    mirror: usize,
}

/// An HMM mirror of a virtual address range: an `mmu_interval_notifier`,
/// the [`DevicePageTable`] it keeps coherent, and the driver lock that
/// serializes them.
///
/// On every invalidation the notifier takes the lock (only tries it when
/// the event is not blockable), sets the new sequence and erases the range
/// from the table. The sequence can be checked, and the table reached,
/// only through a [`MirrorGuard`], that is with the same lock held.
///
/// Migrations to the device that the mirror starts itself
/// ([`Migration::to_device`](super::Migration::to_device)) invalidate like
/// any other, but the mirror remembers an unbroken run of them, so that
/// such a migration can still map the pages it moved
/// ([`MirrorGuard::only_own_migrations_since`]).
///
/// Dropping a mirror removes its notifier, which waits for the running
/// invalidations of the mm: not with any mirror's lock held.
///
/// # Invariants
///
/// `notifier` is inserted into `mm`'s interval tree, with the ops of
/// [`Self::OPS`], from initialization until drop.
#[pin_data(PinnedDrop)]
#[repr(C)]
pub struct Mirror {
    #[pin]
    state: Mutex<MirrorState>,
    #[pin]
    notifier: Opaque<bindings::mmu_interval_notifier>,
    /// Its address is [`Self::migration_owner`]. Private and not first
    /// (`repr(C)`), so no object that code outside this module can name
    /// starts at it.
    own_migration_tag: u8,
}

/// What the lock of a [`Mirror`] guards.
#[pin_data]
struct MirrorState {
    #[pin]
    table: DevicePageTable,
    /// The sequence the last invalidation set: `None` before the first,
    /// while the notifier still has the one insertion gave it. Only the
    /// callback sets it, under this lock, so it is the notifier's own,
    /// read without touching the notifier's private field.
    last_set: Cell<Option<c_ulong>>,
    /// The current unbroken run of invalidations by this mirror's own
    /// migrations, if the last invalidation was one.
    own_run: Cell<Option<OwnRun>>,
    /// The page index and sequence of the last invalidation by this
    /// mirror's own `make_device_exclusive()`.
    own_exclusive: Cell<Option<(usize, c_ulong)>>,
}

/// A run of invalidations by a mirror's own migrations, with nothing else
/// among them.
#[derive(Clone, Copy)]
struct OwnRun {
    /// The sequence before the run: `None` for the one the notifier had
    /// from insertion.
    first: Option<c_ulong>,
    /// The sequence the run's last invalidation set, the current one.
    last: c_ulong,
}

impl OwnRun {
    /// Whether the sequence was `value` before the run or during it.
    ///
    /// The sequence only grows. A [`Seq`] holds a value the notifier had:
    /// its first, or one the callback set. A run from the first holds all.
    fn holds(&self, value: c_ulong) -> bool {
        self.first
            .is_none_or(|first| value.wrapping_sub(first) <= self.last.wrapping_sub(first))
    }
}

// SAFETY: The notifier is only touched by the mm core and through `&self`
// methods that the C API allows from any thread.
unsafe impl Send for Mirror {}
// SAFETY: Shared references reach the notifier only through the C calls
// that the mm core allows concurrently (`read_begin`, `check_retry`), and
// the state only through its mutex.
unsafe impl Sync for Mirror {}

impl Mirror {
    const OPS: bindings::mmu_interval_notifier_ops = bindings::mmu_interval_notifier_ops {
        invalidate: Some(Self::invalidate_callback),
        invalidate_start: None,
        invalidate_finish: None,
    };

    /// Mirrors `[start, start + length)` of `mm`. The notifier is live, and
    /// may be called, as soon as this initializer has run.
    ///
    /// The first notifier of an mm registers with it, which takes the mmap
    /// lock for writing: do not call it with that lock held.
    pub fn new(mm: &MmWithUser, start: usize, length: usize) -> impl PinInit<Self, Error> + '_ {
        try_pin_init!(Self {
            state <- new_mutex!(
                pin_init!(MirrorState {
                    table <- DevicePageTable::new(),
                    last_set: Cell::new(None),
                    own_run: Cell::new(None),
                    own_exclusive: Cell::new(None),
                }),
                "Mirror::state"
            ),
            own_migration_tag: 0,
            // Inserted last: once it is in the tree, the callback may run
            // and expects the other fields to be initialized.
            // INVARIANT: Inserted with `Self::OPS` here, removed in `drop`.
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

    /// The mirrored address space. The notifier holds an `mmgrab` reference.
    pub fn mm(&self) -> &Mm {
        // SAFETY: By the type invariant the notifier is inserted, so its `mm`
        // is set and grabbed until removal in `drop`.
        unsafe { Mm::from_raw((*self.notifier.get()).mm) }
    }

    /// Whether `mm` is the mirrored address space.
    pub fn mirrors(&self, mm: &Mm) -> bool {
        core::ptr::eq(mm.as_raw(), self.mm().as_raw())
    }

    /// Whether `[start, end)` (not empty) lies inside the mirrored interval.
    pub fn covers(&self, start: usize, end: usize) -> bool {
        // SAFETY: By the type invariant the notifier is inserted; its
        // interval is set before insertion and never changes after.
        let (first, last) = unsafe {
            let node = &raw const (*self.notifier.get()).interval_tree;
            ((*node).start, (*node).last)
        };
        start < end && start as c_ulong >= first && (end - 1) as c_ulong <= last
    }

    /// Starts a read of the address space: waits for running invalidations
    /// to end and returns the sequence to check the result against.
    ///
    /// It sleeps while invalidations of the mm run, so never with this
    /// mirror's lock held, which they take. Under the mmap read lock it
    /// waits only for invalidations that do not need that lock.
    pub fn read_begin(&self) -> Seq {
        // SAFETY: By the type invariant the notifier is inserted.
        let value = unsafe { bindings::mmu_interval_read_begin(self.notifier.get()) };
        Seq {
            value,
            mirror: self.id(),
        }
    }

    /// Whether an invalidation hit the mirror since `seq` was taken. This
    /// is only a hint: without the mirror's lock, one may start right after.
    /// Decisions that rely on the data use [`MirrorGuard::has_changed`].
    pub fn check_retry(&self, seq: Seq) -> bool {
        // SAFETY: By the type invariant the notifier is inserted.
        seq.mirror != self.id()
            || unsafe { bindings::mmu_interval_check_retry(self.notifier.get(), seq.value) }
    }

    /// The mirror's identity for [`Seq`]: its address, pinned while it
    /// lives.
    fn id(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    /// Takes the mirror's lock, which every invalidation of the mirrored
    /// address space takes too. While it is held, do nothing that starts or
    /// waits for one (see the lock order in [`hmm`](super)).
    pub fn lock(&self) -> MirrorGuard<'_> {
        MirrorGuard {
            mirror: self,
            state: self.state.lock(),
        }
    }

    /// The owner of the invalidations of this mirror's own migrations to
    /// the device: the address of `own_migration_tag` in the pinned
    /// mirror. An [`Owner`] made by code outside this module is the
    /// address of an object it can reference, and none starts there, so
    /// no pagemap and no other migration can have this owner.
    pub(super) fn migration_owner(&self) -> Owner {
        Owner::of_pinned(&self.own_migration_tag)
    }

    pub(super) fn as_raw(&self) -> *mut bindings::mmu_interval_notifier {
        self.notifier.get()
    }

    /// # Safety
    ///
    /// Called by the mm core with the `notifier` of a live `Mirror`.
    unsafe extern "C" fn invalidate_callback(
        notifier: *mut bindings::mmu_interval_notifier,
        range: *const bindings::mmu_notifier_range,
        cur_seq: c_ulong,
    ) -> bool {
        // SAFETY: `notifier` is the `notifier` field of a `Mirror` (only
        // `new` inserts these ops), which outlives its insertion. Since it
        // is inserted last, all other fields are initialized.
        let this = unsafe {
            &*kernel::container_of!(Opaque::cast_from(notifier).cast_mut(), Self, notifier)
        };
        // SAFETY: The mm core passes a valid range for the callback's
        // duration.
        let invalidation = unsafe { Invalidation::read(range) };

        let state = if invalidation.blockable {
            this.state.lock()
        } else {
            match this.state.try_lock() {
                Some(state) => state,
                None => return false,
            }
        };
        // SAFETY: Called from the invalidate callback of this notifier, with
        // the lock held that readers hold for `mmu_interval_read_retry`.
        unsafe { bindings::mmu_interval_set_seq(notifier, cur_seq) };
        let before = state.last_set.replace(Some(cur_seq));
        let own = invalidation.is_migration_by(this.migration_owner());
        if own && invalidation.is_exclusive() {
            state
                .own_exclusive
                .set(Some((invalidation.start >> PAGE_SHIFT, cur_seq)));
        }
        state.own_run.set(match state.own_run.get() {
            Some(run) if own => Some(OwnRun {
                last: cur_seq,
                ..run
            }),
            _ if own => Some(OwnRun {
                first: before,
                last: cur_seq,
            }),
            _ => None,
        });
        // Exactly the pages of `[start, end)`. (`lib/test_hmm.c` drops the
        // page at `end` too; that would drop a device page next to one that
        // a CPU fault migrates back, which nothing maps again.)
        if invalidation.end > invalidation.start {
            state.table.erase(
                invalidation.start >> PAGE_SHIFT,
                (invalidation.end - 1) >> PAGE_SHIFT,
            );
        }
        true
    }
}

#[pinned_drop]
impl PinnedDrop for Mirror {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: By the type invariant the notifier is inserted. Removal
        // waits for running callbacks, so none can see the fields dropped
        // after this.
        unsafe { bindings::mmu_interval_notifier_remove(self.notifier.get()) };
    }
}

/// The lock of a [`Mirror`], held: access to its device page table, and
/// to the sequence check that makes a read of the address space valid.
pub struct MirrorGuard<'a> {
    mirror: &'a Mirror,
    state: Guard<'a, MirrorState, MutexBackend>,
}

impl MirrorGuard<'_> {
    /// Whether an invalidation hit the mirror since `seq` was taken: if so,
    /// what was read under that sequence is stale.
    pub fn has_changed(&self, seq: Seq) -> bool {
        // SAFETY: The notifier is inserted, and the lock that the
        // invalidate callback takes around `mmu_interval_set_seq` is held.
        seq.mirror != self.mirror.id()
            || unsafe { bindings::mmu_interval_read_retry(self.mirror.as_raw(), seq.value) }
    }

    /// Whether the only invalidations since `seq` were by this mirror's own
    /// migrations to the device and exclusive accesses (or there were none).
    pub(super) fn only_own_migrations_since(&self, seq: Seq) -> bool {
        if !self.has_changed(seq) {
            return true;
        }
        // The run may have begun before `seq` was taken, with an earlier
        // own invalidation.
        seq.mirror == self.mirror.id() && self.in_current_own_run(seq.value)
    }

    /// Whether the notifier's sequence was `value` at the start of the
    /// current unbroken run of own invalidations, or during it: nothing
    /// but own invalidations came after `value`.
    fn in_current_own_run(&self, value: c_ulong) -> bool {
        self.state.own_run.get().is_some_and(|run| run.holds(value))
    }

    /// Maps `page`, which `ExclusivePage::make` made exclusive for this
    /// mirror, at its address, unless something else invalidated it after
    /// `make_device_exclusive()` did: then returns `false`, and the attempt
    /// starts over. mm/rmap.c asks for this check, in the notifier's
    /// critical section.
    ///
    /// The check is against the own invalidation that `make` started, not
    /// against a sequence taken before it: a new attempt at a page faults
    /// the device-exclusive entry of the last one back first, an
    /// invalidation that is not the mirror's own and would fail every
    /// attempt after the first.
    pub fn store_exclusive(&self, page: &ExclusivePage<'_>) -> Result<bool> {
        if !core::ptr::eq(page.mirror(), self.mirror) {
            return Err(EINVAL);
        }
        // `make`'s invalidation was the last own exclusive one, of this
        // page, and the current run of own invalidations holds it: nothing
        // else came after it. (`at` is the sequence it set; one equal to
        // the run's start was set before the run.)
        let run_start = self.state.own_run.get().and_then(|run| run.first);
        let valid = self.state.own_exclusive.get().is_some_and(|(index, at)| {
            index == page.index() && run_start != Some(at) && self.in_current_own_run(at)
        });
        if !valid {
            return Ok(false);
        }
        // SAFETY: This mirror's lock is held, and `page` is this mirror's.
        unsafe { self.state.table.store_exclusive(page) }?;
        Ok(true)
    }

    /// Stores a page the CPU maps, for [`LockedRange::map`](super::LockedRange::map).
    /// `pfn` must be of this guard's mirror.
    pub(super) fn store_valid(&self, pfn: &ValidPfn<'_>) -> Result {
        if !core::ptr::eq(pfn.mirror(), self.mirror) {
            return Err(EINVAL);
        }
        // SAFETY: This mirror's lock is held, and `pfn` is of this mirror.
        unsafe { self.state.table.store(pfn) }
    }

    /// The mirror this lock belongs to.
    pub fn mirror(&self) -> &Mirror {
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
        if access == super::MirroredAccess::Atomic {
            return Err(EINVAL);
        }
        // SAFETY: The lock of the mirror that owns the table is held; the
        // caller keeps `page` allocated as the contract asks. It gives no
        // reference, and `Atomic`, which would need one, was refused.
        unsafe { self.state.table.store_page(index, page, access) }
    }
}

impl Deref for MirrorGuard<'_> {
    type Target = DevicePageTable;

    fn deref(&self) -> &DevicePageTable {
        &self.state.table
    }
}
