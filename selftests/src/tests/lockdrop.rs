// SPDX-License-Identifier: GPL-2.0

//! READ_UNLOCKABLE on userfaultfd-registered memory: the device's faults
//! drop the mmap lock and wait for a userspace handler, then the read
//! resumes. Every case checks the data byte by byte and cpages/faults.

use crate::check::{check_each, expect_errno, pattern};
use crate::dmirror::{page_size, Dmirror};
use crate::harness::{Failure, Test, TestResult};
use crate::mem::{self, Mapping};
use crate::uffd::{Answer, Handler, HandlerConfig, Stats, Uffd};
use crate::{diag, ensure, ensure_eq, skip};
use hmm_dmirror_uapi::*;
use std::os::fd::AsRawFd;
use std::sync::Arc;
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

/// Device faults a read may take: one, plus one for each invalidation
/// that erased mirrored pages before the read ended. On a busy kernel
/// (khugepaged, compaction, a debug config) that happens now and then;
/// more than a few means the read loop is not making progress.
const MAX_FAULTS: u64 = 4;

fn check_fault_count(faults: u64) -> TestResult {
    if faults > 1 {
        diag!("{faults} device faults: the range was invalidated during the read");
    }
    ensure!(
        (1..=MAX_FAULTS).contains(&faults),
        "faults {faults}, want 1..={MAX_FAULTS}"
    );
    Ok(())
}

/// Read `n` missing pages through the handler, checking everything.
fn read_missing(n: usize) -> TestResult {
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let mut out = Mapping::rw(n * page_size())?;
    out.bytes_mut().fill(0xEE);
    let h = r.handler()?;
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
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
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    check_faults(&st, r.base(), (0..n).filter(|&i| !present(i)))?;
    check_pages("device read", out.bytes(), |i| {
        if present(i) {
            OTHER_SEED
        } else {
            HANDLER_SEED
        }
    })
}

/// The first half is already in the device's mirror (read with READ while
/// present); READ_UNLOCKABLE over the whole range faults only the rest.
fn partly_mirrored() -> TestResult {
    let (n, ps) = (64, page_size());
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let mut page = vec![0u8; ps];
    for i in 0..n / 2 {
        fill_other(i, &mut page);
        r.uffd.copy(r.page(i), &page)?;
    }
    let out = Mapping::rw(n * ps)?;
    let c = d.read(r.base(), out.addr(), n / 2)?;
    ensure_eq!(c.cpages, (n / 2) as u64);
    let h = r.handler()?;
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    check_faults(&st, r.base(), n / 2..n)?;
    check_pages("device read", out.bytes(), |i| {
        if i < n / 2 {
            OTHER_SEED
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
    let base = map.addr();
    let registered = |i: usize| (32..64).contains(&i);
    for i in (0..n).filter(|&i| !registered(i)) {
        fill_other(i, &mut map.bytes_mut()[i * ps..(i + 1) * ps]);
    }
    let uffd = Arc::new(new_uffd()?);
    uffd.register_missing(base + 32 * ps, 32 * ps)?;
    let h = Handler::spawn(uffd.clone(), HandlerConfig::copy(base, ps, fill_handler))?;
    let out = Mapping::rw(n * ps)?;
    let c = d.read_unlockable(base, out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    check_faults(&st, base, 32..64)?;
    check_pages("device read", out.bytes(), |i| {
        if registered(i) {
            HANDLER_SEED
        } else {
            OTHER_SEED
        }
    })
}

/// A handler that takes 50 ms per fault: the read waits for every answer.
fn slow_handler() -> TestResult {
    let (n, ps) = (16, page_size());
    let delay = Duration::from_millis(50);
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n)?;
    let out = Mapping::rw(n * ps)?;
    let cfg = HandlerConfig {
        delay,
        ..HandlerConfig::copy(r.base(), ps, fill_handler)
    };
    let h = Handler::spawn(r.uffd.clone(), cfg)?;
    let start = Instant::now();
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let took = start.elapsed();
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    check_faults(&st, r.base(), 0..n)?;
    ensure!(
        took >= delay * n as u32,
        "the read returned after {took:?}, before {n} answers of {delay:?}"
    );
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
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
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
    let hsize = match mem::ensure_free_hugepages(1) {
        Ok(s) => s,
        Err(why) => skip!("{why}"),
    };
    let ps = page_size();
    let n = hsize / ps;
    let d = Dmirror::open(0)?;
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
    let c = d.read_unlockable(map.addr(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    ensure_eq!(st.faults, [map.addr()], "huge pages resolved");
    check_pages("device read", out.bytes(), |_| HANDLER_SEED)
}

/// Two mirrors read the same missing range at once. Each page is resolved
/// once; a second fault on it finds it present (EEXIST) or never happens.
fn concurrent_readers() -> TestResult {
    let (n, ps) = (256, page_size());
    let r = UffdRegion::new(n)?;
    let h = r.handler()?;
    let base = r.base();
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
        // Another reader's faults invalidate nothing: pages only appear.
        ensure!(
            (1..=MAX_FAULTS).contains(faults),
            "reader {k}: faults {faults}, want 1..={MAX_FAULTS}"
        );
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
    let c = d.read_unlockable(r.base(), out.addr(), n)?;
    let st = h.stop()?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    check_faults(&st, r.base(), 0..n)?;
    check_pages("read after zap", out.bytes(), |_| OTHER_SEED)
}

/// Without userfaultfd, READ_UNLOCKABLE is READ: data, counters, errors.
fn no_uffd() -> TestResult {
    let (n, ps) = (64, page_size());
    let d = Dmirror::open(0)?;
    let mut map = Mapping::rw(n * ps)?;
    // First half written by the CPU, second half never touched.
    for i in 0..n / 2 {
        fill_other(i, &mut map.bytes_mut()[i * ps..(i + 1) * ps]);
    }
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xEE);
    let c = d.read_unlockable(map.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
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

/// A shared file mapping: page cache faults may drop the lock too.
fn file_read() -> TestResult {
    let (n, ps) = (256, page_size());
    let d = Dmirror::open(0)?;
    let file = mem::temp_file(n * ps)?;
    let mut data = vec![0u8; n * ps];
    for (i, page) in data.chunks_mut(ps).enumerate() {
        fill_other(i, page);
    }
    mem::pwrite_all(&file, &data, 0)?;
    let map = Mapping::new(n * ps, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd())?;
    let out = Mapping::rw(n * ps)?;
    let c = d.read_unlockable(map.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_fault_count(c.faults)?;
    check_pages("device read of the file", out.bytes(), |_| OTHER_SEED)
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
