// SPDX-License-Identifier: GPL-2.0

//! READ and WRITE through the mirror: ports of upstream hmm-tests.c
//! (device-private variant, without migration).

use crate::check::{check_each, expect_errno};
use crate::dmirror::{page_size, Dmirror};
use crate::harness::{describe, fork_and_wait, Test, TestResult};
use crate::mem::{self, align_up, Mapping};
use crate::{diag, ensure, ensure_eq, skip};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

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

fn open_close() -> TestResult {
    let d = Dmirror::open(0)?;
    d.close()?;
    // Opening twice gives two independent mirrors.
    let (a, b) = (Dmirror::open(0)?, Dmirror::open(0)?);
    a.close()?;
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
/// keeps its data. Run with and without THP.
fn anon_write_child() -> TestResult {
    for thp in [false, true] {
        let size = if thp { mem::pmd_size() } else { BUFFER_SIZE };
        let n = npages(size);
        let region = Mapping::rw(2 * size)?;
        let addr = align_up(region.addr(), size);
        if thp {
            mem::madvise(addr, size, libc::MADV_HUGEPAGE)?;
        }
        // SAFETY: [addr, addr+size) lies inside region and is writable.
        let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, size / 4) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = i as u32;
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
    }
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

fn anon_write_huge() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = mem::pmd_size();
    let n = npages(size);
    let region = Mapping::rw(2 * size)?;
    let addr = align_up(region.addr(), size);
    mem::madvise(addr, size, libc::MADV_HUGEPAGE)?;
    let mut mirror = Mapping::rw(size)?;
    for (i, w) in mirror.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let c = d.write(addr, mirror.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    ensure_eq!(c.faults, 1);
    // SAFETY: inside region, readable.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
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

/// Read while another thread unmaps half the buffer: the read either
/// completes with the right data or fails with EFAULT; it never hangs.
fn anon_teardown() -> TestResult {
    let d = Arc::new(Dmirror::open(0)?);
    let size = BUFFER_SIZE;
    let (mut ok, mut efault) = (0, 0);
    for c in 0..10u32 {
        let mut buf = Mapping::rw(size)?;
        let mirror = Mapping::rw(size)?;
        for (i, w) in buf.words_mut().iter_mut().enumerate() {
            *w = i as u32 + c;
        }
        let (addr, len) = buf.leak();
        let delay = Duration::from_nanos(random_u32() as u64 % 32_000);
        let unmapper = std::thread::spawn(move || {
            std::thread::sleep(delay);
            mem::unmap(addr + len / 2, len / 2)
        });
        let r = d.read(addr, mirror.addr(), npages(size));
        unmapper
            .join()
            .map_err(|_| "unmapper panicked".to_string())??;
        match r {
            Ok(r) => {
                ok += 1;
                ensure_eq!(r.cpages, npages(size) as u64);
                ensure_eq!(r.faults, 1);
                check_each(&format!("round {c}"), mirror.words(), |i| i as u32 + c)?;
            }
            Err(e) => {
                expect_errno(Err::<(), _>(e), libc::EFAULT, "read racing munmap")?;
                efault += 1;
            }
        }
        mem::unmap(addr, len / 2)?;
    }
    diag!("{ok} reads completed, {efault} failed with EFAULT");
    Ok(())
}

fn random_u32() -> u32 {
    let mut v = 0u32;
    // SAFETY: fills 4 bytes of a local.
    unsafe { libc::getrandom((&mut v as *mut u32).cast(), 4, 0) };
    v
}
