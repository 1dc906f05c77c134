// SPDX-License-Identifier: GPL-2.0

//! Device-private memory: migration to the device and back, CPU faults on
//! device pages, fork/COW of device pages, eviction on RELEASE and close,
//! the FAIL_ALLOC flag, and exclusive access. Small pages, but for
//! `migrate_thp`: the other buffers are MADV_NOHUGEPAGE.

use crate::check::{check_each, expect_errno};
use crate::dmirror::{page_size, Counters, Dmirror};
use crate::harness::{describe, fork_and_wait, Test, TestResult};
use crate::mem::{self, Mapping};
use crate::{ensure, ensure_eq};
use hmm_dmirror_uapi::*;
use std::io;

pub const TESTS: &[Test] = &[
    Test::new("devmem.migrate", migrate),
    Test::new("devmem.migrate_to_sys", migrate_back),
    Test::new("devmem.migrate_cpu_fault", migrate_cpu_fault),
    Test::new("devmem.migrate_write_on_device", migrate_write_on_device),
    Test::new("devmem.migrate_shared", migrate_shared),
    Test::new("devmem.migrate_prot_none", migrate_prot_none),
    Test::new("devmem.migrate_twice", migrate_twice),
    Test::new("devmem.fail_alloc", fail_alloc),
    Test::new("devmem.fail_alloc_nth_small", fail_alloc_nth_small),
    Test::new(
        "devmem.fail_alloc_nth_small_hole",
        fail_alloc_nth_small_hole,
    ),
    Test::new("devmem.fail_alloc_nth_thp", fail_alloc_nth_thp),
    Test::new("devmem.fail_alloc_nth_thp_hole", fail_alloc_nth_thp_hole),
    Test::new("devmem.migrate_pud_hole", migrate_pud_hole),
    Test::new("devmem.cow_in_device", cow_in_device),
    Test::new("devmem.release_evicts", release_evicts),
    Test::new("devmem.close_evicts", close_evicts),
    Test::new("devmem.other_device_faults_back", other_device_faults_back),
    Test::new(
        "devmem.refault_after_remote_migration",
        refault_after_remote_migration,
    ),
    Test::new("devmem.refault_after_mprotect", refault_after_mprotect),
    Test::new("devmem.refault_thp_offset", refault_thp_offset),
    Test::new(
        "devmem.sibling_migration_invalidates",
        sibling_migration_invalidates,
    ),
    Test::new("devmem.exclusive", exclusive),
    Test::new("devmem.exclusive_mprotect", exclusive_mprotect),
    Test::new("devmem.exclusive_fork", exclusive_fork),
    Test::new("devmem.migrate_thp", migrate_thp),
    Test::new("devmem.snapshot_remote_thp", snapshot_remote_thp),
    Test::new("devmem.hole_nohugepage", hole_nohugepage),
    Test::new("devmem.write_readonly_on_device", write_readonly_on_device),
    Test::new(
        "devmem.write_readonly_on_device_thp",
        write_readonly_on_device_thp,
    ),
    Test::new("devmem.write_after_fork", write_after_fork),
    Test::new("devmem.write_after_fork_thp", write_after_fork_thp),
];

/// 1 MiB: 256 pages, within one migration window.
pub(super) const SIZE: usize = 256 << 12;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// The part of a SNAPSHOT byte that tells where the page is.
pub(super) const KIND: u8 = 0xF0;

pub(super) fn npages(size: usize) -> usize {
    size / page_size()
}

/// An anonymous private buffer of `size` bytes, small pages only, its
/// words set to their index.
pub(super) fn buffer(size: usize) -> io::Result<Mapping> {
    let mut buf = Mapping::rw(size)?;
    mem::madvise(buf.addr(), size, libc::MADV_NOHUGEPAGE)?;
    for (i, w) in buf.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    Ok(buf)
}

/// The command `request` over the whole of `buf`, with `out` as its
/// buffer.
fn over_all(d: &Dmirror, request: u32, buf: &Mapping, out: &Mapping) -> io::Result<Counters> {
    d.cmd(request, buf.addr(), out.addr(), npages(buf.len()))
}

/// CHECK_EXCLUSIVE over the whole of `buf`: `EPERM` while the device
/// still has exclusive access to a page of it.
pub(super) fn check_exclusive(d: &Dmirror, buf: &Mapping, out: &Mapping) -> io::Result<Counters> {
    over_all(d, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, out)
}

pub(super) fn migrate_to_dev(d: &Dmirror, buf: &Mapping, out: &Mapping) -> io::Result<Counters> {
    over_all(d, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out)
}

pub(super) fn migrate_to_sys(d: &Dmirror, buf: &Mapping, out: &Mapping) -> io::Result<Counters> {
    over_all(d, HMM_DMIRROR_MIGRATE_TO_SYS, buf, out)
}

/// The SNAPSHOT byte of every page of `buf`.
pub(super) fn snapshot(d: &Dmirror, buf: &Mapping) -> Result<Vec<u8>, crate::harness::Failure> {
    let n = npages(buf.len());
    let out = Mapping::rw(n.max(1))?;
    let c = d.snapshot(buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    Ok(out.bytes()[..n].to_vec())
}

/// The page kind (SNAPSHOT's `KIND` bits) of each of the `n` pages at
/// `addr`, as `d` sees them.
pub(super) fn page_kinds(
    d: &Dmirror,
    addr: usize,
    n: usize,
) -> Result<Vec<u8>, crate::harness::Failure> {
    let snap = Mapping::rw(n.max(1))?;
    let c = d.snapshot(addr, snap.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    Ok(snap.bytes()[..n].iter().map(|b| b & KIND).collect())
}

/// Checks that every page of `buf` is (or is not) in device 0's memory.
pub(super) fn check_on_device(d: &Dmirror, buf: &Mapping, on_device: bool) -> TestResult {
    let want = |_| {
        if on_device {
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
        } else {
            HMM_DMIRROR_PROT_NONE
        }
    };
    let kinds = page_kinds(d, buf.addr(), npages(buf.len()))?;
    check_each("snapshot page kind", &kinds, want)
}

/// Migrates a buffer to the device: the device reads it back through the
/// pages it now owns, and SNAPSHOT shows them as local device pages.
fn migrate() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    let c = migrate_to_dev(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("device read after migration", out.words(), |i| i as u32)?;
    let snap = snapshot(&d, &buf)?;
    check_each("snapshot", &snap, |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE
    })
}

/// MIGRATE_TO_SYS brings every page back: `cpages` counts them, the data
/// is intact and no page is left on the device.
fn migrate_back() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let c = migrate_to_sys(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_on_device(&d, &buf, false)?;
    check_each("CPU read after migrating back", buf.words(), |i| i as u32)?;
    // Nothing left to move.
    let c = migrate_to_sys(&d, &buf, &out)?;
    ensure_eq!(c.cpages, 0);
    Ok(())
}

/// Device 1's SNAPSHOT of a huge page in device 0's memory: not present
/// (`NONE`), as for device 0's small pages (upstream's `hmm2.snapshot`).
/// 7.3 reported `ERROR` for the PMD, as if nothing were mapped there
/// (fixed by patches/0006).
fn snapshot_remote_thp() -> TestResult {
    let d0 = Dmirror::open(0)?;
    let d1 = Dmirror::open(1)?;
    let (_region, addr) = thp_buffer(&d0)?;
    let n = npages(mem::pmd_size());
    let out = Mapping::rw(mem::pmd_size())?;
    d0.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    let snap = Mapping::rw(n)?;
    d0.snapshot(addr, snap.addr(), n)?;
    check_each("device 0's snapshot", &snap.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD
    })?;
    d1.snapshot(addr, snap.addr(), n)?;
    check_each("device 1's snapshot", &snap.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_NONE
    })
}

/// A PMD-sized hole under MADV_NOHUGEPAGE migrates to the device as
/// small pages, and comes back as small pages: no huge page where the
/// process asked for none. 7.3 collected the hole whole, and the device
/// got a huge folio, PMD-mapped (fixed by patches/0007).
fn hole_nohugepage() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = mem::pmd_size();
    let region = Mapping::rw(2 * size)?;
    let addr = mem::align_up(region.addr(), size);
    mem::madvise(addr, size, libc::MADV_NOHUGEPAGE)?;
    let n = npages(size);
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    check_each("snapshot on the device", &snap.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE
    })?;
    d.cmd(HMM_DMIRROR_MIGRATE_TO_SYS, addr, out.addr(), n)?;
    d.snapshot(addr, snap.addr(), n)?;
    let huge: Vec<bool> = snap.bytes()[..n]
        .iter()
        .map(|b| b & HMM_DMIRROR_PROT_PMD != 0)
        .collect();
    check_each("PMD-mapped after migrating back", &huge, |_| false)
}

/// The allocation that `HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH` fails in the
/// `fail_alloc_nth_*` cases: the middle of a window or of a huge page.
const NTH: u16 = 100;

/// The `fail_alloc_nth_*` cases need this module's FLAGS extension.
fn need_fail_alloc_nth() -> TestResult {
    if !std::path::Path::new("/sys/module/rust_hmm_dmirror").exists() {
        crate::skip!(
            "HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH is the Rust module's test extension; C's FLAGS ignores it"
        );
    }
    Ok(())
}

/// Small pages, present: allocation NTH fails after NTH - 1 destinations
/// of the window were set. That page stays; every other one moves, with
/// its data.
fn fail_alloc_nth_small() -> TestResult {
    need_fail_alloc_nth()?;
    let buf = buffer(SIZE)?;
    fail_alloc_nth_at(buf.addr(), SIZE, false, 0)
}

/// The same over holes: the pages that move are zero-filled.
fn fail_alloc_nth_small_hole() -> TestResult {
    need_fail_alloc_nth()?;
    let buf = Mapping::rw(SIZE)?;
    mem::madvise(buf.addr(), SIZE, libc::MADV_NOHUGEPAGE)?;
    fail_alloc_nth_at(buf.addr(), SIZE, true, 0)
}

/// A transparent huge page: FAIL_ALLOC fails the large folio, the
/// fallback to small pages fails at NTH, in the middle of the huge page.
/// The pages before it move, the source folio is split, the rest stays.
fn fail_alloc_nth_thp() -> TestResult {
    need_fail_alloc_nth()?;
    let d = Dmirror::open(0)?;
    let (_region, addr) = thp_buffer(&d)?;
    fail_alloc_nth_at(addr, mem::pmd_size(), false, HMM_DMIRROR_FLAG_FAIL_ALLOC)
}

/// A PMD-sized hole (collected whole): the fallback fills it with small
/// pages up to NTH, and the rest stays a hole. Plain 7.3 follows a null
/// destination there and oopses (fixed by patch 0010).
fn fail_alloc_nth_thp_hole() -> TestResult {
    need_fail_alloc_nth()?;
    let size = mem::pmd_size();
    let region = Mapping::rw(2 * size)?;
    let addr = mem::align_up(region.addr(), size);
    mem::madvise(addr, size, libc::MADV_HUGEPAGE)?;
    fail_alloc_nth_at(addr, size, true, HMM_DMIRROR_FLAG_FAIL_ALLOC)
}

/// Two PMDs of untouched memory alone under their PUD: the walk reports
/// them as one hole of 4 MiB. A migration window that covers both (the
/// Rust module's does; C's stops at 2 MiB) must move both. Plain 7.3
/// collects such a hole as one huge page and moves only the first 2 MiB
/// (fixed by patch 0011): the read-back then finds the rest missing.
fn migrate_pud_hole() -> TestResult {
    let pmd = mem::pmd_size();
    let (pud, size) = (1usize << 30, 2 * pmd);
    let n = npages(size);
    // PROT_NONE keeps the rest of the reservation free of page tables.
    let reserve = Mapping::anon(2 * pud, libc::PROT_NONE)?;
    let addr = mem::align_up(reserve.addr(), pud);
    mem::map_anon_at(addr, size, libc::MAP_FIXED)?;
    mem::madvise(addr, size, libc::MADV_HUGEPAGE)?;
    let d = Dmirror::open(0)?;
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read of the migrated hole", out.words(), |_| 0)?;
    let kinds = page_kinds(&d, addr, n)?;
    check_each("page kind after the migration", &kinds, |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
    })?;
    // SAFETY: [addr, addr + size) is mapped readable above.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    check_each("CPU read", words, |_| 0)
}

/// MIGRATE_TO_DEV of `[addr, addr + size)` (words hold their index, or
/// zero for a `hole`) with allocation NTH failing, on top of `flags`.
/// It ends with ENOENT (a page did not move, as C). SNAPSHOT shows which
/// pages moved; the CPU reads every word intact; a second migration moves
/// everything and the device reads it intact too.
fn fail_alloc_nth_at(addr: usize, size: usize, hole: bool, flags: u64) -> TestResult {
    let d = Dmirror::open(0)?;
    let n = npages(size);
    let nth = usize::from(NTH);
    let want_word = |i: usize| if hole { 0 } else { i as u32 };
    let out = Mapping::rw(size)?;
    let flags = flags | hmm_dmirror_fail_alloc_nth(NTH);
    d.cmd(HMM_DMIRROR_FLAGS, addr, out.addr(), flags as usize)?;
    expect_errno(
        d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n),
        libc::ENOENT,
        "migration with a failed allocation",
    )?;
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    let huge = flags & HMM_DMIRROR_FLAG_FAIL_ALLOC != 0;
    // The fallback to small pages stops at the failed allocation.
    let moved = |i: usize| if huge { i < nth - 1 } else { i != nth - 1 };
    let kinds: Vec<bool> = snap.bytes()[..n]
        .iter()
        .map(|b| b & KIND == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL)
        .collect();
    check_each("on the device after the failed allocation", &kinds, moved)?;
    let device_reads = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, device_reads.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each(
        "device read after migrating again",
        device_reads.words(),
        want_word,
    )?;
    // SAFETY: [addr, addr + size) is mapped readable by the caller.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    check_each("CPU read", words, want_word)
}

/// The CPU touching device pages faults them back one by one
/// (`migrate_to_ram`); the ones it did not touch stay on the device.
fn migrate_cpu_fault() -> TestResult {
    let d = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let half = buf.words().len() / 2;
    check_each("CPU read of the first half", &buf.words()[..half], |i| {
        i as u32
    })?;
    let snap = snapshot(&d, &buf)?;
    let n = npages(SIZE);
    for (i, &b) in snap.iter().enumerate() {
        let want = if i < n / 2 {
            HMM_DMIRROR_PROT_NONE
        } else {
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
        };
        ensure_eq!(b & KIND, want, "page {i}");
    }
    // A CPU write faults the rest back, and the data is the device's.
    for w in buf.words_mut()[half..].iter_mut() {
        *w = w.wrapping_add(1);
    }
    check_each("CPU data", buf.words(), |i| {
        if i < half {
            i as u32
        } else {
            i as u32 + 1
        }
    })?;
    check_on_device(&d, &buf, false)
}

/// A device WRITE to pages on the device changes the device copy, which
/// the CPU sees once it faults the pages back.
fn migrate_write_on_device() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let mut out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    for (i, w) in out.words_mut().iter_mut().enumerate() {
        *w = !(i as u32);
    }
    let c = d.write(buf.addr(), out.addr(), npages(SIZE))?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_on_device(&d, &buf, true)?;
    check_each("CPU read of the device's write", buf.words(), |i| {
        !(i as u32)
    })
}

/// Shared anonymous memory does not migrate: MIGRATE_TO_DEV fails with
/// ENOENT when it reads back the pages it could not move.
fn migrate_shared() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = Mapping::new(SIZE, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)?;
    let out = Mapping::rw(SIZE)?;
    expect_errno(migrate_to_dev(&d, &buf, &out), libc::ENOENT, "shared")
}

/// A PROT_NONE range cannot be migrated: EINVAL, in either direction.
fn migrate_prot_none() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    buf.protect(libc::PROT_NONE)?;
    expect_errno(migrate_to_dev(&d, &buf, &out), libc::EINVAL, "to device")?;
    expect_errno(migrate_to_sys(&d, &buf, &out), libc::EINVAL, "to system")
}

/// Migrating pages that are already on the device leaves them there, and
/// the device still reads them.
fn migrate_twice() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let mut out2 = Mapping::rw(SIZE)?;
    out2.bytes_mut().fill(0xAA);
    let c = migrate_to_dev(&d, &buf, &out2)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("device read", out2.words(), |i| i as u32)?;
    check_on_device(&d, &buf, true)
}

/// FLAG_FAIL_ALLOC fails the next device page allocation once, here in
/// the middle of a window: the first pages are on the device already (a
/// migration allocates nothing for them), so the failure hits page
/// `FIRST`. That page stays (ENOENT), every other one moves, the data is
/// intact, and the next migration moves the rest.
fn fail_alloc() -> TestResult {
    const FIRST: usize = 100;
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, buf.addr(), out.addr(), FIRST)?;
    ensure_eq!(c.cpages, FIRST as u64);
    d.cmd(
        HMM_DMIRROR_FLAGS,
        buf.addr(),
        out.addr(),
        HMM_DMIRROR_FLAG_FAIL_ALLOC as usize,
    )?;
    expect_errno(
        migrate_to_dev(&d, &buf, &out),
        libc::ENOENT,
        "failed allocation",
    )?;
    let kinds = page_kinds(&d, buf.addr(), npages(SIZE))?;
    check_each("page kind after the failed allocation", &kinds, |i| {
        if i == FIRST {
            HMM_DMIRROR_PROT_NONE
        } else {
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
        }
    })?;
    check_each("CPU read", buf.words(), |i| i as u32)?;
    let c = migrate_to_dev(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_on_device(&d, &buf, true)?;
    check_each("device read", out.words(), |i| i as u32)
}

/// Device pages of a private mapping are shared copy-on-write after fork:
/// right after it the child's own mirror sees them in the device's memory,
/// read-only (SNAPSHOT does not fault); each side that touches them gets
/// its data from system memory, the child's writes stay its own, and the
/// parent's device reads its data before its CPU touches anything.
fn cow_in_device() -> TestResult {
    let d = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let n = npages(SIZE);
    let words = buf.words_mut();
    let (addr, len) = (words.as_mut_ptr() as usize, words.len());
    let status = fork_and_wait(|| {
        let child = Dmirror::open(0)?;
        let snap = Mapping::rw(n)?;
        child.snapshot(addr, snap.addr(), n)?;
        check_each(
            "the child's snapshot right after fork",
            &snap.bytes()[..n],
            |_| HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_READ,
        )?;
        // SAFETY: the child's copy of the parent's buffer.
        let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, len) };
        check_each("child reads the device data", words, |i| i as u32)?;
        for w in words.iter_mut() {
            *w = w.wrapping_mul(3);
        }
        check_each("child's own copy", words, |i| (i as u32).wrapping_mul(3))
    })?;
    ensure!(status == 0, "child {}", describe(status));
    let c = d.read(buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read in the parent", out.words(), |i| i as u32)?;
    check_each("parent's data after the child wrote", buf.words(), |i| {
        i as u32
    })
}

/// RELEASE evicts every device page back to system memory.
fn release_evicts() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    d.cmd(HMM_DMIRROR_RELEASE, buf.addr(), out.addr(), 1)?;
    check_on_device(&d, &buf, false)?;
    check_each("CPU read after RELEASE", buf.words(), |i| i as u32)?;
    // Device memory comes back on demand.
    let c = migrate_to_dev(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_on_device(&d, &buf, true)
}

/// Closing a file evicts the pages of its device.
fn close_evicts() -> TestResult {
    let watcher = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    let d = Dmirror::open(0)?;
    migrate_to_dev(&d, &buf, &out)?;
    check_on_device(&watcher, &buf, true)?;
    d.close()?;
    check_on_device(&watcher, &buf, false)?;
    check_each("CPU read after close", buf.words(), |i| i as u32)
}

/// Another device reading pages of device 0 faults them back to system
/// memory first.
fn other_device_faults_back() -> TestResult {
    let d0 = Dmirror::open(0)?;
    let d1 = Dmirror::open(1)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d0, &buf, &out)?;
    let out1 = Mapping::rw(SIZE)?;
    let c = d1.read(buf.addr(), out1.addr(), npages(SIZE))?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("device 1 read", out1.words(), |i| i as u32)?;
    check_on_device(&d0, &buf, false)
}

/// Device 1 migrating pages that sit in device 0's memory moves none of
/// them (`ENOENT`), but its invalidation erases device 0's mirror of
/// them. Device 0's READ and WRITE must then fault its own pages back
/// into its mirror and reach their data. C's dmirror_do_fault() mirrored
/// the device-private pages themselves and copied through their
/// (nonexistent) kernel mapping: an Oops, fixed by patches/0005.
fn refault_after_remote_migration() -> TestResult {
    let d0 = Dmirror::open(0)?;
    let d1 = Dmirror::open(1)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d0, &buf, &out)?;
    let erase = || {
        expect_errno(
            migrate_to_dev(&d1, &buf, &out),
            libc::ENOENT,
            "device 1 migrating device 0's pages",
        )
    };
    erase()?;
    check_on_device(&d0, &buf, true)?;
    refault_read(&d0, &buf)?;
    erase()?;
    refault_write(&d0, &buf)
}

/// The same after mprotect() erased the mirror: READ on the read-only
/// pages, then WRITE once they are writable again.
fn refault_after_mprotect() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    buf.protect(libc::PROT_READ)?;
    check_on_device(&d, &buf, true)?;
    refault_read(&d, &buf)?;
    buf.protect(RW)?;
    refault_write(&d, &buf)
}

/// READ from inside a device THP after mprotect() erased its mirror:
/// every page reads its own words. 7.3's hmm_vma_handle_absent_pmd()
/// filled a device-private PMD's pfns from its first page whatever the
/// range's start, so a window that starts k pages in mirrored the pages k
/// before (patch 0008 fixes it).
fn refault_thp_offset() -> TestResult {
    let d = Dmirror::open(0)?;
    let (_region, addr) = thp_buffer(&d)?;
    let size = mem::pmd_size();
    let n = npages(size);
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    mem::protect(addr, size, libc::PROT_READ)?;
    let snap = Mapping::rw(1)?;
    d.snapshot(addr, snap.addr(), 1)?;
    ensure_eq!(
        snap.bytes()[0],
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_READ | HMM_DMIRROR_PROT_PMD
    );
    let (first, count) = (7, 9);
    let words_per_page = page_size() / 4;
    let out = Mapping::rw(count * page_size())?;
    let c = d.read(addr + first * page_size(), out.addr(), count)?;
    ensure_eq!(c.cpages, count as u64);
    check_each("device read from page 7 of the THP", out.words(), |i| {
        (first * words_per_page + i) as u32
    })
}

/// Two files of one device: a migration through one, and the CPU faults
/// that bring the pages back, erase the other's mirror of the old pages.
/// Plain 7.3's C notifier ignored every MMU_NOTIFY_MIGRATE whose owner is
/// its device, whichever file started it: file a read the freed system
/// pages (patch 0013 fixes it).
fn sibling_migration_invalidates() -> TestResult {
    let a = Dmirror::open(0)?;
    let b = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    refault_read(&a, &buf)?;
    migrate_to_dev(&b, &buf, &out)?;
    for w in buf.words_mut() {
        *w = !*w;
    }
    let c = a.read(buf.addr(), out.addr(), npages(SIZE))?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("file a's read after file b migrated", out.words(), |i| {
        !(i as u32)
    })
}

/// READ of `buf`, whose words hold their index, through `d`.
pub(super) fn refault_read(d: &Dmirror, buf: &Mapping) -> TestResult {
    let out = Mapping::rw(buf.len())?;
    let c = d.read(buf.addr(), out.addr(), npages(buf.len()))?;
    ensure_eq!(c.cpages, npages(buf.len()) as u64);
    check_each("device read", out.words(), |i| i as u32)
}

/// WRITE of new words over `buf` through `d`: the CPU reads them back.
fn refault_write(d: &Dmirror, buf: &Mapping) -> TestResult {
    let new = |i: usize| !(i as u32);
    let mut src = Mapping::rw(buf.len())?;
    for (i, w) in src.words_mut().iter_mut().enumerate() {
        *w = new(i);
    }
    let c = d.write(buf.addr(), src.addr(), npages(buf.len()))?;
    ensure_eq!(c.cpages, npages(buf.len()) as u64);
    check_each("CPU read after the device's write", buf.words(), new)
}

/// EXCLUSIVE gives the device atomic access; a CPU access takes it back.
fn exclusive() -> TestResult {
    let d = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    let c = d.cmd(HMM_DMIRROR_EXCLUSIVE, buf.addr(), out.addr(), npages(SIZE))?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("device read under exclusive access", out.words(), |i| {
        i as u32
    })?;
    expect_errno(
        check_exclusive(&d, &buf, &out),
        libc::EPERM,
        "still exclusive",
    )?;
    for w in buf.words_mut() {
        *w = w.wrapping_add(1);
    }
    check_each("CPU write after exclusive", buf.words(), |i| i as u32 + 1)?;
    check_exclusive(&d, &buf, &out)?;
    Ok(())
}

/// Exclusive access over a range made read-only is gone: a device write
/// then fails with EPERM. CHECK_EXCLUSIVE sees the access before the
/// mprotect, so a module whose EXCLUSIVE did nothing fails.
fn exclusive_mprotect() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    d.cmd(HMM_DMIRROR_EXCLUSIVE, buf.addr(), out.addr(), npages(SIZE))?;
    expect_errno(
        check_exclusive(&d, &buf, &out),
        libc::EPERM,
        "CHECK_EXCLUSIVE right after EXCLUSIVE",
    )?;
    buf.protect(libc::PROT_READ)?;
    expect_errno(
        d.write(buf.addr(), out.addr(), npages(SIZE)),
        libc::EPERM,
        "device write to a read-only range",
    )?;
    check_exclusive(&d, &buf, &out)?;
    Ok(())
}

/// fork() over pages under exclusive access gives them back to the CPU
/// (copy-on-write): CHECK_EXCLUSIVE finds the access before the fork and
/// none after it, before the parent touches anything; parent and child
/// keep their own data.
fn exclusive_fork() -> TestResult {
    let d = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    d.cmd(HMM_DMIRROR_EXCLUSIVE, buf.addr(), out.addr(), npages(SIZE))?;
    expect_errno(
        check_exclusive(&d, &buf, &out),
        libc::EPERM,
        "CHECK_EXCLUSIVE right after EXCLUSIVE",
    )?;
    let words = buf.words_mut();
    let (addr, len) = (words.as_mut_ptr() as usize, words.len());
    let status = fork_and_wait(|| {
        // SAFETY: the child's copy of the parent's buffer.
        let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, len) };
        check_each("child's data", words, |i| i as u32)?;
        for w in words.iter_mut() {
            *w = 0;
        }
        Ok(())
    })?;
    ensure!(status == 0, "child {}", describe(status));
    check_exclusive(&d, &buf, &out)?;
    for w in buf.words_mut() {
        *w = w.wrapping_add(1);
    }
    check_each("parent's data", buf.words(), |i| i as u32 + 1)
}

/// A PMD-mapped THP migrates whole: the device maps it with a PMD. A
/// partial munmap splits the device folio; the rest faults back intact.
fn migrate_thp() -> TestResult {
    let d = Dmirror::open(0)?;
    let size = mem::pmd_size();
    let (_region, addr) = thp_buffer(&d)?;
    // SAFETY: [addr, addr+size) lies inside _region, mapped readable;
    // only the part left mapped is read after the munmap below.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    let n = npages(size);
    let snap = Mapping::rw(n)?;
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read", out.words(), |i| i as u32)?;
    d.snapshot(addr, snap.addr(), n)?;
    check_each("snapshot", &snap.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD
    })?;
    // Unmap the first quarter: the device folio is split, and the rest
    // stays in the device's memory, mapped by small pages.
    let quarter = size / 4;
    mem::unmap(addr, quarter)?;
    let m = npages(size - quarter);
    d.snapshot(addr + quarter, snap.addr(), m)?;
    check_each(
        "snapshot of the rest after the split",
        &snap.bytes()[..m],
        |_| HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE,
    )?;
    let rest = &words[quarter / 4..];
    check_each("CPU read of the rest", rest, |i| (i + quarter / 4) as u32)
}

/// WRITE of a page that the CPU maps read-only while it sits in the
/// device's own memory: EPERM, as for any write to memory the CPU maps
/// read-only, and the data stays intact. 7.3's hmm_range_fault() handed
/// the page back read-only for the write request (patch 0004 fixes it):
/// the Rust module faulted it again for ever, unkillable (issue 19), and
/// C WARNed at lib/test_hmm.c:296.
fn write_readonly_on_device() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    write_readonly_on_device_at(&d, buf.addr(), SIZE, 0)
}

/// The same on a THP: the device maps the whole folio read-only with a
/// PMD, and the WRITE is of one page inside it.
fn write_readonly_on_device_thp() -> TestResult {
    let d = Dmirror::open(0)?;
    let (_region, addr) = thp_buffer(&d)?;
    write_readonly_on_device_at(&d, addr, mem::pmd_size(), HMM_DMIRROR_PROT_PMD)
}

/// A PMD-sized, PMD-aligned THP whose words hold their index: the mapping
/// that holds it and its address. Skips when the kernel gave small pages
/// (smaps says so, not the module); fails when it gave a THP that the
/// module's SNAPSHOT does not report as one.
pub(super) fn thp_buffer(d: &Dmirror) -> Result<(Mapping, usize), crate::harness::Failure> {
    let size = mem::pmd_size();
    let region = Mapping::rw(2 * size)?;
    let addr = mem::align_up(region.addr(), size);
    mem::madvise(addr, size, libc::MADV_HUGEPAGE)?;
    // SAFETY: [addr, addr+size) lies inside region and is writable.
    let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, size / 4) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = i as u32;
    }
    if mem::anon_huge_bytes(addr)? < size {
        crate::skip!(
            "no transparent huge page at {addr:#x} (THP {})",
            mem::thp_enabled()
        );
    }
    let snap = Mapping::rw(1)?;
    d.snapshot(addr, snap.addr(), 1)?;
    ensure!(
        snap.bytes()[0] & HMM_DMIRROR_PROT_PMD != 0,
        "SNAPSHOT of a PMD-mapped THP: {:#x}, no PMD bit",
        snap.bytes()[0]
    );
    Ok((region, addr))
}

/// `[addr, addr + size)` holds its word indices: make it read-only,
/// migrate it to device 0 (SNAPSHOT: local device pages, read-only, with
/// `huge` set as expected), then WRITE one page in it must fail with EPERM
/// and leave every word where it was, for the device and for the CPU.
fn write_readonly_on_device_at(d: &Dmirror, addr: usize, size: usize, huge: u8) -> TestResult {
    let n = npages(size);
    mem::protect(addr, size, libc::PROT_READ)?;
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    check_each("snapshot", &snap.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_READ | huge
    })?;
    let page = 5 * page_size();
    let src = Mapping::rw(page_size())?;
    expect_errno(
        d.write(addr + page, src.addr(), 1),
        libc::EPERM,
        "WRITE of a read-only device page",
    )?;
    let c = d.read(addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read after the refused write", out.words(), |i| {
        i as u32
    })?;
    // SAFETY: [addr, addr+size) is mapped readable for as long as the
    // caller's mapping lives, which outlives this borrow.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    check_each("CPU read after the refused write", words, |i| i as u32)
}

/// WRITE through the device after fork() made the device pages
/// copy-on-write: the write faults them back and breaks COW, and the CPU
/// sees what the device wrote. Patch 0004: 7.3 handed the pages back
/// read-only (the Rust module answered EPERM, C WARNed).
fn write_after_fork() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    write_after_fork_at(&d, buf.addr(), SIZE, 0)
}

/// The same on a THP in device memory, one device-private PMD.
fn write_after_fork_thp() -> TestResult {
    let d = Dmirror::open(0)?;
    let (_region, addr) = thp_buffer(&d)?;
    write_after_fork_at(&d, addr, mem::pmd_size(), HMM_DMIRROR_PROT_PMD)
}

/// `[addr, addr + size)` holds its word indices: migrate it to device 0,
/// fork a child that exits at once (SNAPSHOT: the device pages are now
/// read-only, with `huge` set as expected), then WRITE all of it through
/// the device and read it back through the CPU.
fn write_after_fork_at(d: &Dmirror, addr: usize, size: usize, huge: u8) -> TestResult {
    let n = npages(size);
    let mut out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let status = fork_and_wait(|| Ok(()))?;
    ensure!(status == 0, "child {}", describe(status));
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    check_each("snapshot after fork", &snap.bytes()[..n], |_| {
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_READ | huge
    })?;
    for (i, w) in out.words_mut().iter_mut().enumerate() {
        *w = !(i as u32);
    }
    let c = d.write(addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    // SAFETY: [addr, addr+size) is mapped readable for as long as the
    // caller's mapping lives, which outlives this borrow.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    check_each("CPU read of the device's write", words, |i| !(i as u32))
}
