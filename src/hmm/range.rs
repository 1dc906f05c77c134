// SPDX-License-Identifier: GPL-2.0

//! `hmm_range_fault()` over a window of a [`Mirror`].

use super::{mirror::Seq, DevicePageTable, Mirror, MirrorGuard, MmapReadGuard, Owner};
use core::ptr::NonNull;
use kernel::{
    bindings,
    error::to_result,
    ffi::{c_int, c_ulong},
    mm::MmWithUser,
    page::{PAGE_SHIFT, PAGE_SIZE},
    prelude::*, //
};

/// What a fault asks of every page of the range (`default_flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Fault nothing: report the CPU page tables as they are.
    Snapshot,
    /// Fault pages in readable.
    Read,
    /// Fault pages in writable.
    Write,
}

impl Request {
    fn default_flags(self) -> c_ulong {
        match self {
            Request::Snapshot => 0,
            Request::Read => bindings::hmm_pfn_flags_HMM_PFN_REQ_FAULT,
            Request::Write => {
                bindings::hmm_pfn_flags_HMM_PFN_REQ_FAULT
                    | bindings::hmm_pfn_flags_HMM_PFN_REQ_WRITE
            }
        }
    }
}

/// The most pages an [`HmmRange`] window may have: 2 KiB of entries.
pub const MAX_WINDOW_PAGES: usize = 128;

/// A window of at most `N` pages of a [`Mirror`]'s address space, with the
/// `hmm_range_fault()` output for it.
///
/// One attempt goes [`begin`](Self::begin) (new notifier sequence, then the
/// mmap read lock), [`fault`](Self::fault) or
/// [`fault_unlockable`](Self::fault_unlockable), drop the mmap lock, then
/// [`lock_if_valid`](Self::lock_if_valid); any `EBUSY` or `None` on the way
/// means: start a new attempt.
///
/// The entries live inline, two words per page: `N` is at most
/// [`MAX_WINDOW_PAGES`], so that a range fits on the kernel stack.
pub struct HmmRange<'m, const N: usize> {
    mirror: &'m Mirror,
    start: usize,
    end: usize,
    request: Request,
    owner: Option<Owner>,
    seq: Option<Seq>,
    /// The sequence under which a fault filled every entry of the window
    /// and succeeded; `None` while the entries may be stale, partly
    /// written or still hold the per-page requests.
    filled: Option<Seq>,
    pfns: [c_ulong; N],
    /// Per-page requests on top of `request`, if any (`pfn_flags_mask`).
    page_requests: Option<[c_ulong; N]>,
    /// Pages at the front of the window already faulted under `seq`: an
    /// attempt resumed after a lock drop starts after them.
    done: usize,
    /// The sequence of the last fault, if it dropped the mmap lock: the
    /// entries it wrote before the drop are that fault's output, which
    /// [`resume`](Self::resume) keeps. Cleared by anything that starts
    /// another fault or attempt: only right after the drop do the entries
    /// say where it stopped.
    dropped: Option<Seq>,
}

impl<'m, const N: usize> HmmRange<'m, N> {
    /// A range over `mirror` that asks `request` of every page. Device
    /// private pages of `owner` are reported as they are rather than
    /// faulted back to system memory.
    pub fn new(mirror: &'m Mirror, request: Request, owner: Option<Owner>) -> Self {
        const { assert!(N > 0 && N <= MAX_WINDOW_PAGES) };
        Self {
            mirror,
            start: 0,
            end: 0,
            request,
            owner,
            seq: None,
            filled: None,
            pfns: [0; N],
            page_requests: None,
            done: 0,
            dropped: None,
        }
    }

    /// Moves the window to `[start, end)`: page aligned, not empty, at most
    /// `N` pages, inside the mirror's interval (invalidations outside it
    /// would not reach the mirror).
    pub fn set_window(&mut self, start: usize, end: usize) -> Result {
        if start % PAGE_SIZE != 0
            || end % PAGE_SIZE != 0
            || start >= end
            || (end - start) / PAGE_SIZE > N
            || !self.mirror.covers(start, end)
        {
            return Err(EINVAL);
        }
        self.start = start;
        self.end = end;
        self.seq = None;
        self.filled = None;
        self.page_requests = None;
        self.done = 0;
        self.dropped = None;
        Ok(())
    }

    /// Asks `request` of the page at `addr` in addition to what the range
    /// asks of every page, until the window moves.
    pub fn request_page(&mut self, addr: usize, request: Request) -> Result {
        if addr < self.start || addr >= self.end {
            return Err(EINVAL);
        }
        let requests = self.page_requests.get_or_insert([0; N]);
        requests[(addr - self.start) >> PAGE_SHIFT] = request.default_flags();
        Ok(())
    }

    /// Start of the window.
    pub fn start(&self) -> usize {
        self.start
    }

    /// End (exclusive) of the window.
    pub fn end(&self) -> usize {
        self.end
    }

    /// Starts an attempt: takes a new notifier sequence, then the mmap read
    /// lock of `mm`, which must be the mirrored address space. Fails with
    /// `EINTR` if a fatal signal arrives while waiting for the lock.
    pub fn begin<'a>(&mut self, mm: &'a MmWithUser) -> Result<MmapReadGuard<'a>> {
        if !self.mirror.mirrors(mm) {
            return Err(EINVAL);
        }
        // Before the mmap lock: `read_begin` may wait for invalidations.
        self.seq = Some(self.mirror.read_begin());
        self.filled = None;
        self.done = 0;
        self.dropped = None;
        MmapReadGuard::lock_killable(mm)
    }

    /// Continues an attempt whose last fault dropped the mmap lock: unless
    /// an invalidation hit the mirror since [`begin`](Self::begin), takes
    /// the lock again and keeps the sequence and the pages faulted so far,
    /// so that the next [`fault_unlockable`](Self::fault_unlockable) starts
    /// at the page that dropped the lock. Returns `None` when the attempt
    /// must start over with `begin`, and whenever the last thing done with
    /// the range was not a fault that dropped the lock: entries left by an
    /// earlier attempt or window are not this sequence's output.
    ///
    /// The pages kept are checked with the rest by
    /// [`lock_if_valid`](Self::lock_if_valid), against the same sequence.
    pub fn resume<'a>(&mut self, mm: &'a MmWithUser) -> Option<Result<MmapReadGuard<'a>>> {
        let seq = self.seq?;
        if self.dropped != Some(seq) {
            return None;
        }
        // Only a faulting request leaves every output entry valid, which is
        // how the first unfaulted page is found; per-page requests reuse the
        // same bits as input.
        if self.request == Request::Snapshot || self.page_requests.is_some() {
            return None;
        }
        if !self.mirror.mirrors(mm) || self.mirror.check_retry(seq) {
            return None;
        }
        let count = (self.end - self.start) >> PAGE_SHIFT;
        self.done = self.pfns[..count]
            .iter()
            .position(|&pfn| pfn & bindings::hmm_pfn_flags_HMM_PFN_VALID == 0)
            .unwrap_or(count);
        if self.done == count {
            return None;
        }
        Some(MmapReadGuard::lock_killable(mm))
    }

    /// Pages at the front of the window that the attempt has faulted
    /// already: where [`resume`](Self::resume) made the next fault start.
    pub fn resumed_at(&self) -> usize {
        self.done
    }

    fn raw(&mut self, lock: &MmapReadGuard<'_>) -> Result<bindings::hmm_range> {
        let seq = self.seq.ok_or(EINVAL)?;
        // The entries are about to be rewritten, maybe in part.
        self.filled = None;
        self.dropped = None;
        if self.start + self.done * PAGE_SIZE >= self.end || !self.mirror.mirrors(lock.mm()) {
            return Err(EINVAL);
        }
        let done = self.done;
        // Outputs of an earlier attempt reuse the request bits; start the
        // pages still to fault clean. Those left untouched by a fault that
        // drops the lock keep no VALID bit, which `resume` relies on.
        let pfn_flags_mask = match &self.page_requests {
            Some(requests) => {
                self.pfns[done..].copy_from_slice(&requests[done..]);
                Request::Write.default_flags()
            }
            None => {
                self.pfns[done..].fill(0);
                0
            }
        };
        Ok(bindings::hmm_range {
            notifier: self.mirror.as_raw(),
            notifier_seq: seq.value,
            start: (self.start + done * PAGE_SIZE) as c_ulong,
            end: self.end as c_ulong,
            hmm_pfns: self.pfns[done..].as_mut_ptr(),
            default_flags: self.request.default_flags(),
            pfn_flags_mask,
            dev_private_owner: self.owner.map_or(core::ptr::null_mut(), Owner::as_ptr),
        })
    }

    /// `hmm_range_fault()`: fills the window's pfns, faulting pages in as
    /// the request asks. `EBUSY` means the attempt must start over. A fault
    /// may invalidate: not with the mirror's lock held.
    pub fn fault(&mut self, lock: &MmapReadGuard<'_>) -> Result {
        let mut range = self.raw(lock)?;
        // SAFETY: `range` points at this window's pfns (room for its pages),
        // `self.mirror`'s live notifier and the sequence `begin` took. The
        // mmap read lock of the notifier's mm is held, as `raw` checked.
        to_result(unsafe { bindings::hmm_range_fault(&mut range) })?;
        self.check_write_granted()?;
        self.filled = self.seq;
        Ok(())
    }

    /// `hmm_range_fault_unlockable()`: like [`fault`](Self::fault), but the
    /// fault handler may drop the mmap lock (userfaultfd does, to wait for
    /// its handler). The lock is moved in and given back only if it is
    /// still held:
    ///
    /// | result   | lock returned | meaning                                  |
    /// |----------|---------------|------------------------------------------|
    /// | `Ok`     | yes           | done                                     |
    /// | `EBUSY`  | yes           | range invalidated: start over            |
    /// | `EBUSY`  | no            | a fault dropped the lock: start over     |
    /// | `EINTR`  | no            | a fatal signal is pending                |
    /// | other    | yes           | failed, as [`fault`](Self::fault) would  |
    pub fn fault_unlockable<'a>(
        &mut self,
        lock: MmapReadGuard<'a>,
    ) -> (Result, Option<MmapReadGuard<'a>>) {
        let mut range = match self.raw(&lock) {
            Ok(range) => range,
            Err(e) => return (Err(e), Some(lock)),
        };
        let mut locked: c_int = 1;
        // SAFETY: As in `fault`; `locked` is 1 because the lock is held.
        let ret = unsafe { bindings::hmm_range_fault_unlockable(&mut range, &mut locked) };
        if locked != 0 {
            let result = to_result(ret).and_then(|()| self.check_write_granted());
            if result.is_ok() {
                // The pages before `done` were filled under the same
                // sequence, by the attempt this one resumed.
                self.filled = self.seq;
            }
            (result, Some(lock))
        } else {
            // The fault handler released the lock; it must not be released twice.
            lock.forget_released();
            // The entries up to the page that dropped it are this fault's
            // output, under `seq`: `resume` may keep them.
            self.dropped = self.seq;
            (to_result(ret), None)
        }
    }

    /// Fails with `EPERM` if a page asked for writable came back without
    /// `HMM_PFN_WRITE`.
    ///
    /// `include/linux/hmm.h` promises that it cannot: with
    /// `HMM_PFN_REQ_WRITE` the output has `HMM_PFN_WRITE` or
    /// `hmm_range_fault()` fails. Plain 7.3 broke the promise for
    /// device-private pages of the range's own owner, which it reported as
    /// the CPU maps them, read-only included, without faulting (fixed by
    /// patch 0004). A caller that stored such a page and faulted again
    /// when it could not write it would fault the same entry for ever, so
    /// the range keeps the promise itself. `EPERM` is what the kernel
    /// answers for a write to memory the CPU maps read-only.
    fn check_write_granted(&self) -> Result {
        let write = bindings::hmm_pfn_flags_HMM_PFN_REQ_WRITE;
        let default = self.request.default_flags() & write;
        if default == 0 && self.page_requests.is_none() {
            return Ok(());
        }
        let count = (self.end - self.start) >> PAGE_SHIFT;
        for (i, &raw) in self.pfns[..count].iter().enumerate() {
            let asked = default | self.page_requests.as_ref().map_or(0, |r| r[i] & write);
            // `HMM_PFN_REQ_WRITE` is the bit `HMM_PFN_WRITE` reports.
            if asked != 0
                && raw & bindings::hmm_pfn_flags_HMM_PFN_VALID != 0
                && raw & bindings::hmm_pfn_flags_HMM_PFN_WRITE == 0
            {
                return Err(EPERM);
            }
        }
        Ok(())
    }

    /// Takes the mirror's lock and returns the result of the attempt with
    /// it, unless an invalidation hit the mirror since [`begin`](Self::begin),
    /// or no fault of this attempt succeeded over the whole window.
    pub fn lock_if_valid(&self) -> Option<LockedRange<'_, 'm, N>> {
        let seq = self.filled?;
        let guard = self.mirror.lock();
        if guard.has_changed(seq) {
            return None;
        }
        // INVARIANT: A fault filled every entry of the window under `seq`
        // and the mirror, whose interval holds the window, saw no
        // invalidation since; its lock, held by `guard`, keeps one from
        // completing until the `LockedRange` is dropped.
        Some(LockedRange { range: self, guard })
    }
}

/// The output of a successful attempt, with the mirror's lock that keeps
/// it valid.
///
/// # Invariants
///
/// Every entry of `range`'s window was written by a fault that succeeded
/// under a sequence that `guard`'s mirror has not invalidated, and the
/// window lies inside the mirror's interval.
pub struct LockedRange<'r, 'm, const N: usize> {
    range: &'r HmmRange<'m, N>,
    guard: MirrorGuard<'m>,
}

impl<const N: usize> LockedRange<'_, '_, N> {
    /// The mirror's device page table, to read.
    pub fn table(&self) -> &DevicePageTable {
        &self.guard
    }

    /// The window's pages, in address order.
    pub fn pfns(&self) -> impl Iterator<Item = ValidPfn<'_>> + '_ {
        let first = self.range.start >> PAGE_SHIFT;
        let count = (self.range.end - self.range.start) >> PAGE_SHIFT;
        let mirror = self.guard.mirror();
        self.range.pfns[..count]
            .iter()
            .enumerate()
            .map(move |(i, &raw)| {
                // INVARIANT: By the type invariant, `raw` is an output entry
                // for the page at `first + i` that no invalidation of
                // `mirror` has touched, and `mirror`'s lock is held while
                // `self` is borrowed for `'_`: a VALID one names a page the
                // CPU maps there, so one still allocated. (Plain 7.3 named
                // the wrong page of a device-private PMD for a window that
                // starts inside it; patches/0008 fixes the kernel.)
                ValidPfn {
                    raw,
                    index: first + i,
                    mirror,
                }
            })
    }

    /// Maps the page of `pfn`, one of [`Self::pfns`], in the mirror's
    /// device page table at its own address, writable if the CPU maps it
    /// so. Fails with `EFAULT` if `pfn` has no page, and with `EINVAL` if
    /// it is another mirror's.
    ///
    /// This is the only way into the table for a faulted page: the entry
    /// sits where the CPU maps the page, in the table of the mirror whose
    /// notifier will erase it before the CPU unmaps the page.
    pub fn map(&self, pfn: &ValidPfn<'_>) -> Result {
        // Two `LockedRange`s of one mirror cannot coexist (each holds its
        // lock), so a `ValidPfn` of this mirror is one of `self`'s, which
        // `store_valid` checks.
        self.guard.store_valid(pfn)
    }
}

/// `hmm_pfn_to_map_order()` of the output entry `raw`, decoded here: this
/// runs once per page.
fn map_order(raw: c_ulong) -> u32 {
    ((raw >> bindings::hmm_pfn_flags_HMM_PFN_ORDER_SHIFT) & 0x1f) as u32
}

/// What kind of page a valid pfn refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// Ordinary system memory.
    System,
    /// The shared zero page.
    Zero,
    /// A device-private page; the owner of its pagemap.
    DevicePrivate(Option<Owner>),
    /// A device-coherent page; the owner of its pagemap.
    DeviceCoherent(Option<Owner>),
}

/// One `hmm_range_fault()` output entry of a [`LockedRange`], readable
/// while the mirror's lock that made it valid is held.
///
/// # Invariants
///
/// - `raw` is the output entry for the page at `index` (virtual address >>
///   `PAGE_SHIFT`) of `mirror`'s interval.
/// - If `raw` has `HMM_PFN_VALID`, it names the page the CPU maps there,
///   which stays allocated and mapped for `'a`: `mirror`'s lock is held
///   and no invalidation of `mirror` has run since the range was faulted.
pub struct ValidPfn<'a> {
    raw: c_ulong,
    index: usize,
    mirror: &'a Mirror,
}

impl ValidPfn<'_> {
    /// The mirror whose lock keeps this entry valid.
    pub(super) fn mirror(&self) -> &Mirror {
        self.mirror
    }

    /// The page's virtual page number (address >> `PAGE_SHIFT`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether a page is present (`HMM_PFN_VALID`).
    pub fn is_valid(&self) -> bool {
        self.raw & bindings::hmm_pfn_flags_HMM_PFN_VALID != 0
    }

    /// Whether the page is writable (`HMM_PFN_WRITE`).
    pub fn is_writable(&self) -> bool {
        self.raw & bindings::hmm_pfn_flags_HMM_PFN_WRITE != 0
    }

    /// Whether the address cannot be mirrored (`HMM_PFN_ERROR`).
    pub fn is_error(&self) -> bool {
        self.raw & bindings::hmm_pfn_flags_HMM_PFN_ERROR != 0
    }

    /// log2 of the size of the CPU mapping of the page: `PAGE_SHIFT`, or
    /// `PMD_SHIFT`/`PUD_SHIFT` for huge mappings.
    pub fn map_shift(&self) -> u32 {
        self.map_order() + PAGE_SHIFT as u32
    }

    fn map_order(&self) -> u32 {
        map_order(self.raw)
    }

    /// Whether `self` and `other` are pages of one huge mapping: then they
    /// differ in their pfn only, and their pages are of one folio, of one
    /// [`PageKind`].
    pub fn same_huge_mapping(&self, other: &ValidPfn<'_>) -> bool {
        let order = self.map_order();
        let diff = self.raw ^ other.raw;
        order > 0
            && self.is_valid()
            && diff & bindings::hmm_pfn_flags_HMM_PFN_FLAGS == 0
            && (diff & !bindings::hmm_pfn_flags_HMM_PFN_FLAGS) >> order == 0
    }

    pub(super) fn page_ptr(&self) -> Option<NonNull<bindings::page>> {
        if !self.is_valid() || self.is_error() {
            return None;
        }
        // SAFETY: The pfn is valid, so it names a page with a memmap entry.
        NonNull::new(unsafe { bindings::hmm_pfn_to_page(self.raw) })
    }

    /// The kind of page present, if any.
    pub fn page_kind(&self) -> Option<PageKind> {
        let page = self.page_ptr()?.as_ptr();
        // Most pages are ordinary memory: one test tells, before the
        // pagemap of a ZONE_DEVICE page is looked at.
        // SAFETY: By the type invariant `page` is allocated for `'_`.
        if !unsafe { bindings::is_zone_device_page(page) } {
            let pfn = self.raw & !bindings::hmm_pfn_flags_HMM_PFN_FLAGS;
            // SAFETY: Compares a number with the zero page's pfn.
            let zero = unsafe { bindings::is_zero_pfn(pfn) } != 0;
            return Some(match zero {
                true => PageKind::Zero,
                false => PageKind::System,
            });
        }
        // SAFETY: `page` is a ZONE_DEVICE page, allocated for `'_`, which
        // always has a pagemap, live while its pages are. Its `owner` and
        // `type_` are set before it is mapped and never change; the rest
        // (its `percpu_ref`) is the kernel's, and not referenced here.
        let (owner, type_) = unsafe {
            let pgmap = bindings::page_pgmap(page);
            ((*pgmap).owner, (*pgmap).type_)
        };
        let owner = Owner::from_ptr(owner);
        Some(match type_ {
            bindings::memory_type_MEMORY_DEVICE_PRIVATE => PageKind::DevicePrivate(owner),
            bindings::memory_type_MEMORY_DEVICE_COHERENT => PageKind::DeviceCoherent(owner),
            _ => PageKind::System,
        })
    }
}

/// `PMD_SHIFT`, for [`ValidPfn::map_shift`].
pub const PMD_SHIFT: u32 = bindings::PMD_SHIFT;
/// `PUD_SHIFT`, for [`ValidPfn::map_shift`].
pub const PUD_SHIFT: u32 = bindings::PUD_SHIFT;
