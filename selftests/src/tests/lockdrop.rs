// SPDX-License-Identifier: GPL-2.0

//! READ_UNLOCKABLE on userfaultfd-registered memory: the device's faults
//! drop the mmap lock and wait for a userspace handler, then the read
//! resumes. Every case checks the data byte by byte and cpages/faults.

use super::prompt;
use crate::check::{check_each, expect_errno, pattern};
use crate::dmirror::{page_size, Dmirror};
use crate::harness::{Failure, Test, TestResult};
use crate::mem::{self, Mapping};
use crate::uffd::{
    Answer, Handler, HandlerConfig, Stats, StopFd, Uffd, UffdMsg, UFFD_EVENT_PAGEFAULT,
};
use crate::{diag, ensure_eq, skip};
use hmm_dmirror_uapi::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const TESTS: &[Test] = &[
    Test::new("lockdrop.one_missing_page", one_missing_page),
    Test::new("lockdrop.many_missing_pages", many_missing_pages),
    Test::new("lockdrop.partly_populated", partly_populated),
    Test::new("lockdrop.partly_mirrored", partly_mirrored),
    Test::new("lockdrop.across_vmas", across_vmas),
    Test::new("lockdrop.slow_handler", slow_handler),
    Test::new("lockdrop.zeropage", zeropage),
    Test::new("lockdrop.hugetlbfs", hugetlbfs),
    Test::new("lockdrop.concurrent_readers", concurrent_readers),
    Test::new("lockdrop.refault_after_zap", refault_after_zap),
    Test::new("lockdrop.no_uffd", no_uffd),
    Test::new("lockdrop.file_read", file_read),
    Test::new("lockdrop.locked_read_refuses", locked_read_refuses),
];

/// Seeds of the page contents: from the handler, and from anyone else.
pub const HANDLER_SEED: u8 = 0xA5;
pub const OTHER_SEED: u8 = 0x3C;

pub fn fill_handler(page: usize, buf: &mut [u8]) {
    fill(HANDLER_SEED, page, buf);
}

pub fn fill_other(page: usize, buf: &mut [u8]) {
    fill(OTHER_SEED, page, buf);
}

pub fn fill(seed: u8, page: usize, buf: &mut [u8]) {
    for (off, b) in buf.iter_mut().enumerate() {
        *b = pattern(seed, page, off);
    }
}

/// A private anonymous region registered with a fresh userfaultfd in
/// MISSING mode.
pub struct UffdRegion {
    pub map: Mapping,
    pub uffd: Arc<Uffd>,
}

impl UffdRegion {
    pub fn new(npages: usize) -> Result<Self, Failure> {
        let map = Mapping::rw(npages * page_size())?;
        // Small pages only: khugepaged collapsing the region into a THP
        // would invalidate the mirror behind a read's back.
        mem::madvise(map.addr(), map.len(), libc::MADV_NOHUGEPAGE)?;
        let uffd = new_uffd()?;
        uffd.register_missing(map.addr(), map.len())?;
        Ok(UffdRegion {
            map,
            uffd: Arc::new(uffd),
        })
    }

    pub fn base(&self) -> usize {
        self.map.addr()
    }

    pub fn page(&self, i: usize) -> usize {
        self.base() + i * page_size()
    }

    /// A handler answering with `fill_handler` content.
    pub fn handler(&self) -> Result<Handler, Failure> {
        Ok(Handler::spawn(
            self.uffd.clone(),
            HandlerConfig::copy(self.base(), page_size(), fill_handler),
        )?)
    }
}

/// A userfaultfd, or a skip if the kernel has none.
/// One private hugetlb page, registered for missing faults with a new
/// userfaultfd; skips where the system has no free huge page or uffd
/// cannot register hugetlb.
pub fn hugetlb_registered() -> Result<(Mapping, Arc<Uffd>), Failure> {
    let hsize = match mem::ensure_free_hugepages(1) {
        Ok(s) => s,
        Err(why) => skip!("{why}"),
    };
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
    let map = match Mapping::new(hsize, libc::PROT_READ | libc::PROT_WRITE, flags, -1) {
        Ok(m) => m,
        Err(e) => skip!("huge page could not be mapped: {e}"),
    };
    let uffd = Arc::new(new_uffd()?);
    if let Err(e) = uffd.register_missing(map.addr(), hsize) {
        if e.raw_os_error() == Some(libc::EINVAL) {
            skip!("userfaultfd cannot register hugetlbfs here: {e}");
        }
        return Err(e.into());
    }
    Ok((map, uffd))
}

pub fn new_uffd() -> Result<Uffd, Failure> {
    match Uffd::new() {
        Ok(u) => Ok(u),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => skip!("no userfaultfd: {e}"),
        Err(e) => Err(Failure::Fail(format!("userfaultfd: {e}"))),
    }
}

/// The expected content of page `i` of a read: `seed_of(i)`'s pattern.
pub fn check_pages(what: &str, data: &[u8], seed_of: impl Fn(usize) -> u8) -> TestResult {
    let ps = page_size();
    check_each(what, data, |i| pattern(seed_of(i / ps), i / ps, i % ps))
}

/// The handler answered exactly the pages `want` (as page indexes), each once.
pub fn check_faults(st: &Stats, base: usize, want: impl Iterator<Item = usize>) -> TestResult {
    let ps = page_size();
    let mut got: Vec<usize> = st.faults.iter().map(|a| (a - base) / ps).collect();
    got.sort_unstable();
    let want: Vec<usize> = want.collect();
    if got != want {
        let show = |v: &[usize]| {
            format!(
                "{} pages {:?}{}",
                v.len(),
                &v[..v.len().min(8)],
                if v.len() > 8 { "..." } else { "" }
            )
        };
        return Err(Failure::Fail(format!(
            "handler resolved {}, want {}",
            show(&got),
            show(&want)
        )));
    }
    Ok(())
}

/// /proc/vmstat events counted when the kernel migrates pages (compaction,
/// NUMA balancing), reclaims them, or collapses or splits THPs: what can
/// still invalidate a mirrored page behind a read's back once the regions
/// are `MADV_NOHUGEPAGE`. Counted when the work starts (isolation, scan),
/// so before the invalidation it causes; summed over CPUs when read.
const CHURN_EVENTS: &[&str] = &[
    "pgmigrate_",
    "compact_isolated",
    "pgscan_",
    "numa_pte_updates",
    "numa_huge_pte_updates",
    "thp_collapse_alloc",
    "thp_split_pmd",
];

fn churn_events() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/vmstat") else {
        return 0;
    };
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| CHURN_EVENTS.iter().any(|e| k.starts_with(e)))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// Page migration and reclaim since `start()`, system-wide.
struct Churn(u64);

impl Churn {
    fn start() -> Self {
        Churn(churn_events())
    }

    /// Events seen since start (0 if /proc/vmstat cannot be read).
    fn seen(&self) -> u64 {
        churn_events().saturating_sub(self.0)
    }
}

/// Fault rounds a read may take beyond what it needs, and only when the
/// kernel reported churn (above) meanwhile. Each extra round needs an
/// invalidation of pages this read already faulted, between their fault
/// and the copy. Nothing these cases do invalidates the range during a
/// read: UFFDIO_COPY and UFFDIO_ZEROPAGE fill empty entries, CPU writes go
/// to present writable pages, and `MADV_NOHUGEPAGE` keeps khugepaged out.
/// What is left is compaction, NUMA balancing or reclaim passing over the
/// range. One pass works through its batch of pages quickly, so even two
/// extra rounds in one read are unlikely: allow two. Without churn a read
/// must take exactly the rounds it needs, as the `hmm.*` cases demand: a
/// module that adds a round to every read fails every case here.
const MAX_EXTRA_ROUNDS: u64 = 2;

/// `faults` must be `want`, or up to [`MAX_EXTRA_ROUNDS`] more if the
/// kernel migrated or reclaimed pages since `churn` started.
fn check_rounds(what: &str, faults: u64, want: u64, churn: &Churn) -> TestResult {
    if faults == want {
        return Ok(());
    }
    let moved = churn.seen();
    if moved > 0 && (want..=want + MAX_EXTRA_ROUNDS).contains(&faults) {
        diag!(
            "{what}: {faults} fault rounds, want {want}: the kernel migrated or \
             reclaimed pages meanwhile ({moved} events), which may erase mirrored ones"
        );
        return Ok(());
    }
    Err(Failure::Fail(format!(
        "{what}: faults {faults}, want {want}{}",
        if moved == 0 {
            " (no page migration or reclaim in /proc/vmstat meanwhile)".to_string()
        } else {
            format!(" (or at most {MAX_EXTRA_ROUNDS} more under page churn)")
        }
    )))
}

/// One fault round for a read of memory it does not mirror yet.
fn check_fault_count(faults: u64, churn: &Churn) -> TestResult {
    check_rounds("read", faults, 1, churn)
}

/// What a [`Holding`] handler does while it holds the first fault (given
/// with its userfaultfd and stop fd): it may wait for more faults, which
/// it returns to be answered with the first.
type Hold = Box<dyn FnOnce(&Uffd, &UffdMsg, RawFd) -> Result<Vec<UffdMsg>, String> + Send>;

/// A handler thread like [`Handler`] (UFFDIO_COPY of `fill_handler`
/// pages) that answers nothing until its [`Hold`] has run on the first
/// fault: the test acts while the thread that faulted certainly waits in
/// the kernel, with the mmap lock dropped. Whatever `hold` returns, the
/// handler then answers every fault until stopped, so that no reader is
/// left waiting; `stop` reports `hold`'s error.
struct Holding {
    stop: Arc<StopFd>,
    thread: Option<JoinHandle<Result<Stats, String>>>,
}

impl Holding {
    fn spawn(uffd: Arc<Uffd>, base: usize, hold: Hold) -> Result<Self, Failure> {
        let stop = Arc::new(StopFd::new()?);
        let s = stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("uffd-holding".into())
            .spawn(move || -> Result<Stats, String> {
                // Written now, so that its pages are there before the first fault.
                let mut page = vec![0xffu8; page_size()];
                let _ = ready_tx.send(());
                drop(ready_tx);
                let mut st = Stats::default();
                let wait = |timeout| {
                    uffd.next_event(Some(s.raw_fd()), timeout)
                        .map_err(|e| format!("userfaultfd: {e}"))
                };
                let held = match wait(prompt()) {
                    // No fault at all: serve on, in case one comes late.
                    Err(e) => Err(format!("no fault to hold: {e}")),
                    Ok(None) => Err("stopped before any fault".to_string()),
                    Ok(Some(first)) => {
                        let r = hold(&uffd, &first, s.raw_fd());
                        let more = r.as_ref().map(Vec::as_slice).unwrap_or(&[]);
                        for msg in std::iter::once(&first).chain(more) {
                            answer(&uffd, base, msg, &mut page, &mut st)?;
                        }
                        r.map(|_| ())
                    }
                };
                while let Some(msg) = wait(Duration::from_secs(600))? {
                    answer(&uffd, base, &msg, &mut page, &mut st)?;
                }
                held.map(|()| st)
            })?;
        if ready.recv().is_err() {
            return Err("the holding handler ended before it started".into());
        }
        Ok(Holding {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> Result<Stats, Failure> {
        self.stop.raise();
        let t = self.thread.take().expect("joined once");
        let r = t.join().map_err(|_| "the holding handler panicked")?;
        r.map_err(|e| Failure::Fail(format!("handler: {e}")))
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.raise();
            let _ = t.join();
        }
    }
}

/// Resolve one fault as [`Handler`] does: UFFDIO_COPY of a `fill_handler`
/// page, or a wake if the page is there already (EEXIST).
fn answer(
    uffd: &Uffd,
    base: usize,
    msg: &UffdMsg,
    page: &mut [u8],
    st: &mut Stats,
) -> Result<(), String> {
    if msg.event != UFFD_EVENT_PAGEFAULT {
        return Err(format!("unexpected userfaultfd event {:#x}", msg.event));
    }
    let ps = page_size();
    let addr = msg.address() as usize & !(ps - 1);
    fill_handler((addr - base) / ps, page);
    match uffd.copy(addr, page) {
        Ok(()) => st.faults.push(addr),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            st.already_present += 1;
            uffd.wake(addr, ps)
                .map_err(|e| format!("wake {addr:#x}: {e}"))?;
        }
        Err(e) => return Err(format!("resolving {addr:#x}: {e}")),
    }
    Ok(())
}

/// Read `n` missing pages through the handler, checking everything.
fn read_missing(n: usize) -> TestResult {
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let mut out = Mapping::rw(n * page_size())?;
    out.bytes_mut().fill(0xEE);
    let h = r.handler()?;
    let churn = Churn::start();
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, r.base(), 0..n)?;
    check_pages("device read", out.bytes(), |_| HANDLER_SEED)?;
    // The CPU sees what the device saw.
    check_pages("CPU view", r.map.bytes(), |_| HANDLER_SEED)
}

fn one_missing_page() -> TestResult {
    read_missing(1)
}

fn many_missing_pages() -> TestResult {
    read_missing(1024)
}

/// Every third page is already there (placed with UFFDIO_COPY before the
/// read): only the others reach the handler.
fn partly_populated() -> TestResult {
    let (n, ps) = (64, page_size());
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let present = |i: usize| i.is_multiple_of(3);
    let mut page = vec![0u8; ps];
    for i in (0..n).filter(|&i| present(i)) {
        fill_other(i, &mut page);
        r.uffd.copy(r.page(i), &page)?;
    }
    let out = Mapping::rw(n * ps)?;
    let h = r.handler()?;
    let churn = Churn::start();
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, r.base(), (0..n).filter(|&i| !present(i)))?;
    check_pages("device read", out.bytes(), |i| {
        if present(i) {
            OTHER_SEED
        } else {
            HANDLER_SEED
        }
    })
}

/// The seed of what the CPU writes over pages while a read waits.
const REWRITE_SEED: u8 = 0x69;

/// The first half is already in the device's mirror (read with READ while
/// present); READ_UNLOCKABLE over the whole range copies that half from
/// the mirror first, then faults only the rest. While the handler holds
/// the first fault (in the second half, the lock dropped), the CPU
/// rewrites the first half in place, which keeps it mirrored. The read
/// must return the first half as it was: C's dmirror_read_unlocked() and
/// the Rust module both copy what the mirror has before they fault. A
/// module that went over the whole range again after the lock drop, or
/// faulted it all before copying, returns the rewrite and fails. A plain
/// READ afterwards needs no fault (every page is mirrored) and sees the
/// rewrite. (A module that re-walked the mirrored half without copying it
/// again cannot be told apart: a walk over present pages leaves no trace.)
fn partly_mirrored() -> TestResult {
    let (n, ps) = (64, page_size());
    let half = n / 2;
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let base = r.base();
    let mut page = vec![0u8; ps];
    for i in 0..half {
        fill_other(i, &mut page);
        r.uffd.copy(r.page(i), &page)?;
    }
    let mut out = Mapping::rw(n * ps)?;
    let churn = Churn::start();
    let c = d.read(base, out.addr(), half)?;
    ensure_eq!(c.cpages, half as u64);
    let rewrite: Hold = Box::new(move |_, _, _| {
        // SAFETY: the first half is mapped, present and writable (placed
        // by UFFDIO_COPY), so these writes fault nothing; the test's
        // thread waits in the read meanwhile and does not look at it.
        let first = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, half * ps) };
        for (i, p) in first.chunks_mut(ps).enumerate() {
            fill(REWRITE_SEED, i, p);
        }
        Ok(Vec::new())
    });
    let h = Holding::spawn(r.uffd.clone(), base, rewrite)?;
    out.bytes_mut().fill(0xEE);
    let c = d.read_unlockable(base, out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, base, half..n)?;
    let first_half = check_pages(
        "first half (copied before the fault)",
        &out.bytes()[..half * ps],
        |_| OTHER_SEED,
    );
    if let Err(e) = first_half {
        // Compaction or reclaim erasing a mirrored page before the read
        // copied it makes the read fault it again, after the rewrite.
        let moved = churn.seen();
        if let (Failure::Fail(why), true) = (&e, moved > 0) {
            skip!("{why}, with page migration or reclaim meanwhile ({moved} events)");
        }
        return Err(e);
    }
    check_pages("device read", out.bytes(), |i| {
        if i < half {
            OTHER_SEED
        } else {
            HANDLER_SEED
        }
    })?;

    out.bytes_mut().fill(0xEE);
    let churn = Churn::start();
    let c = d.read(base, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_rounds("READ of the mirrored range", c.faults, 0, &churn)?;
    check_pages("READ after the rewrite", out.bytes(), |i| {
        if i < half {
            REWRITE_SEED
        } else {
            HANDLER_SEED
        }
    })
}

/// Only the middle third is registered: the read crosses three VMAs, two
/// of them ordinary memory the CPU has written.
fn across_vmas() -> TestResult {
    let (n, ps) = (96, page_size());
    let d = Dmirror::open(0)?;
    let mut map = Mapping::rw(n * ps)?;
    mem::madvise(map.addr(), map.len(), libc::MADV_NOHUGEPAGE)?;
    let base = map.addr();
    let registered = |i: usize| (32..64).contains(&i);
    for i in (0..n).filter(|&i| !registered(i)) {
        fill_other(i, &mut map.bytes_mut()[i * ps..(i + 1) * ps]);
    }
    let uffd = Arc::new(new_uffd()?);
    uffd.register_missing(base + 32 * ps, 32 * ps)?;
    let h = Handler::spawn(uffd.clone(), HandlerConfig::copy(base, ps, fill_handler))?;
    let out = Mapping::rw(n * ps)?;
    let churn = Churn::start();
    let c = d.read_unlockable(base, out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, base, 32..64)?;
    check_pages("device read", out.bytes(), |i| {
        if registered(i) {
            HANDLER_SEED
        } else {
            OTHER_SEED
        }
    })
}

/// A handler that takes 1.5 s per fault, longer than the 1 s for which
/// either module lets a range retry without progress before it gives up
/// with EBUSY (C's HMM_RANGE_DEFAULT_TIMEOUT, the Rust module's
/// RANGE_TIMEOUT_MS); C's READ_UNLOCKED passes no timeout at all. The read
/// must wait for every answer and succeed: a module whose clock also ran
/// while a handler worked (on the fault, the window or the read) ends with
/// EBUSY after the first answer or the second.
fn slow_handler() -> TestResult {
    let (n, ps) = (2, page_size());
    let delay = Duration::from_millis(1500);
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let out = Mapping::rw(n * ps)?;
    let cfg = HandlerConfig {
        delay,
        ..HandlerConfig::copy(r.base(), ps, fill_handler)
    };
    let h = Handler::spawn(r.uffd.clone(), cfg)?;
    let start = Instant::now();
    let churn = Churn::start();
    let res = d.read_unlockable(r.base(), out.addr(), n);
    let took = start.elapsed();
    let st = h.stop()?;
    diag!("the read took {took:?} for {n} answers of {delay:?} each");
    let c = match res {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Failure::Fail(format!(
                "the read gave up with EBUSY after {took:?}: it counted the handler's \
                 time against its retry budget"
            )))
        }
        r => r?,
    };
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, r.base(), 0..n)?;
    check_pages("device read", out.bytes(), |_| HANDLER_SEED)
}

/// A handler answering with UFFDIO_ZEROPAGE: the device reads zeros and
/// the pages are the shared zero page.
fn zeropage() -> TestResult {
    let (n, ps) = (64, page_size());
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xFF);
    let cfg = HandlerConfig {
        answer: Answer::ZeroPage,
        ..HandlerConfig::copy(r.base(), ps, fill_handler)
    };
    let h = Handler::spawn(r.uffd.clone(), cfg)?;
    let churn = Churn::start();
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, r.base(), 0..n)?;
    check_each("device read", out.bytes(), |_| 0)?;
    let c = d.snapshot(r.base(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("snapshot", &out.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ
    })
}

/// MAP_HUGETLB memory registered MISSING, resolved with one UFFDIO_COPY of
/// a whole huge page.
fn hugetlbfs() -> TestResult {
    let (map, uffd) = hugetlb_registered()?;
    let hsize = map.len();
    let ps = page_size();
    let n = hsize / ps;
    let d = Dmirror::open(0)?;
    fn fill_huge(unit: usize, buf: &mut [u8]) {
        let ps = page_size();
        let per = buf.len() / ps;
        for (i, page) in buf.chunks_mut(ps).enumerate() {
            fill(HANDLER_SEED, unit * per + i, page);
        }
    }
    let h = Handler::spawn(
        uffd.clone(),
        HandlerConfig::copy(map.addr(), hsize, fill_huge),
    )?;
    let out = Mapping::rw(hsize)?;
    let churn = Churn::start();
    let c = d.read_unlockable(map.addr(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    ensure_eq!(st.faults, [map.addr()], "huge pages resolved");
    check_pages("device read", out.bytes(), |_| HANDLER_SEED)
}

/// Two mirrors read the same missing range at once. The handler holds the
/// first fault until a second one arrives: a thread waiting in the kernel
/// cannot fault again, so two unanswered faults are the two readers both
/// waiting on the range, the lock dropped, at the same time. Then each
/// page is resolved once (a second fault on it finds it present, EEXIST,
/// and is woken), and each read takes one fault round: the other reader's
/// faults only fill empty entries, which invalidates nothing.
fn concurrent_readers() -> TestResult {
    let (n, ps) = (256, page_size());
    let r = UffdRegion::new(n)?;
    let base = r.base();
    let second: Hold = Box::new(move |uffd, first, stop| {
        let page_of = |msg: &UffdMsg| (msg.address() as usize - base) / page_size();
        let msg = match uffd.next_event(Some(stop), prompt()) {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err("stopped while holding the first fault".into()),
            Err(e) => {
                return Err(format!(
                    "no second fault while the first was held ({e}): the two reads \
                     never waited on the range at the same time"
                ))
            }
        };
        diag!(
            "held a fault at page {} until one at page {} arrived",
            page_of(first),
            page_of(&msg)
        );
        Ok(vec![msg])
    });
    let h = Holding::spawn(r.uffd.clone(), base, second)?;
    let churn = Churn::start();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || -> Result<(Mapping, u64, u64), String> {
                let d = Dmirror::open(0).map_err(|e| e.to_string())?;
                let out = Mapping::rw(n * ps).map_err(|e| e.to_string())?;
                let c = d
                    .read_unlockable(base, out.addr(), n)
                    .map_err(|e| format!("read: {e}"))?;
                Ok((out, c.cpages, c.faults))
            })
        })
        .collect();
    let mut outs = Vec::new();
    for t in readers {
        outs.push(t.join().map_err(|_| "reader panicked".to_string())??);
    }
    let st = h.stop()?;
    check_faults(&st, base, 0..n)?;
    for (k, (out, cpages, faults)) in outs.iter().enumerate() {
        ensure_eq!(*cpages, n as u64, "reader {k}");
        check_rounds(&format!("reader {k}"), *faults, 1, &churn)?;
        check_pages(&format!("reader {k}"), out.bytes(), |_| HANDLER_SEED)?;
    }
    Ok(())
}

/// After MADV_DONTNEED zaps the pages, the mirror must not keep the old
/// ones: the next read faults again and sees the new contents.
fn refault_after_zap() -> TestResult {
    let (n, ps) = (32, page_size());
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let out = Mapping::rw(n * ps)?;
    let h = r.handler()?;
    d.read_unlockable(r.base(), out.addr(), n)?;
    check_faults(&h.stop()?, r.base(), 0..n)?;
    check_pages("first read", out.bytes(), |_| HANDLER_SEED)?;

    mem::madvise(r.base(), n * ps, libc::MADV_DONTNEED)?;
    let h = Handler::spawn(
        r.uffd.clone(),
        HandlerConfig::copy(r.base(), ps, fill_other),
    )?;
    let churn = Churn::start();
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, r.base(), 0..n)?;
    check_pages("read after zap", out.bytes(), |_| OTHER_SEED)
}

/// Without userfaultfd, READ_UNLOCKABLE is READ: data, counters, errors.
fn no_uffd() -> TestResult {
    let (n, ps) = (64, page_size());
    let d = Dmirror::open(0)?;
    let mut map = Mapping::rw(n * ps)?;
    mem::madvise(map.addr(), map.len(), libc::MADV_NOHUGEPAGE)?;
    // First half written by the CPU, second half never touched.
    for i in 0..n / 2 {
        fill_other(i, &mut map.bytes_mut()[i * ps..(i + 1) * ps]);
    }
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xEE);
    let churn = Churn::start();
    let c = d.read_unlockable(map.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    let half = n / 2 * ps;
    check_pages("written half", &out.bytes()[..half], |_| OTHER_SEED)?;
    check_each("untouched half", &out.bytes()[half..], |_| 0)?;
    map.protect(libc::PROT_NONE)?;
    out.bytes_mut().fill(0xEE);
    expect_errno(
        d.read_unlockable(map.addr(), out.addr(), n),
        libc::EFAULT,
        "PROT_NONE",
    )?;
    check_each("buffer after failed read", out.bytes(), |_| 0xEE)
}

/// A shared file mapping whose faults must drop the lock: a memfd (shmem)
/// registered with userfaultfd in MISSING mode. The odd pages are in the
/// page cache (written with pwrite) and map without a fault to the
/// handler; the even ones are holes, and only the handler can fill them,
/// which it can do only while the read waits with the lock dropped (a
/// fault that may not drop it fails, see `locked_read_refuses`). Its
/// UFFDIO_COPY fills the file itself: a pread afterwards sees the same data.
fn file_read() -> TestResult {
    let (n, ps) = (64, page_size());
    let cached = |i: usize| i % 2 == 1;
    let d = Dmirror::open(0)?;
    let name = c"hmm-dmirror-lockdrop";
    // SAFETY: a valid C string and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            skip!("no memfd_create: {e}");
        }
        return Err(e.into());
    }
    // SAFETY: fd was just created and is ours.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes a file we own.
    if unsafe { libc::ftruncate(file.as_raw_fd(), (n * ps) as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut page = vec![0u8; ps];
    for i in (0..n).filter(|&i| cached(i)) {
        fill_other(i, &mut page);
        mem::pwrite_all(&file, &page, i * ps)?;
    }
    let map = Mapping::new(
        n * ps,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        file.as_raw_fd(),
    )?;
    mem::madvise(map.addr(), map.len(), libc::MADV_NOHUGEPAGE)?;
    let uffd = Arc::new(new_uffd()?);
    if let Err(e) = uffd.register_missing(map.addr(), map.len()) {
        if e.raw_os_error() == Some(libc::EINVAL) {
            skip!("userfaultfd cannot register shmem here: {e}");
        }
        return Err(e.into());
    }
    let h = Handler::spawn(
        uffd.clone(),
        HandlerConfig::copy(map.addr(), ps, fill_handler),
    )?;
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xEE);
    let churn = Churn::start();
    let c = d.read_unlockable(map.addr(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults, &churn)?;
    check_faults(&st, map.addr(), (0..n).filter(|&i| !cached(i)))?;
    let seed = |i: usize| if cached(i) { OTHER_SEED } else { HANDLER_SEED };
    check_pages("device read of the file", out.bytes(), seed)?;
    out.bytes_mut().fill(0xEE);
    mem::pread_all(&file, out.bytes_mut(), 0)?;
    check_pages("the file after the read", out.bytes(), seed)
}

/// Plain READ holds the mmap lock across the fault, so it cannot wait for
/// a userfaultfd handler: it fails at once and the handler never hears of
/// it. (With CONFIG_DEBUG_VM the kernel logs "FAULT_FLAG_ALLOW_RETRY
/// missing" and a stack dump; that is expected.)
fn locked_read_refuses() -> TestResult {
    let n = 4;
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let out = Mapping::rw(n * page_size())?;
    let h = r.handler()?;
    let res = d.read(r.base(), out.addr(), n);
    let st = h.stop()?;
    expect_errno(res, libc::EFAULT, "READ of userfaultfd-missing memory")?;
    ensure_eq!(st.faults.len(), 0, "faults the handler saw");
    Ok(())
}
