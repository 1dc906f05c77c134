// SPDX-License-Identifier: GPL-2.0

//! Device-coherent memory (devices 2 and 3): one fixed range per device
//! that serves THPs and small pages alike, and that the CPU maps.
//! lib/test_hmm.c fails each of these: it carves its coherent range into
//! small pages only and maps the same range again for a THP (WARN, then
//! the small-page fallback dereferences NULL), and after RELEASE it
//! re-creates the range for whatever size comes first. The cases skip
//! when the module was loaded without `spm_addr_dev0`/`spm_addr_dev1`.

use super::devmem::{buffer, npages, thp_buffer, KIND, SIZE};
use crate::check::{check_each, expect_errno};
use crate::dmirror::Dmirror;
use crate::harness::{Test, TestResult};
use crate::mem::{self, Mapping};
use crate::{ensure, ensure_eq};
use hmm_dmirror_uapi::*;

pub const TESTS: &[Test] = &[
    Test::new("coherent.migrate_small", migrate_small),
    Test::new("coherent.migrate_thp", migrate_thp),
    Test::new("coherent.thp_after_small", thp_after_small),
    Test::new("coherent.small_after_release", small_after_release),
    Test::new("coherent.partial_unmap_thp", partial_unmap_thp),
    Test::new("coherent.remote", remote),
    Test::new("coherent.exclusive", exclusive),
];

/// The coherent device `unit` (2 or 3), or a skip when the module has
/// none.
fn open(unit: u32) -> Result<Dmirror, crate::harness::Failure> {
    if !std::path::Path::new(&Dmirror::path(unit)).exists() {
        crate::skip!("no device-coherent memory (load the module with spm_addr_dev0/1)");
    }
    Ok(Dmirror::open(unit)?)
}

const LOCAL_RW: u8 = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE;

/// Migrates the `size` bytes at `addr`, whose words hold their index, to
/// `d`: every page moves, the device reads them back, SNAPSHOT shows them
/// in the device's own coherent memory (`huge`: mapped by a PMD), and the
/// CPU reads them where they are, without a fault.
fn migrate_in(d: &Dmirror, addr: usize, size: usize, huge: u8) -> TestResult {
    let n = npages(size);
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read", out.words(), |i| i as u32)?;
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    check_each("snapshot", &snap.bytes()[..n], |_| LOCAL_RW | huge)?;
    // SAFETY: [addr, addr + size) is mapped readable by the caller.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    check_each("CPU read on the device", words, |i| i as u32)
}

/// Migrates the `size` bytes at `addr` back: `cpages` counts every page,
/// SNAPSHOT shows system memory and the data is intact.
fn migrate_out(d: &Dmirror, addr: usize, size: usize) -> TestResult {
    let n = npages(size);
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_SYS, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    let kinds: Vec<u8> = snap.bytes()[..n].iter().map(|b| b & KIND).collect();
    check_each("snapshot page kind after MIGRATE_TO_SYS", &kinds, |_| {
        HMM_DMIRROR_PROT_NONE
    })?;
    // SAFETY: [addr, addr + size) is mapped readable by the caller.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u32, size / 4) };
    check_each("CPU read after MIGRATE_TO_SYS", words, |i| i as u32)
}

/// Small pages there and back.
fn migrate_small() -> TestResult {
    let d = open(2)?;
    let buf = buffer(SIZE)?;
    migrate_in(&d, buf.addr(), SIZE, 0)?;
    migrate_out(&d, buf.addr(), SIZE)
}

/// A THP moves as one coherent THP, mapped by a PMD, and back whole.
/// Plain 7.3 never collected the PMD for the way back (patch 0016):
/// MIGRATE_TO_SYS moved nothing.
fn migrate_thp() -> TestResult {
    let d = open(2)?;
    let (_region, addr) = thp_buffer(&d)?;
    migrate_in(&d, addr, mem::pmd_size(), HMM_DMIRROR_PROT_PMD)?;
    migrate_out(&d, addr, mem::pmd_size())
}

/// Small pages on the device do not keep a THP out: the range serves
/// both sizes at once. C maps its coherent range a second time here.
fn thp_after_small() -> TestResult {
    let d = open(2)?;
    let small = buffer(SIZE)?;
    migrate_in(&d, small.addr(), SIZE, 0)?;
    let (_region, addr) = thp_buffer(&d)?;
    migrate_in(&d, addr, mem::pmd_size(), HMM_DMIRROR_PROT_PMD)?;
    migrate_out(&d, addr, mem::pmd_size())?;
    migrate_out(&d, small.addr(), SIZE)
}

/// RELEASE evicts every page to system memory, and the range then
/// serves a THP first and small pages after it. C re-creates its range
/// after RELEASE for the first request's size only, so the small pages
/// fail.
fn small_after_release() -> TestResult {
    let d = open(2)?;
    let small = buffer(SIZE)?;
    migrate_in(&d, small.addr(), SIZE, 0)?;
    let out = Mapping::rw(SIZE)?;
    d.cmd(HMM_DMIRROR_RELEASE, small.addr(), out.addr(), npages(SIZE))?;
    let kinds = super::devmem::page_kinds(&d, small.addr(), npages(SIZE))?;
    check_each("page kind after RELEASE", &kinds, |_| HMM_DMIRROR_PROT_NONE)?;
    check_each("CPU read after RELEASE", small.words(), |i| i as u32)?;
    let (_region, addr) = thp_buffer(&d)?;
    migrate_in(&d, addr, mem::pmd_size(), HMM_DMIRROR_PROT_PMD)?;
    migrate_in(&d, small.addr(), SIZE, 0)?;
    migrate_out(&d, small.addr(), SIZE)?;
    migrate_out(&d, addr, mem::pmd_size())
}

/// Unmapping a quarter of a coherent THP splits its PMD: the rest stays on
/// the device, intact, and goes back page by page. Then the freed folio's
/// pages serve another THP. Plain 7.3 put the partly unmapped coherent
/// folio on the deferred split queue, which nothing took it off again
/// (patch 0015): the next THP's queueing corrupted the list (a
/// `list_add` WARNING, which fails the VM run).
fn partial_unmap_thp() -> TestResult {
    let d = open(2)?;
    let size = mem::pmd_size();
    for round in 0..2 {
        let (_region, addr) = thp_buffer(&d)?;
        migrate_in(&d, addr, size, HMM_DMIRROR_PROT_PMD)?;
        let quarter = size / 4;
        mem::unmap(addr, quarter)?;
        let rest = addr + quarter;
        let n = npages(size - quarter);
        let snap = Mapping::rw(n)?;
        d.snapshot(rest, snap.addr(), n)?;
        check_each("snapshot of the rest", &snap.bytes()[..n], |_| LOCAL_RW)?;
        // SAFETY: [rest, addr + size) stays mapped, inside _region.
        let words = unsafe { std::slice::from_raw_parts(rest as *const u32, (size - quarter) / 4) };
        check_each("CPU read of the rest", words, |i| (i + quarter / 4) as u32)?;
        let out = Mapping::rw(size - quarter)?;
        let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_SYS, rest, out.addr(), n)?;
        ensure!(
            c.cpages == n as u64,
            "round {round}: cpages {} of {n}",
            c.cpages
        );
        check_each("CPU read after MIGRATE_TO_SYS", words, |i| {
            (i + quarter / 4) as u32
        })?;
    }
    Ok(())
}

/// A page in device 3's coherent memory is remote to device 2: SNAPSHOT
/// through device 2 says so, READ through it reads the data, and device 2
/// does not migrate it back (it is not its page).
fn remote() -> TestResult {
    let d2 = open(2)?;
    let d3 = open(3)?;
    let buf = buffer(SIZE)?;
    migrate_in(&d3, buf.addr(), SIZE, 0)?;
    let n = npages(SIZE);
    let snap = Mapping::rw(n)?;
    d2.snapshot(buf.addr(), snap.addr(), n)?;
    check_each(
        "snapshot through the other device",
        &snap.bytes()[..n],
        |_| HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE,
    )?;
    let out = Mapping::rw(SIZE)?;
    d2.read(buf.addr(), out.addr(), n)?;
    check_each("READ through the other device", out.words(), |i| i as u32)?;
    let c = d2.cmd(HMM_DMIRROR_MIGRATE_TO_SYS, buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, 0);
    migrate_out(&d3, buf.addr(), SIZE)
}

/// EXCLUSIVE over pages in the device's own coherent memory: the device
/// gets them, CHECK_EXCLUSIVE says so until a CPU write takes them back,
/// and the data stays where it is, on the device.
fn exclusive() -> TestResult {
    let d = open(2)?;
    let mut buf = buffer(SIZE)?;
    migrate_in(&d, buf.addr(), SIZE, 0)?;
    let n = npages(SIZE);
    let out = Mapping::rw(SIZE)?;
    let c = d.cmd(HMM_DMIRROR_EXCLUSIVE, buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read under exclusive access", out.words(), |i| {
        i as u32
    })?;
    expect_errno(
        d.cmd(HMM_DMIRROR_CHECK_EXCLUSIVE, buf.addr(), out.addr(), n),
        libc::EPERM,
        "CHECK_EXCLUSIVE right after EXCLUSIVE",
    )?;
    for w in buf.words_mut() {
        *w = w.wrapping_add(1);
    }
    check_each("CPU write after exclusive", buf.words(), |i| i as u32 + 1)?;
    d.cmd(HMM_DMIRROR_CHECK_EXCLUSIVE, buf.addr(), out.addr(), n)?;
    let kinds = super::devmem::page_kinds(&d, buf.addr(), n)?;
    check_each("page kind after the CPU write", &kinds, |_| {
        HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL
    })
}
