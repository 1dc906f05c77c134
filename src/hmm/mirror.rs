// SPDX-License-Identifier: GPL-2.0

//! An mmu interval notifier with the device page table it keeps coherent.

use super::{DevicePageTable, ExclusivePage, Owner};
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

/// An invalidation, as the notifier callback sees it.
struct Invalidation<'a> {
    range: &'a bindings::mmu_notifier_range,
}

impl Invalidation<'_> {
    /// First address of the invalidated range.
    fn start(&self) -> usize {
        self.range.start
    }

    /// End (exclusive) of the invalidated range.
    fn end(&self) -> usize {
        self.range.end
    }

    /// Whether pages of the range are being migrated, or made exclusive,
    /// by `owner`.
    fn is_migration_by(&self, owner: Owner) -> bool {
        matches!(
            self.range.event,
            bindings::mmu_notifier_event_MMU_NOTIFY_MIGRATE
                | bindings::mmu_notifier_event_MMU_NOTIFY_EXCLUSIVE
        ) && Owner::from_ptr(self.range.owner) == Some(owner)
    }

    /// Whether the event makes a page exclusive to a device.
    fn is_exclusive(&self) -> bool {
        self.range.event == bindings::mmu_notifier_event_MMU_NOTIFY_EXCLUSIVE
    }

    /// Whether the callback may sleep. If not, it may only try the lock.
    fn is_blockable(&self) -> bool {
        // SAFETY: `self.range` is a valid notifier range.
        unsafe { bindings::mmu_notifier_range_blockable(self.range) }
    }
}

/// A token from [`Mirror::read_begin`]: the notifier sequence that a
/// later [`MirrorGuard::has_changed`] compares against, and the mirror it
/// is for. Checked against another mirror it always reads as changed.
#[derive(Clone, Copy, Debug)]
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
    /// The notifier sequence before, and after, the last unbroken run of
    /// invalidations by this mirror's own migrations.
    own_run: Cell<Option<(c_ulong, c_ulong)>>,
    /// The page index and sequence of the last invalidation by this
    /// mirror's own `make_device_exclusive()`.
    own_exclusive: Cell<Option<(usize, c_ulong)>>,
}

// SAFETY: The notifier is only touched by the mm core and through `&self`
// methods that the C API allows from any thread.
unsafe impl Send for Mirror {}
// SAFETY: As above; the rest is behind a mutex.
unsafe impl Sync for Mirror {}

impl Mirror {
    const OPS: bindings::mmu_interval_notifier_ops = bindings::mmu_interval_notifier_ops {
        invalidate: Some(Self::invalidate_callback),
        invalidate_start: None,
        invalidate_finish: None,
    };

    /// Mirrors `[start, start + length)` of `mm`. The notifier is live, and
    /// may be called, as soon as this initializer has run.
    pub fn new(mm: &MmWithUser, start: usize, length: usize) -> impl PinInit<Self, Error> + '_ {
        try_pin_init!(Self {
            state <- new_mutex!(
                pin_init!(MirrorState {
                    table <- DevicePageTable::new(),
                    own_run: Cell::new(None),
                    own_exclusive: Cell::new(None),
                }),
                "Mirror::state"
            ),
            own_migration_tag: 0,
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

    /// The mirrored address space. The notifier holds an `mmgrab` reference.
    pub fn mm(&self) -> &Mm {
        // SAFETY: By the type invariant the notifier is inserted, so its `mm`
        // is set and grabbed until removal in `drop`.
        unsafe { Mm::from_raw((*self.notifier.get()).mm) }
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
    /// It may sleep; do not call it with the mmap lock held.
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

    /// Takes the mirror's lock.
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
        let invalidation = Invalidation {
            // SAFETY: The mm core passes a valid range for the callback's
            // duration.
            range: unsafe { &*range },
        };

        let state = if invalidation.is_blockable() {
            this.state.lock()
        } else {
            match this.state.try_lock() {
                Some(state) => state,
                None => return false,
            }
        };
        // SAFETY: The notifier is inserted; its sequence is only written
        // under the lock held here.
        let before = unsafe { (*notifier).invalidate_seq };
        // SAFETY: Called from the invalidate callback of this notifier, with
        // the lock held that readers hold for `mmu_interval_read_retry`.
        unsafe { bindings::mmu_interval_set_seq(notifier, cur_seq) };
        let own = invalidation.is_migration_by(this.migration_owner());
        if own && invalidation.is_exclusive() {
            state
                .own_exclusive
                .set(Some((invalidation.start() >> PAGE_SHIFT, cur_seq)));
        }
        state.own_run.set(match state.own_run.get() {
            Some((first, last)) if own && last == before => Some((first, cur_seq)),
            _ if own => Some((before, cur_seq)),
            _ => None,
        });
        // Exactly the pages of `[start, end)`. (`lib/test_hmm.c` drops the
        // page at `end` too; that would drop a device page next to one that
        // a CPU fault migrates back, which nothing maps again.)
        if invalidation.end() > invalidation.start() {
            state.table.erase(
                invalidation.start() >> PAGE_SHIFT,
                (invalidation.end() - 1) >> PAGE_SHIFT,
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
    /// current unbroken run of own invalidations, or during it, and the run
    /// is still current: nothing but own invalidations came after `value`.
    /// The sequence only grows, so that is `value` lying between the run's
    /// ends.
    fn in_current_own_run(&self, value: c_ulong) -> bool {
        // SAFETY: As in `has_changed`: the sequence is only written under
        // the lock held here.
        let now = unsafe { (*self.mirror.as_raw()).invalidate_seq };
        match self.state.own_run.get() {
            Some((first, last)) => {
                last == now && value.wrapping_sub(first) <= last.wrapping_sub(first)
            }
            None => false,
        }
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
        let run_start = self.state.own_run.get().map(|(first, _)| first);
        let valid = self.state.own_exclusive.get().is_some_and(|(index, at)| {
            index == page.index() && run_start != Some(at) && self.in_current_own_run(at)
        });
        if !valid {
            return Ok(false);
        }
        self.state.table.store_exclusive(page.index(), page)?;
        Ok(true)
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
        self.state.table.store_page(index, page, access)
    }
}

impl Deref for MirrorGuard<'_> {
    type Target = DevicePageTable;

    fn deref(&self) -> &DevicePageTable {
        &self.state.table
    }
}
