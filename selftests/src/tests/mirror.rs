// SPDX-License-Identifier: GPL-2.0

//! READ and WRITE through the mirror: ports of upstream hmm-tests.c
//! (device-private variant, without migration).

use super::prompt;
use crate::check::{check_each, expect_errno};
use crate::dmirror::{page_size, Dmirror};
use crate::harness::{describe, fork_and_wait, Failure, Test, TestResult};
use crate::mem::{self, align_up, Mapping};
use crate::{diag, ensure, ensure_eq, skip};
use hmm_dmirror_uapi::*;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TESTS: &[Test] = &[
    Test::new("hmm.open_close", open_close),
    Test::new("hmm.two_devices", two_devices),
    Test::new("hmm.anon_read", anon_read),
    Test::new("hmm.anon_read_prot", anon_read_prot),
    Test::new("hmm.anon_write", anon_write),
    Test::new("hmm.anon_write_prot", anon_write_prot),
    Test::new("hmm.anon_write_child", anon_write_child),
    Test::new("hmm.anon_write_child_shared", anon_write_child_shared),
    Test::new("hmm.anon_write_huge", anon_write_huge),
    Test::new("hmm.anon_write_hugetlbfs", anon_write_hugetlbfs),
    Test::new("hmm.file_read", file_read),
    Test::new("hmm.file_write", file_write),
    Test::new("hmm.anon_read_multiple", anon_read_multiple),
    Test::new("hmm.anon_teardown", anon_teardown).with_timeout(120),
];

/// Upstream's HMM_BUFFER_SIZE: 4 MiB.
const BUFFER_SIZE: usize = 1024 << 12;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn npages(size: usize) -> usize {
    size / page_size()
}

/// Two opens of one device are two mirrors, each with its own device page
/// table. A READ through a file with an empty table takes one fault round;
/// the same READ through the same file again takes none (its table now
/// maps the pages); through the other file, one again (its table was not
/// filled by the first file's READ). A module that shared one table
/// between files, or kept none, gets a count wrong. Closing one file
/// leaves the other's table intact, and a new open starts empty.
fn open_close() -> TestResult {
    let d = Dmirror::open(0)?;
    d.close()?;
    let (a, b) = (Dmirror::open(0)?, Dmirror::open(0)?);
    let size = 16 * page_size();
    let mut buf = Mapping::rw(size)?;
    // Small pages only: khugepaged collapsing them would invalidate both
    // mirrors between the READs.
    mem::madvise(buf.addr(), size, libc::MADV_NOHUGEPAGE)?;
    for (i, w) in buf.words_mut().iter_mut().enumerate() {
        *w = (i as u32) ^ 0x0c10_5e00;
    }
    let mut out = Mapping::rw(size)?;
    let mut read = |d: &Dmirror, what: &str| -> Result<u64, Failure> {
        out.bytes_mut().fill(0);
        let c = d.read(buf.addr(), out.addr(), npages(size))?;
        ensure_eq!(c.cpages, npages(size) as u64, "{what}");
        check_each(what, out.words(), |i| (i as u32) ^ 0x0c10_5e00)?;
        Ok(c.faults)
    };
    ensure_eq!(read(&a, "first READ through a")?, 1, "faults");
    ensure_eq!(
        read(&a, "second READ through a")?,
        0,
        "faults: a's own table must map the pages now"
    );
    ensure_eq!(
        read(&b, "first READ through b")?,
        1,
        "faults: b's table must still be empty after a's READ"
    );
    ensure_eq!(read(&b, "second READ through b")?, 0, "faults");
    a.close()?;
    ensure_eq!(
        read(&b, "READ through b after a closed")?,
        0,
        "faults: closing a must leave b's table as it was"
    );
    let c = Dmirror::open(0)?;
    ensure_eq!(
        read(&c, "first READ through a new open")?,
        1,
        "faults: a new open must start with an empty table"
    );
    c.close()?;
    b.close()?;
    Ok(())
}

/// Both device-private devices mirror the process; each sees what the
/// other wrote.
fn two_devices() -> TestResult {
    let (d0, d1) = (Dmirror::open(0)?, Dmirror::open(1)?);
    let size = 16 * page_size();
    let mut src = Mapping::rw(size)?;
    let mut buf = Mapping::rw(size)?;
    let out = Mapping::rw(size)?;
    for (i, w) in src.words_mut().iter_mut().enumerate() {
        *w = (i as u32) ^ 0x5555_0000;
    }
    let c = d1.write(out.addr(), src.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    let c = d0.read(out.addr(), buf.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    check_each("device 0 read of device 1 write", buf.words(), |i| {
        (i as u32) ^ 0x5555_0000
    })?;
    buf.bytes_mut().fill(0);
    d1.read(out.addr(), buf.addr(), npages(size))?;
    check_each("device 1 read", buf.words(), |i| (i as u32) ^ 0x5555_0000)
}

fn anon_read() -> TestResult {
    let d = Dmirror::open(0)?;
    let (size, ps) = (BUFFER_SIZE, page_size());
    let mut buf = Mapping::rw(size)?;
    let mirror = Mapping::rw(size)?;
    // Leave the first two pages zero: pte_none and the zero page.
    let skip_words = 2 * ps / 4;
    for (i, w) in buf.words_mut().iter_mut().enumerate().skip(skip_words) {
        *w = i as u32;
    }
    buf.protect(libc::PROT_READ)?;
    // Populate the CPU page table with the zero page.
    // SAFETY: reads a mapped, readable word.
    let v = unsafe { std::ptr::read_volatile((buf.addr() + ps) as *const u32) };
    ensure_eq!(v, 0);

    let c = d.read(buf.addr(), mirror.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    ensure_eq!(c.faults, 1);
    check_each("device read", mirror.words(), |i| {
        if i < skip_words {
            0
        } else {
            i as u32
        }
    })
}

fn anon_read_prot() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = BUFFER_SIZE;
    let mut buf = Mapping::rw(size)?;
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in buf.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = (i as u32).wrapping_neg();
    }
    buf.protect(libc::PROT_NONE)?;
    expect_errno(
        d.read(buf.addr(), mirror.addr(), npages(size)),
        libc::EFAULT,
        "read of PROT_NONE",
    )?;
    buf.protect(libc::PROT_READ)?;
    check_each("memory after failed read", buf.words(), |i| i as u32)?;
    check_each("mirror buffer untouched", mirror.words(), |i| {
        (i as u32).wrapping_neg()
    })
}

fn anon_write() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = BUFFER_SIZE;
    let buf = Mapping::rw(size)?;
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let c = d.write(buf.addr(), mirror.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    ensure_eq!(c.faults, 1);
    check_each("device write", buf.words(), |i| i as u32)
}

fn anon_write_prot() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = BUFFER_SIZE;
    let buf = Mapping::anon(size, libc::PROT_READ)?;
    let mut mirror = Mapping::rw(size)?;
    // A read faults in the zero page.
    let c = d.read(buf.addr(), mirror.addr(), 1)?;
    ensure_eq!(c.cpages, 1);
    ensure_eq!(c.faults, 1);
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    expect_errno(
        d.write(buf.addr(), mirror.addr(), npages(size)),
        libc::EPERM,
        "write to read-only",
    )?;
    check_each("read-only memory", buf.words(), |_| 0)?;
    // Writable now: the zero page is replaced.
    buf.protect(RW)?;
    let c = d.write(buf.addr(), mirror.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    ensure_eq!(c.faults, 1);
    check_each("device write", buf.words(), |i| i as u32)
}

/// A child's device write to a private mapping copies on write: the parent
/// keeps its data. Run on small pages (`MADV_NOHUGEPAGE`), then on a THP
/// (`MADV_HUGEPAGE`). The THP run checks that it got one: smaps must show
/// the range PMD-mapped (else the case skips: the system gave no THP) and
/// so must SNAPSHOT (else it fails: the module hides the PMD).
fn anon_write_child() -> TestResult {
    for thp in [false, true] {
        let size = if thp { mem::pmd_size() } else { BUFFER_SIZE };
        let n = npages(size);
        let region = Mapping::rw(2 * size)?;
        let addr = align_up(region.addr(), size);
        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        mem::madvise(addr, size, advice)?;
        // SAFETY: [addr, addr+size) lies inside region and is writable.
        let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, size / 4) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = i as u32;
        }
        if thp {
            require_thp(addr, size)?;
        }
        let mut mirror = Mapping::rw(size)?;
        for (i, w) in mirror.words_mut().iter_mut().enumerate() {
            *w = (i as u32).wrapping_neg();
        }
        let status = fork_and_wait(|| {
            check_each("child sees parent's data", words, |i| i as u32)?;
            // The child needs its own mirror of its own mm.
            let d = Dmirror::open(0)?;
            let c = d.write(addr, mirror.addr(), n)?;
            ensure_eq!(c.cpages, n as u64);
            ensure_eq!(c.faults, 1);
            check_each("child's memory after device write", words, |i| {
                (i as u32).wrapping_neg()
            })
        })?;
        ensure!(status == 0, "thp={thp}: child {}", describe(status));
        check_each("parent's memory unchanged", words, |i| i as u32)?;
        if !thp {
            diag!("small pages: passed");
        }
    }
    Ok(())
}

/// `[addr, addr+size)`, one PMD-aligned, CPU-written `MADV_HUGEPAGE`
/// range, must be one PMD-mapped THP. Skips if the kernel did not give one
/// (smaps, not the module, says so); fails if it did but the module's
/// SNAPSHOT does not report it writable at PMD level on every page.
fn require_thp(addr: usize, size: usize) -> TestResult {
    let huge = mem::anon_huge_bytes(addr)?;
    if huge < size {
        skip!(
            "the system gave no THP for a MADV_HUGEPAGE range: AnonHugePages {} kB of {} kB \
             (transparent_hugepage/enabled: {})",
            huge / 1024,
            size / 1024,
            mem::thp_enabled()
        );
    }
    let n = npages(size);
    let d = Dmirror::open(0)?;
    let prot = Mapping::rw(align_up(n, page_size()))?;
    let c = d.snapshot(addr, prot.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("SNAPSHOT of a PMD-mapped THP", &prot.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD
    })?;
    d.close()?;
    Ok(())
}

/// A child's device write to a shared mapping is seen by the parent.
fn anon_write_child_shared() -> TestResult {
    let size = BUFFER_SIZE;
    let n = npages(size);
    let mut buf = Mapping::new(size, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)?;
    for (i, w) in buf.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = (i as u32).wrapping_neg();
    }
    let status = fork_and_wait(|| {
        check_each("child sees parent's data", buf.words(), |i| i as u32)?;
        let d = Dmirror::open(0)?;
        let c = d.write(buf.addr(), mirror.addr(), n)?;
        ensure_eq!(c.cpages, n as u64);
        ensure_eq!(c.faults, 1);
        check_each("child's view", buf.words(), |i| (i as u32).wrapping_neg())
    })?;
    ensure!(status == 0, "child {}", describe(status));
    check_each("parent sees the child's device write", buf.words(), |i| {
        (i as u32).wrapping_neg()
    })
}

/// A device write to a PMD-mapped THP. The range is written by the CPU
/// first, and checked to be one THP (smaps and SNAPSHOT, see
/// [`require_thp`]) before the device writes it: the device must store
/// every small page of the huge one.
fn anon_write_huge() -> TestResult {
    let size = mem::pmd_size();
    let n = npages(size);
    let region = Mapping::rw(2 * size)?;
    let addr = align_up(region.addr(), size);
    mem::madvise(addr, size, libc::MADV_HUGEPAGE)?;
    // SAFETY: [addr, addr+size) lies inside region and is writable.
    let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, size / 4) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = !(i as u32);
    }
    require_thp(addr, size)?;
    let d = Dmirror::open(0)?;
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let c = d.write(addr, mirror.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    ensure_eq!(c.faults, 1);
    check_each("device write", words, |i| i as u32)
}

fn anon_write_hugetlbfs() -> TestResult {
    let hsize = match mem::ensure_free_hugepages(1) {
        Ok(s) => s,
        Err(why) => skip!("{why}"),
    };
    let d = Dmirror::open(0)?;
    let size = align_up(mem::TWO_MB, hsize);
    let n = npages(size);
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
    let buf = match Mapping::new(size, RW, flags, -1) {
        Ok(m) => m,
        Err(e) => skip!("huge page could not be mapped: {e}"),
    };
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let c = d.write(buf.addr(), mirror.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    ensure_eq!(c.faults, 1);
    check_each("device write", buf.words(), |i| i as u32)
}

fn file_read() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = BUFFER_SIZE;
    let file = mem::temp_file(size)?;
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    mem::pwrite_all(&file, mirror.bytes(), 0)?;
    mirror.bytes_mut().fill(0);
    let buf = Mapping::new(size, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd())?;
    let c = d.read(buf.addr(), mirror.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    ensure_eq!(c.faults, 1);
    check_each("device read of the file", mirror.words(), |i| i as u32)
}

fn file_write() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = BUFFER_SIZE;
    let file = mem::temp_file(size)?;
    let buf = Mapping::new(size, RW, libc::MAP_SHARED, file.as_raw_fd())?;
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let c = d.write(buf.addr(), mirror.addr(), npages(size))?;
    ensure_eq!(c.cpages, npages(size) as u64);
    ensure_eq!(c.faults, 1);
    check_each("mapping after device write", buf.words(), |i| i as u32)?;
    mirror.bytes_mut().fill(0);
    mem::pread_all(&file, mirror.bytes_mut(), 0)?;
    check_each("file contents after device write", mirror.words(), |i| {
        i as u32
    })
}

fn anon_read_multiple() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = BUFFER_SIZE;
    for c in 0..10u32 {
        let mut buf = Mapping::rw(size)?;
        let mirror = Mapping::rw(size)?;
        for (i, w) in buf.words_mut().iter_mut().enumerate() {
            *w = i as u32 + c;
        }
        let r = d.read(buf.addr(), mirror.addr(), npages(size))?;
        ensure_eq!(r.cpages, npages(size) as u64, "round {c}");
        ensure_eq!(r.faults, 1, "round {c}");
        check_each(&format!("round {c}"), mirror.words(), |i| i as u32 + c)?;
    }
    Ok(())
}

/// Read while another thread unmaps the second half of the buffer: the
/// read either completes with the right data (the munmap came after it)
/// or fails with EFAULT; it never hangs. At least one read must complete,
/// so that a module failing every read here cannot pass: the munmap comes
/// at a random moment up to twice as long as an unraced read takes, and if
/// no read completed in the ten rounds, later rounds delay it further (4 to
/// 64 times an unraced read) until one does.
fn anon_teardown() -> TestResult {
    let d = Arc::new(Dmirror::open(0)?);
    let size = BUFFER_SIZE;
    // How long a read of this size takes with nothing racing it.
    let mut buf = Mapping::rw(size)?;
    buf.bytes_mut().fill(1);
    let mirror = Mapping::rw(size)?;
    let start = Instant::now();
    d.read(buf.addr(), mirror.addr(), npages(size))?;
    let unraced = start.elapsed().max(Duration::from_micros(32));
    drop(buf);
    diag!("an unraced read took {unraced:?}");

    // One round: true if the read completed, false if it failed with EFAULT.
    let round = |c: u32, delay: Duration| -> Result<bool, Failure> {
        let mut buf = Mapping::rw(size)?;
        // Small pages: unmapping half of a THP splits it first, which
        // invalidates the half that stays and costs a completed read a
        // second fault round.
        mem::madvise(buf.addr(), size, libc::MADV_NOHUGEPAGE)?;
        for (i, w) in buf.words_mut().iter_mut().enumerate() {
            *w = i as u32 + c;
        }
        let (addr, len) = buf.leak();
        let unmapper = std::thread::spawn(move || {
            std::thread::sleep(delay);
            mem::unmap(addr + len / 2, len / 2)
        });
        let r = d.read(addr, mirror.addr(), npages(size));
        unmapper
            .join()
            .map_err(|_| "unmapper panicked".to_string())??;
        let completed = match r {
            Ok(r) => {
                ensure_eq!(r.cpages, npages(size) as u64);
                // C now and then takes a second round in a read that
                // completes, even on small pages (cause not found).
                ensure!(
                    (1..=2).contains(&r.faults),
                    "round {c}: {} fault rounds",
                    r.faults
                );
                if r.faults == 2 {
                    diag!("round {c}: a second fault round in a completed read");
                }
                check_each(&format!("round {c}"), mirror.words(), |i| i as u32 + c)?;
                true
            }
            Err(e) => {
                expect_errno(Err::<(), _>(e), libc::EFAULT, "read racing munmap")?;
                false
            }
        };
        mem::unmap(addr, len / 2)?;
        Ok(completed)
    };
    let (mut ok, mut efault) = (0, 0);
    let mut c = 0u32;
    loop {
        let delay = if c < 10 {
            // The munmap comes at a random moment: within a fifth of an
            // unraced read (but at least upstream's 32 us) in the first
            // round, within twice one in the last.
            let most = (unraced * 2 * (c + 1) / 10).max(Duration::from_micros(32));
            most.mul_f64(random_u32() as f64 / u32::MAX as f64)
        } else if ok == 0 && c < 15 {
            // 4, 8, ... 64 times an unraced read.
            (unraced * (1 << (c - 8))).min(prompt())
        } else {
            break;
        };
        if round(c, delay)? {
            ok += 1;
        } else {
            efault += 1;
        }
        c += 1;
    }
    diag!("{ok} reads completed, {efault} failed with EFAULT");
    ensure!(
        ok > 0,
        "no read completed in {c} rounds, even with the munmap {:?} after it started",
        (unraced * 64).min(prompt())
    );
    Ok(())
}

fn random_u32() -> u32 {
    let mut v = 0u32;
    // SAFETY: fills 4 bytes of a local.
    unsafe { libc::getrandom((&mut v as *mut u32).cast(), 4, 0) };
    v
}
