// SPDX-License-Identifier: GPL-2.0

//! A file open on a dmirror device: the mirror of the opener's address
//! space, and the ioctls that read and write through it.
//!
//! # Loops
//!
//! Every loop here that faults, retries or walks a span must end, whatever
//! the kernel answers:
//!
//! - each round makes progress (the next window, the next page, pages the
//!   device can use), or the command ends with an errno: `EBUSY` when
//!   invalidations keep undoing the work for `RANGE_TIMEOUT_MS`, or what
//!   the fault answered;
//! - each round that may wait or repeat first checks for a fatal signal
//!   ([`check_fatal_signal`]) and ends with `EINTR`, so that a killed task
//!   leaves the ioctl. [`retry_until_valid`] and [`fault_window_unlockable`]
//!   check at the head of every attempt, so a loop whose every round goes
//!   through one of them needs no check of its own.
//!
//! A task that spins in the kernel with preemption on shows no splat: a
//! loop that breaks this rule is an unkillable hang that nothing reports.

use crate::{
    device::{copy_to_system, take_fail_alloc, Device},
    hmm::{
        self, Collected, Destination, DevicePage, DevicePageTable, ExclusivePage, HmmRange,
        Migration, Mirror, MmapReadGuard, Owner, PageKind, PoolAllocator, Request, Source,
        ValidPfn, FOLIO_PAGES, MAX_MIGRATE_PAGES, PMD_SHIFT, PUD_SHIFT,
    },
    uapi::*,
};
use core::{
    ops::Range,
    sync::atomic::{AtomicU64, Ordering},
};
use kernel::{
    alloc::{flags::__GFP_NOWARN, KVVec, VVec},
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    mm::{
        virt::{flags as vm_flags, VmaNew, VmaRef},
        MmWithUser,
    },
    page::{Page, PAGE_SHIFT, PAGE_SIZE},
    prelude::*,
    sync::aref::ARef,
    time::{Delta, Instant, Monotonic},
    uaccess::{UserPtr, UserSlice, UserSliceReader},
};
use pin_init::stack_try_pin_init;

/// Pages per `hmm_range_fault()` call, as in C.
const WINDOW_PAGES: usize = 32;
/// Pages per SNAPSHOT window. A snapshot faults nothing and stores one
/// byte per page: nearly all of its cost is per window (the mmap lock, the
/// page walk's setup, the mirror's lock, the copy out), so it takes twice
/// C's window. The stack holds the window's pfns, 512 bytes.
const SNAPSHOT_WINDOW_PAGES: usize = 64;
/// How long a fault or snapshot retries invalidated ranges before it gives
/// up with `EBUSY` (`HMM_RANGE_DEFAULT_TIMEOUT`).
const RANGE_TIMEOUT_MS: u32 = 1000;

/// A point in time after which a retry loop gives up, as C's
/// `time_after(jiffies, timeout)`.
#[derive(Clone, Copy)]
struct Deadline {
    start: Instant<Monotonic>,
    limit: Delta,
}

impl Deadline {
    /// `ms` milliseconds from now.
    fn after_ms(ms: u32) -> Self {
        Deadline {
            start: Instant::now(),
            limit: Delta::from_millis(ms.into()),
        }
    }

    /// Whether the deadline is behind us.
    fn has_passed(self) -> bool {
        self.start.elapsed() > self.limit
    }
}

/// The clock of a loop whose rounds may make no progress: it starts at the
/// first round without progress, so that long rounds that do progress (a
/// slow userfaultfd handler) do not count, and any progress stops it.
#[derive(Default)]
struct StallClock(Option<Deadline>);

impl StallClock {
    /// Records a round; `EBUSY` once rounds without progress have gone on
    /// for `RANGE_TIMEOUT_MS`.
    fn round(&mut self, progress: bool) -> Result {
        if progress {
            self.0 = None;
        } else if self
            .0
            .get_or_insert_with(|| Deadline::after_ms(RANGE_TIMEOUT_MS))
            .has_passed()
        {
            return Err(EBUSY);
        }
        Ok(())
    }
}

/// How the faults of a read may treat the mmap lock.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LockMode {
    /// Hold it across the fault, as `hmm_range_fault()` does.
    Held,
    /// Let the fault handler drop it (`hmm_range_fault_unlockable()`).
    Droppable,
}

/// What a command asks of the address range `[start, end)`.
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The span of `cmd`, checked as C does: `addr` page aligned and the
    /// range not empty and not wrapping.
    fn of(cmd: &HmmDmirrorCmd) -> Result<Self> {
        let start = cmd.addr as usize;
        // OVERFLOW: The shift drops high bits, as in C; the wrap check
        // below rejects what is left.
        let size = (cmd.npages << PAGE_SHIFT) as usize;
        let end = start.wrapping_add(size);
        if start % PAGE_SIZE != 0 || end <= start {
            return Err(EINVAL);
        }
        Ok(Self { start, end })
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn pages(&self) -> u64 {
        (self.len() >> PAGE_SHIFT) as u64
    }
}

/// Per open file: the mirror of the opener's address space (C's `struct
/// dmirror`).
#[pin_data]
pub(crate) struct DmirrorFile {
    device: Device,
    #[pin]
    mirror: Mirror,
    /// `HMM_DMIRROR_FLAGS`, consumed by migrations.
    flags: AtomicU64,
    /// Device memory allocations until the one that
    /// `HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH` fails, counting it; 0: none.
    fail_countdown: AtomicU64,
}

#[vtable]
impl MiscDevice for DmirrorFile {
    type Ptr = Pin<KBox<Self>>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<Pin<KBox<Self>>> {
        let device = Device::of(misc)?;
        let task = kernel::current!();
        let mm = task.mm().ok_or(EINVAL)?;
        KBox::try_pin_init(
            try_pin_init!(Self {
                device,
                mirror <- Mirror::new(mm, 0, usize::MAX & !(PAGE_SIZE - 1)),
                flags: AtomicU64::new(0),
                fail_countdown: AtomicU64::new(0),
            }),
            GFP_KERNEL,
        )
    }

    fn ioctl(me: Pin<&DmirrorFile>, _file: &File, command: u32, arg: usize) -> Result<isize> {
        let (mut reader, mut writer) =
            UserSlice::new(UserPtr::from_addr(arg), HMM_DMIRROR_CMD_SIZE).reader_writer();
        let mut bytes = [0u8; HMM_DMIRROR_CMD_SIZE];
        reader.read_slice(&mut bytes)?;
        let mut cmd = HmmDmirrorCmd::from_ne_bytes(bytes);

        let span = Span::of(&cmd)?;
        cmd.cpages = 0;
        cmd.faults = 0;

        match command {
            HMM_DMIRROR_READ => me.read(&mut cmd, &span, LockMode::Held)?,
            HMM_DMIRROR_READ_UNLOCKABLE => me.read(&mut cmd, &span, LockMode::Droppable)?,
            HMM_DMIRROR_WRITE => me.write(&mut cmd, &span)?,
            HMM_DMIRROR_SNAPSHOT => me.snapshot(&mut cmd, &span)?,
            HMM_DMIRROR_CHECK_EXCLUSIVE => me.check_exclusive(&span)?,
            HMM_DMIRROR_FLAGS => me.set_flags(cmd.npages),
            HMM_DMIRROR_MIGRATE_TO_DEV => me.migrate_to_device(&mut cmd, &span)?,
            HMM_DMIRROR_MIGRATE_TO_SYS => me.migrate_to_system(&mut cmd, &span)?,
            HMM_DMIRROR_RELEASE => me.device.pool()?.remove_chunks()?,
            HMM_DMIRROR_EXCLUSIVE => me.exclusive(&mut cmd, &span)?,
            _ => return Err(EINVAL),
        }

        writer.write_slice(&cmd.to_ne_bytes())?;
        Ok(0)
    }

    fn release(me: Pin<KBox<DmirrorFile>>, _file: &File) {
        // As C, a file closing migrates every page of its device back to
        // system memory.
        if let Ok(pool) = me.device.pool() {
            pool.evict();
        }
        drop(me);
    }

    fn mmap(_me: Pin<&DmirrorFile>, _file: &File, vma: &VmaNew) -> Result {
        // A zeroed page per page, as C does; the `mixedmap` test snapshots
        // such a mapping.
        let vma = vma.set_mixedmap();
        for addr in (vma.start()..vma.end()).step_by(PAGE_SIZE) {
            let page = Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?;
            vma.vm_insert_page(addr, &page)?;
        }
        Ok(())
    }
}

impl DmirrorFile {
    /// The mirrored address space, kept alive for a command.
    fn mm(&self) -> Result<ARef<MmWithUser>> {
        self.mirror.mm().mmget_not_zero().ok_or(EFAULT)
    }

    /// READ and READ_UNLOCKABLE: copy what the device sees at `span` to the
    /// user buffer, faulting in what it does not map yet.
    fn read(&self, cmd: &mut HmmDmirrorCmd, span: &Span, mode: LockMode) -> Result {
        let mut bounce = Bounce::new(span)?;
        cmd.faults = self.for_each_page(span, Request::Read, mode, |table, indices| {
            bounce.read_pages(table, indices)
        })?;
        copy_out(cmd, span, &bounce)
    }

    /// WRITE: copy the user buffer to `span` through the device, faulting
    /// pages in writable.
    fn write(&self, cmd: &mut HmmDmirrorCmd, span: &Span) -> Result {
        let mut bounce = Bounce::new(span)?;
        bounce
            .read_user(UserSlice::new(UserPtr::from_addr(cmd.ptr as usize), span.len()).reader())?;
        let (pages, _) = bounce.as_chunks::<PAGE_SIZE>();
        let first = span.start >> PAGE_SHIFT;
        let write = |table: &DevicePageTable, indices: Range<usize>| {
            let src = &pages[indices.start - first..];
            Ok(table.write_pages(indices, src))
        };
        cmd.faults = self.for_each_page(span, Request::Write, LockMode::Held, write)?;
        cmd.cpages = span.pages();
        Ok(())
    }

    /// Runs `access` on the pages of `span` in order, under the mirror's
    /// lock. `access` gets the indices left and returns how many it could
    /// use; the rest of the span is faulted in with `request` and it goes
    /// on from there. Returns the number of fault rounds, C's `faults`.
    ///
    /// A fault that stored the pages can still leave `access` without
    /// progress: an invalidation may erase them before it runs. That may
    /// repeat for at most `RANGE_TIMEOUT_MS` before the command ends with
    /// `EBUSY`.
    fn for_each_page(
        &self,
        span: &Span,
        request: Request,
        mode: LockMode,
        mut access: impl FnMut(&DevicePageTable, Range<usize>) -> Result<usize>,
    ) -> Result<u64> {
        let mut faults = 0;
        let end = span.end >> PAGE_SHIFT;
        let mut index = span.start >> PAGE_SHIFT;
        let mut stall = StallClock::default();
        loop {
            let used = access(&self.mirror.lock(), index..end)?;
            index += used;
            if index == end {
                return Ok(faults);
            }
            stall.round(used > 0 || faults == 0)?;
            self.fault(index << PAGE_SHIFT, span.end, request, mode)?;
            faults += 1;
        }
    }

    /// Faults `[start, end)` into the device page table, a window at a time.
    fn fault(&self, start: usize, end: usize, request: Request, mode: LockMode) -> Result {
        let mm = self.mm()?;
        let mut range =
            HmmRange::<WINDOW_PAGES>::new(&self.mirror, request, Some(self.device.owner()));
        let mut addr = start;
        while addr < end {
            let next = end.min(addr + WINDOW_PAGES * PAGE_SIZE);
            range.set_window(addr, next)?;
            match mode {
                LockMode::Held => fault_window(&mut range, &mm)?,
                LockMode::Droppable => fault_window_unlockable(&mut range, &mm)?,
            }
            addr = next;
        }
        Ok(())
    }

    /// SNAPSHOT: one `HMM_DMIRROR_PROT_*` byte per page of `span`, without
    /// faulting anything in.
    fn snapshot(&self, cmd: &mut HmmDmirrorCmd, span: &Span) -> Result {
        let mm = self.mirror.mm().mmget_not_zero().ok_or(EINVAL)?;
        let mut out =
            UserSlice::new(UserPtr::from_addr(cmd.ptr as usize), span.pages() as usize).writer();
        let owner = self.device.owner();
        let mut perms = [0u8; SNAPSHOT_WINDOW_PAGES];
        // A notifier of its own, as C's: a snapshot does not touch the
        // device page table. C inserts one per window; one over the whole
        // span costs one insertion, and an invalidation elsewhere in the
        // span only retries the window at hand.
        stack_try_pin_init!(let watch =? Mirror::new(&mm, span.start, span.end - span.start));
        let mut range =
            HmmRange::<SNAPSHOT_WINDOW_PAGES>::new(&watch, Request::Snapshot, Some(owner));
        let mut addr = span.start;
        while addr < span.end {
            let next = span.end.min(addr + SNAPSHOT_WINDOW_PAGES * PAGE_SIZE);
            let n = (next - addr) >> PAGE_SHIFT;
            range.set_window(addr, next)?;
            retry_until_valid(&mut range, &mm, |range| {
                let Some(locked) = range.lock_if_valid() else {
                    return Ok(false);
                };
                // The pages of a huge mapping share their byte: decode it once.
                let mut last = None;
                for (perm, pfn) in perms.iter_mut().zip(locked.pfns()) {
                    *perm = match last {
                        Some((ref prev, byte)) if pfn.same_huge_mapping(prev) => byte,
                        _ => prot_byte(&pfn, owner),
                    };
                    last = Some((pfn, *perm));
                }
                Ok(true)
            })?;
            out.write_slice(&perms[..n])?;
            cmd.cpages += n as u64;
            addr = next;
        }
        Ok(())
    }

    /// MIGRATE_TO_DEV: migrates the anonymous pages of `span` to device
    /// memory, a window of at most `MAX_MIGRATE_PAGES` at a time, maps
    /// them in the device page table, then copies what the device sees to
    /// the user buffer. A page that did not migrate is not in the table,
    /// which fails the read with `ENOENT`, as in C.
    fn migrate_to_device(&self, cmd: &mut HmmDmirrorCmd, span: &Span) -> Result {
        let pool = self.device.pool()?;
        let mm = self.mirror.mm().mmget_not_zero().ok_or(EINVAL)?;
        let mut mapped = true;
        {
            let lock = MmapReadGuard::lock(&mm);
            let mut addr = span.start;
            while addr < span.end {
                check_fatal_signal()?;
                let (vma, next) = migration_step(&lock, addr, span.end)?;
                let mut migration =
                    Migration::to_device(&lock, vma, addr, next, true, &self.mirror)?;
                let mut allocator = pool.allocator()?;
                for index in 0..migration.len() {
                    self.copy_to_device(&mut allocator, &mut migration, index)?;
                }
                drop(allocator);
                let migrated = migration.pages();
                mapped &= migrated.map_into(&self.mirror.lock())?;
                migrated.finalize();
                addr = next;
            }
        }
        if !mapped {
            // Something else changed the address space meanwhile: look the
            // device pages up instead.
            self.map_device_pages(&mm, span)?;
        }
        match self.read_mapped(cmd, span) {
            // Pages already on the device before this migration are not
            // mapped by it; the device may have dropped them since.
            Err(e) if e == ENOENT && mapped => {
                self.map_device_pages(&mm, span)?;
                self.read_mapped(cmd, span)
            }
            result => result,
        }
    }

    /// Copies what the device maps at `span` to the user buffer, without
    /// faulting: `ENOENT` if a page is not mapped (C's `dmirror_do_read`
    /// after a migration).
    fn read_mapped(&self, cmd: &mut HmmDmirrorCmd, span: &Span) -> Result {
        let mut bounce = Bounce::new(span)?;
        let indices = (span.start >> PAGE_SHIFT)..(span.end >> PAGE_SHIFT);
        let pages = indices.len();
        if bounce.read_pages(&self.mirror.lock(), indices)? != pages {
            return Err(ENOENT);
        }
        copy_out(cmd, span, &bounce)
    }

    /// EXCLUSIVE: takes exclusive (atomic) access to the pages of `span`,
    /// mapping each with the `Atomic` tag, then copies them to the user
    /// buffer (C's `dmirror_exclusive`).
    fn exclusive(&self, cmd: &mut HmmDmirrorCmd, span: &Span) -> Result {
        let mm = self.mirror.mm().mmget_not_zero().ok_or(EINVAL)?;
        for addr in (span.start..span.end).step_by(PAGE_SIZE) {
            // Invalidations by others between making the page exclusive
            // and mapping it retry the page for at most RANGE_TIMEOUT_MS,
            // as a fault would.
            let deadline = Deadline::after_ms(RANGE_TIMEOUT_MS);
            loop {
                check_fatal_signal()?;
                if deadline.has_passed() {
                    return Err(EBUSY);
                }
                let lock = MmapReadGuard::lock_killable(&mm)?;
                let page = ExclusivePage::make(&lock, &self.mirror, addr)?;
                if self.mirror.lock().store_exclusive(&page)? {
                    break;
                }
            }
        }
        self.read_mapped(cmd, span)
    }

    /// FLAGS: C's flags, plus this module's `FLAG_FAIL_ALLOC_NTH`.
    fn set_flags(&self, flags: u64) {
        let nth = match flags & HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH {
            0 => 0,
            _ => hmm_dmirror_fail_alloc_nth_of(flags),
        };
        self.fail_countdown.store(nth, Ordering::Relaxed);
        self.flags.store(flags, Ordering::Relaxed);
    }

    /// Counts one device memory allocation: whether
    /// `FLAG_FAIL_ALLOC_NTH` makes it fail.
    fn nth_alloc_fails(&self) -> bool {
        self.fail_countdown
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            == Ok(1)
    }

    /// A device page, or a large folio with `large`, unless an injected
    /// failure says no.
    fn alloc_device(&self, allocator: &mut PoolAllocator<'_>, large: bool) -> Result<DevicePage> {
        if self.nth_alloc_fails() {
            return Err(ENOMEM);
        }
        match large {
            true => allocator.alloc_folio(),
            false => allocator.alloc_page(),
        }
    }

    /// Gives the page (or large folio, or hole) at `index` of `migration`
    /// device memory with its data (C's `dmirror_migrate_alloc_and_copy`):
    /// a large device folio for a large one, small pages when there is
    /// none, which splits the source. A page that gets no device memory
    /// stays where it is; `FLAG_FAIL_ALLOC` fails the next allocation.
    fn copy_to_device(
        &self,
        allocator: &mut PoolAllocator<'_>,
        migration: &mut Collected<'_>,
        index: usize,
    ) -> Result {
        let writable = migration.is_writable(index);
        let compound = migration.is_compound(index);
        let src = match migration.source(index) {
            Source::Empty => None,
            Source::System(page) => Some(page),
            _ => return Ok(()),
        };
        let failed = take_fail_alloc(&self.flags);
        let first = match failed {
            true => None,
            false => self.alloc_device(allocator, compound).ok(),
        };
        let pages = match first {
            // The common case, without a vector: `src` borrows `migration`
            // only until the copy.
            Some(mut page) => {
                page.copy_from_system(src.as_ref());
                return migration.set_destination(index, Destination::Device(page), writable);
            }
            None if !compound => return Ok(()),
            None => {
                let nr = FOLIO_PAGES.min(migration.len() - index);
                let mut pages = KVec::with_capacity(nr, GFP_KERNEL)?;
                for i in 0..nr {
                    let Ok(mut page) = self.alloc_device(allocator, false) else {
                        break;
                    };
                    page.copy_from_system_at(src.as_ref(), i);
                    pages.push(page, GFP_KERNEL)?;
                }
                pages
            }
        };
        for (i, page) in pages.into_iter().enumerate() {
            migration.set_destination(index + i, Destination::Device(page), writable)?;
        }
        Ok(())
    }

    /// Maps the pages of `span` that are in this device's memory into the
    /// device page table, without faulting anything.
    fn map_device_pages(&self, mm: &MmWithUser, span: &Span) -> Result {
        let owner = self.device.owner();
        let mut range = HmmRange::<WINDOW_PAGES>::new(&self.mirror, Request::Snapshot, Some(owner));
        let mut addr = span.start;
        while addr < span.end {
            let next = span.end.min(addr + WINDOW_PAGES * PAGE_SIZE);
            range.set_window(addr, next)?;
            retry_until_valid(&mut range, mm, |range| {
                let Some(locked) = range.lock_if_valid() else {
                    return Ok(false);
                };
                for pfn in locked.pfns() {
                    match pfn.page_kind() {
                        Some(
                            PageKind::DevicePrivate(Some(o)) | PageKind::DeviceCoherent(Some(o)),
                        ) if o == owner => locked.map(&pfn)?,
                        _ => {}
                    }
                }
                Ok(true)
            })?;
            addr = next;
        }
        Ok(())
    }

    /// MIGRATE_TO_SYS: migrates this device's pages in `span` back to
    /// system memory. `cpages` counts the pages that moved.
    fn migrate_to_system(&self, cmd: &mut HmmDmirrorCmd, span: &Span) -> Result {
        let mm = self.mirror.mm().mmget_not_zero().ok_or(EINVAL)?;
        let lock = MmapReadGuard::lock(&mm);
        let mut addr = span.start;
        while addr < span.end {
            check_fatal_signal()?;
            let (vma, next) = migration_step(&lock, addr, span.end)?;
            let mut migration =
                Migration::to_system(&lock, vma, addr, next, true, self.device.owner())?;
            copy_to_system(&mut migration, Some(&self.flags))?;
            let migrated = migration.pages();
            cmd.cpages += migrated.moved_present() as u64;
            migrated.finalize();
            addr = next;
        }
        Ok(())
    }

    /// CHECK_EXCLUSIVE: `EPERM` while the device still has exclusive access
    /// to a page of `span`.
    fn check_exclusive(&self, span: &Span) -> Result {
        let table = self.mirror.lock();
        if table.any_exclusive(span.start >> PAGE_SHIFT, (span.end >> PAGE_SHIFT) - 1) {
            return Err(EPERM);
        }
        Ok(())
    }
}

/// The kernel copy of the user buffer of a command over a span (C's
/// bounce buffer). Its size comes from user space: a failure is `ENOMEM`,
/// without the allocator's warning. A small one comes from `kvmalloc()`,
/// which needs no mapping to set up and to flush when freed, as C's
/// `vmalloc()` does; a larger one from `vmalloc()`, as a physically
/// contiguous try of that size can stall in compaction.
enum Bounce {
    Small(KVVec<u8>),
    Large(VVec<u8>),
}

/// The largest bounce buffer that [`Bounce`] tries with `kvmalloc()`.
const SMALL_BOUNCE: usize = 16 * PAGE_SIZE;

impl Bounce {
    /// An empty buffer with room for `span`.
    fn new(span: &Span) -> Result<Self> {
        let flags = GFP_KERNEL | __GFP_NOWARN;
        Ok(if span.len() <= SMALL_BOUNCE {
            Self::Small(KVVec::with_capacity(span.len(), flags)?)
        } else {
            Self::Large(VVec::with_capacity(span.len(), flags)?)
        })
    }

    /// [`DevicePageTable::read_pages`] into this buffer.
    fn read_pages(&mut self, table: &DevicePageTable, indices: Range<usize>) -> Result<usize> {
        match self {
            Self::Small(buf) => table.read_pages(indices, buf),
            Self::Large(buf) => table.read_pages(indices, buf),
        }
    }

    /// Appends what `reader` has, all of it.
    fn read_user(&mut self, reader: UserSliceReader) -> Result {
        match self {
            Self::Small(buf) => reader.read_all(buf, GFP_KERNEL),
            Self::Large(buf) => reader.read_all(buf, GFP_KERNEL),
        }
    }
}

impl core::ops::Deref for Bounce {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Small(buf) => buf,
            Self::Large(buf) => buf,
        }
    }
}

/// Copies `bounce`, the device's view of `span`, to the user buffer, and
/// counts the pages.
fn copy_out(cmd: &mut HmmDmirrorCmd, span: &Span, bounce: &[u8]) -> Result {
    UserSlice::new(UserPtr::from_addr(cmd.ptr as usize), span.len())
        .writer()
        .write_slice(bounce)?;
    cmd.cpages = span.pages();
    Ok(())
}

/// The readable VMA at `addr` (`EINVAL` if there is none, as in C) and
/// where this migration step ends: after at most `MAX_MIGRATE_PAGES`, at
/// the end of the VMA or at `end`.
fn migration_step<'a>(
    lock: &'a MmapReadGuard<'_>,
    addr: usize,
    end: usize,
) -> Result<(&'a VmaRef, usize)> {
    let vma = lock
        .vma_lookup(addr)
        .filter(|vma| vma.flags() & vm_flags::READ != 0)
        .ok_or(EINVAL)?;
    let next = end.min(addr + MAX_MIGRATE_PAGES * PAGE_SIZE).min(vma.end());
    Ok((vma, next))
}

/// Faults one window into the device page table with the mmap lock held.
/// Invalidated attempts retry for at most `RANGE_TIMEOUT_MS`, as in C.
fn fault_window(range: &mut HmmRange<'_, WINDOW_PAGES>, mm: &MmWithUser) -> Result {
    retry_until_valid(range, mm, store_window)
}

/// Runs attempts of `range` until `finish` accepts one: begin, fault with
/// the mmap lock held, unlock, then `finish` (which returns `false` when an
/// invalidation made the attempt stale). Gives up with `EBUSY` after
/// `RANGE_TIMEOUT_MS`.
fn retry_until_valid<const N: usize>(
    range: &mut HmmRange<'_, N>,
    mm: &MmWithUser,
    mut finish: impl FnMut(&HmmRange<'_, N>) -> Result<bool>,
) -> Result {
    let deadline = Deadline::after_ms(RANGE_TIMEOUT_MS);
    loop {
        if deadline.has_passed() {
            return Err(EBUSY);
        }
        check_fatal_signal()?;
        let lock = range.begin(mm)?;
        let faulted = range.fault(&lock);
        drop(lock);
        match faulted {
            Err(e) if e == EBUSY => continue,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        if finish(range)? {
            return Ok(());
        }
    }
}

/// Faults one window with `hmm_range_fault_unlockable()`, so that a fault
/// handler (userfaultfd) may drop the mmap lock. When it does, and nothing
/// was invalidated meanwhile, the attempt resumes at the page that dropped
/// the lock instead of walking the window again; any invalidation starts a
/// new attempt with a new sequence.
///
/// As C's `READ_UNLOCKED` (`hmm_range_fault_unlocked_timeout()`, patch
/// 0009), the clock runs only while rounds resume no further into the
/// window than before: a slow handler takes as long as it takes, one that
/// keeps dropping the lock without resolving the fault (a userfaultfd
/// handler that only wakes) ends the command with `EBUSY` after
/// `RANGE_TIMEOUT_MS`. A fatal signal ends it with `EINTR`.
fn fault_window_unlockable(range: &mut HmmRange<'_, WINDOW_PAGES>, mm: &MmWithUser) -> Result {
    let mut resumed = None;
    let mut furthest = 0;
    let mut stall = StallClock::default();
    loop {
        check_fatal_signal()?;
        let lock = match resumed.take() {
            Some(lock) => lock,
            None => range.begin(mm)?,
        };
        let (faulted, lock) = range.fault_unlockable(lock);
        let dropped = lock.is_none();
        drop(lock);
        match faulted {
            Err(e) if e == EBUSY && dropped => resumed = range.resume(mm).transpose()?,
            Err(e) if e == EBUSY => {}
            Err(e) => return Err(e),
            Ok(()) => {
                if store_window(range)? {
                    return Ok(());
                }
            }
        }
        let progress = resumed.is_some() && range.resumed_at() > furthest;
        if progress {
            furthest = range.resumed_at();
        }
        stall.round(progress)?;
    }
}

/// `EINTR` if a fatal signal is pending: the check at the head of every
/// round of a loop that may wait or repeat (see [the rule](self#loops)).
fn check_fatal_signal() -> Result {
    if hmm::fatal_signal_pending() {
        return Err(EINTR);
    }
    Ok(())
}

/// Stores a faulted window in the device page table, unless an
/// invalidation made it stale (then returns `false`).
fn store_window(range: &HmmRange<'_, WINDOW_PAGES>) -> Result<bool> {
    let Some(locked) = range.lock_if_valid() else {
        return Ok(false);
    };
    for pfn in locked.pfns() {
        locked.map(&pfn)?;
    }
    Ok(true)
}

/// The SNAPSHOT byte for one page (C's `dmirror_mkentry`).
fn prot_byte(pfn: &ValidPfn<'_>, owner: Owner) -> u8 {
    if pfn.is_error() {
        return HMM_DMIRROR_PROT_ERROR;
    }
    let Some(kind) = pfn.page_kind() else {
        return HMM_DMIRROR_PROT_NONE;
    };
    let mut perm = match kind {
        PageKind::DevicePrivate(Some(o)) if o == owner => HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
        PageKind::DevicePrivate(_) => HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE,
        PageKind::DeviceCoherent(Some(o)) if o == owner => HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
        PageKind::DeviceCoherent(_) => HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
        PageKind::Zero => HMM_DMIRROR_PROT_ZERO,
        PageKind::System => HMM_DMIRROR_PROT_NONE,
    };
    perm |= if pfn.is_writable() {
        HMM_DMIRROR_PROT_WRITE
    } else {
        HMM_DMIRROR_PROT_READ
    };
    match pfn.map_shift() {
        PMD_SHIFT => perm | HMM_DMIRROR_PROT_PMD,
        PUD_SHIFT => perm | HMM_DMIRROR_PROT_PUD,
        _ => perm,
    }
}
