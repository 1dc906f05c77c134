// SPDX-License-Identifier: GPL-2.0

//! What happens to pages in device memory afterwards: RELEASE from a
//! sibling file, fork, mremap, zap, migrations that span windows and VMAs,
//! FAIL_ALLOC on the way back, EXCLUSIVE and READ_UNLOCKABLE over device
//! pages, and SIGKILL while the range is being invalidated. Every case
//! checks the data word by word.

use super::devmem::{
    buffer, check_exclusive, check_on_device, migrate_to_dev, migrate_to_sys, npages, page_kinds,
    refault_read, snapshot, thp_buffer, KIND, SIZE,
};
use super::lockdrop_race::{read_byte, write_byte};
use super::stress::{mremap_to, reap_within};
use crate::check::{check_each, expect_errno};
use crate::dmirror::{c_module_loaded, errno, page_size, Dmirror};
use crate::harness::{describe, fork_and_wait, Test, TestResult};
use crate::mem::{self, Mapping};
use crate::{diag, ensure, ensure_eq};
use hmm_dmirror_uapi::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const TESTS: &[Test] = &[
    Test::new("devmem.release_from_sibling", release_from_sibling),
    Test::new("devmem.sibling_writes_migrated", sibling_writes_migrated),
    Test::new("devmem.migrate_zero_page", migrate_zero_page),
    Test::new("devmem.migrate_exclusive", migrate_exclusive),
    Test::new("devmem.release_races_migration", release_races_migration),
    Test::new("devmem.fork_child_mirror", fork_child_mirror),
    Test::new("devmem.close_while_child_maps", close_while_child_maps),
    Test::new("devmem.mremap_migrated", mremap_migrated),
    Test::new("devmem.zap_on_device", zap_on_device),
    Test::new("devmem.migrate_many_windows", migrate_many_windows),
    Test::new("devmem.migrate_across_vmas", migrate_across_vmas),
    Test::new("devmem.migrate_across_prot_none", migrate_across_prot_none),
    Test::new("devmem.fail_alloc_to_sys", fail_alloc_to_sys),
    Test::new("devmem.fail_alloc_to_sys_thp", fail_alloc_to_sys_thp),
    Test::new("devmem.fail_alloc_cpu_fault", fail_alloc_cpu_fault),
    Test::new("devmem.exclusive_on_device", exclusive_on_device),
    Test::new("devmem.exclusive_thp", exclusive_thp),
    Test::new(
        "devmem.read_unlockable_on_device",
        read_unlockable_on_device,
    ),
    Test::new(
        "devmem.killable_under_invalidation",
        killable_under_invalidation,
    ),
];

/// Device-local, writable: what SNAPSHOT says of a page just migrated.
const LOCAL_RW: u8 = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE;

/// The words of `[addr, addr + len)`, which the caller keeps mapped.
fn words_at<'a>(addr: usize, len: usize) -> &'a [u32] {
    // SAFETY: the caller keeps the range mapped readable while it reads.
    unsafe { std::slice::from_raw_parts(addr as *const u32, len / 4) }
}

/// RELEASE through a second file of the same device evicts the pages the
/// first one migrated: the first file's SNAPSHOT finds none on the device,
/// and its READ and the CPU find the data intact.
fn release_from_sibling() -> TestResult {
    let a = Dmirror::open(0)?;
    let b = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&a, &buf, &out)?;
    check_on_device(&a, &buf, true)?;
    b.cmd(HMM_DMIRROR_RELEASE, buf.addr(), out.addr(), 1)?;
    check_on_device(&a, &buf, false)?;
    refault_read(&a, &buf)?;
    check_each("CPU read after the sibling's RELEASE", buf.words(), |i| {
        i as u32
    })
}

/// A second file of the same device READs and WRITEs pages that the
/// first migrated: they are that device's own pages, so it mirrors them
/// where they are (they stay on the device), and the CPU then reads what
/// it wrote.
fn sibling_writes_migrated() -> TestResult {
    let a = Dmirror::open(0)?;
    let b = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&a, &buf, &out)?;
    refault_read(&b, &buf)?;
    check_on_device(&a, &buf, true)?;
    let n = npages(SIZE);
    let mut src = Mapping::rw(SIZE)?;
    for (i, w) in src.words_mut().iter_mut().enumerate() {
        *w = !(i as u32);
    }
    let c = b.write(buf.addr(), src.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_on_device(&a, &buf, true)?;
    let c = a.read(buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each(
        "the first file's read of the sibling's write",
        out.words(),
        |i| !(i as u32),
    )?;
    check_each("CPU read of the sibling's write", buf.words(), |i| {
        !(i as u32)
    })
}

/// Memory the CPU has only read maps the shared zero page: it migrates
/// like a hole, every page, and the device reads zeros from its own
/// memory.
fn migrate_zero_page() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = Mapping::rw(SIZE)?;
    mem::madvise(buf.addr(), SIZE, libc::MADV_NOHUGEPAGE)?;
    check_each("CPU read of untouched memory", buf.words(), |_| 0)?;
    let zero: Vec<u8> = snapshot(&d, &buf)?
        .iter()
        .map(|b| b & HMM_DMIRROR_PROT_ZERO)
        .collect();
    check_each("zero page before the migration", &zero, |_| {
        HMM_DMIRROR_PROT_ZERO
    })?;
    let mut out = Mapping::rw(SIZE)?;
    out.bytes_mut().fill(0xA5);
    let c = migrate_to_dev(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("device read", out.words(), |_| 0)?;
    check_on_device(&d, &buf, true)?;
    check_each("CPU read after the migration", buf.words(), |_| 0)
}

/// MIGRATE_TO_DEV over pages the device holds exclusively: migration
/// collects only present and device-private entries, so none of them
/// moves, the pages stay in system memory and their data is intact. The
/// modules differ in what the device keeps, by design: C's notifier skips
/// its file's own migrations, so its atomic entries survive (the read-back
/// reads them: success, and CHECK_EXCLUSIVE still refuses); the Rust
/// mirror erases its range on every invalidation, the migration's too, so
/// the read-back finds nothing mapped (ENOENT) and the device no longer
/// claims the access.
fn migrate_exclusive() -> TestResult {
    let c_module = c_module_loaded();
    let d = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let n = npages(SIZE);
    let out = Mapping::rw(SIZE)?;
    let c = d.cmd(HMM_DMIRROR_EXCLUSIVE, buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let mut read_back = Mapping::rw(SIZE)?;
    read_back.bytes_mut().fill(0xA5);
    let r = migrate_to_dev(&d, &buf, &read_back);
    let kinds = page_kinds(&d, buf.addr(), n)?;
    check_each("page kind", &kinds, |_| HMM_DMIRROR_PROT_NONE)?;
    if c_module {
        ensure_eq!(r?.cpages, n as u64, "C: read back from its atomic entries");
        check_each("C's read-back", read_back.words(), |i| i as u32)?;
        expect_errno(
            check_exclusive(&d, &buf, &out),
            libc::EPERM,
            "C: still exclusive",
        )?;
    } else {
        expect_errno(r, libc::ENOENT, "Rust: nothing moved, nothing mapped")?;
        check_exclusive(&d, &buf, &out)?;
    }
    for w in buf.words_mut() {
        *w = w.wrapping_add(1);
    }
    check_exclusive(&d, &buf, &out)?;
    check_each("CPU data", buf.words(), |i| i as u32 + 1)
}

/// Rounds of [`release_races_migration`].
const RACE_ROUNDS: usize = 40;

/// RELEASE through one file, over and over, while another file migrates
/// the buffer to the device and back: a migration may find its pages
/// evicted under it (`ENOENT` from the read-back, as a page that did not
/// move), nothing else; after every round the CPU reads the data intact.
fn release_races_migration() -> TestResult {
    let a = Dmirror::open(0)?;
    let b = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let stop = AtomicBool::new(false);
    let (mut moved, mut raced) = (0, 0);
    std::thread::scope(|s| -> TestResult {
        let releaser = s.spawn(|| -> TestResult {
            let mut releases = 0u64;
            while !stop.load(Ordering::Relaxed) {
                b.cmd(HMM_DMIRROR_RELEASE, buf.addr(), buf.addr(), 1)?;
                releases += 1;
                std::thread::yield_now();
            }
            diag!("{releases} RELEASEs");
            Ok(())
        });
        let out = Mapping::rw(SIZE)?;
        let result = (|| -> TestResult {
            for _ in 0..RACE_ROUNDS {
                match migrate_to_dev(&a, &buf, &out) {
                    Ok(_) => {
                        moved += 1;
                        check_each("device read after the migration", out.words(), |i| i as u32)?;
                    }
                    Err(e) if errno(&e) == libc::ENOENT => raced += 1,
                    Err(e) => return Err(format!("MIGRATE_TO_DEV: {e}").into()),
                }
                migrate_to_sys(&a, &buf, &out)?;
                check_each("CPU read after the round", buf.words(), |i| i as u32)?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        releaser.join().map_err(|_| "releaser panicked")??;
        result
    })?;
    diag!("{moved} migrations whole, {raced} raced by RELEASE");
    Ok(())
}

/// A child that inherits device pages reads them through its own mirror
/// (they stay in the device's memory, read-only for both processes),
/// writes them through it (which breaks copy-on-write for the child), and
/// exits; the parent's device and CPU still read its own data, and
/// MIGRATE_TO_SYS leaves nothing on the device.
fn fork_child_mirror() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let (addr, n) = (buf.addr(), npages(SIZE));
    let status = fork_and_wait(|| {
        let child = Dmirror::open(0)?;
        let mut out = Mapping::rw(SIZE)?;
        let c = child.read(addr, out.addr(), n)?;
        ensure_eq!(c.cpages, n as u64);
        check_each("the child's device read", out.words(), |i| i as u32)?;
        let snap = Mapping::rw(n)?;
        child.snapshot(addr, snap.addr(), n)?;
        check_each("the child's snapshot", &snap.bytes()[..n], |_| {
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_READ
        })?;
        for (i, w) in out.words_mut().iter_mut().enumerate() {
            *w = !(i as u32);
        }
        let c = child.write(addr, out.addr(), n)?;
        ensure_eq!(c.cpages, n as u64);
        check_each(
            "the child's CPU read of its write",
            words_at(addr, SIZE),
            |i| !(i as u32),
        )
    })?;
    ensure!(status == 0, "child {}", describe(status));
    refault_read(&d, &buf)?;
    migrate_to_sys(&d, &buf, &out)?;
    check_on_device(&d, &buf, false)?;
    check_each("the parent's CPU read", buf.words(), |i| i as u32)
}

/// The parent migrates, forks, unmaps its own copy and closes its file
/// while only the child maps the device pages: the close evicts them from
/// the child's address space, and the child reads its data intact, from
/// system memory.
fn close_while_child_maps() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let (addr, n, dfd) = (buf.addr(), npages(SIZE), d.raw_fd());
    let mut fds = [0; 2];
    // SAFETY: a fresh pipe into `fds`.
    ensure!(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, "pipe");
    let (rfd, wfd) = (fds[0], fds[1]);
    // SAFETY: the child only waits, checks memory and _exit()s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        // The parent's close releases the file only once this copy of its
        // descriptor is gone too.
        // SAFETY: the child's copy of the parent's descriptor, not used here.
        unsafe { libc::close(dfd) };
        // The parent writes the byte after closing its file.
        let got = read_byte(rfd, super::prompt());
        let code = (|| -> TestResult {
            ensure_eq!(got?, Some(1));
            let kinds = page_kinds(&Dmirror::open(0)?, addr, n)?;
            check_each("the child's pages after the close", &kinds, |_| {
                HMM_DMIRROR_PROT_NONE
            })?;
            check_each("the child's CPU read", words_at(addr, SIZE), |i| i as u32)
        })();
        if let Err(e) = &code {
            crate::harness::send_diag(&format!("child: {e:?}"));
        }
        // SAFETY: ends the child without unwinding into the test.
        unsafe { libc::_exit(i32::from(code.is_err())) };
    }
    // SAFETY: the parent's read end is the child's.
    unsafe { libc::close(rfd) };
    let (addr, len) = buf.leak();
    mem::unmap(addr, len)?;
    d.close()?;
    write_byte(wfd, 1);
    // SAFETY: our write end, done with.
    unsafe { libc::close(wfd) };
    let status = reap_within(pid, super::prompt(), "the child")?;
    ensure!(status == 0, "child {}", describe(status));
    Ok(())
}

/// mremap() moves device pages without touching them: at the new address
/// SNAPSHOT finds them on the device, MIGRATE_TO_SYS moves all of them
/// back and the CPU reads them intact; the old address is gone (EFAULT).
fn mremap_migrated() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let target = Mapping::anon(SIZE, libc::PROT_NONE)?;
    let (old, len) = buf.leak();
    mremap_to(old, len, target.addr())?;
    let n = npages(SIZE);
    let snap = Mapping::rw(n)?;
    d.snapshot(target.addr(), snap.addr(), n)?;
    check_each("snapshot at the new address", &snap.bytes()[..n], |_| {
        LOCAL_RW
    })?;
    expect_errno(
        d.read(old, out.addr(), n),
        libc::EFAULT,
        "READ at the old address",
    )?;
    let c = migrate_to_sys(&d, &target, &out)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("CPU read at the new address", target.words(), |i| i as u32)
}

/// MADV_DONTNEED over device pages frees them: SNAPSHOT finds nothing,
/// a device READ finds fresh zero pages (no stale mirror entry), and after
/// munmap READ fails with EFAULT.
fn zap_on_device() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    refault_read(&d, &buf)?;
    mem::madvise(buf.addr(), SIZE, libc::MADV_DONTNEED)?;
    let kinds = page_kinds(&d, buf.addr(), npages(SIZE))?;
    check_each("snapshot after the zap", &kinds, |_| HMM_DMIRROR_PROT_NONE)?;
    let n = npages(SIZE);
    let mut out = Mapping::rw(SIZE)?;
    out.bytes_mut().fill(0xA5);
    let c = d.read(buf.addr(), out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read after the zap", out.words(), |_| 0)?;
    let (addr, len) = buf.leak();
    mem::unmap(addr, len)?;
    expect_errno(
        d.read(addr, out.addr(), n),
        libc::EFAULT,
        "READ after munmap",
    )
}

/// A migration longer than any window (5 MiB: C's windows are 2 MiB,
/// the Rust module's 4 MiB) moves every page, and the device reads each.
fn migrate_many_windows() -> TestResult {
    let size = 5 << 20;
    let d = Dmirror::open(0)?;
    let buf = buffer(size)?;
    let out = Mapping::rw(size)?;
    let c = migrate_to_dev(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(size) as u64);
    check_each("device read", out.words(), |i| i as u32)?;
    check_on_device(&d, &buf, true)?;
    let c = migrate_to_sys(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(size) as u64);
    check_each("CPU read", buf.words(), |i| i as u32)
}

/// One migration over two VMAs, read-write then read-only: both move,
/// and each keeps its protection on the device.
fn migrate_across_vmas() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(2 * SIZE)?;
    mem::protect(buf.addr() + SIZE, SIZE, libc::PROT_READ)?;
    let out = Mapping::rw(2 * SIZE)?;
    let n = npages(SIZE);
    let c = migrate_to_dev(&d, &buf, &out)?;
    ensure_eq!(c.cpages, 2 * n as u64);
    check_each("device read", out.words(), |i| i as u32)?;
    let snap = snapshot(&d, &buf)?;
    check_each("snapshot", &snap, |i| {
        if i < n {
            LOCAL_RW
        } else {
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_READ
        }
    })?;
    check_each("CPU read", buf.words(), |i| i as u32)
}

/// A migration that meets a PROT_NONE VMA stops there with EINVAL: the
/// VMA before it moved, the one after did not, and all data is intact.
fn migrate_across_prot_none() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(3 * SIZE)?;
    let n = npages(SIZE);
    mem::protect(buf.addr() + SIZE, SIZE, libc::PROT_NONE)?;
    let out = Mapping::rw(3 * SIZE)?;
    expect_errno(
        migrate_to_dev(&d, &buf, &out),
        libc::EINVAL,
        "migration over a PROT_NONE VMA",
    )?;
    for (part, on_device) in [(0, true), (2, false)] {
        let kinds = page_kinds(&d, buf.addr() + part * SIZE, n)?;
        check_each(&format!("page kind of part {part}"), &kinds, |_| {
            if on_device {
                HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
            } else {
                HMM_DMIRROR_PROT_NONE
            }
        })?;
    }
    mem::protect(buf.addr() + SIZE, SIZE, libc::PROT_READ | libc::PROT_WRITE)?;
    check_each("CPU read", buf.words(), |i| i as u32)
}

/// FAIL_ALLOC on the way back: the first system page cannot be allocated,
/// so MIGRATE_TO_SYS fails with ENOMEM and moves nothing; the device still
/// reads every page, and the next MIGRATE_TO_SYS moves them all.
fn fail_alloc_to_sys() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let flags = HMM_DMIRROR_FLAG_FAIL_ALLOC as usize;
    d.cmd(HMM_DMIRROR_FLAGS, buf.addr(), out.addr(), flags)?;
    expect_errno(
        migrate_to_sys(&d, &buf, &out),
        libc::ENOMEM,
        "MIGRATE_TO_SYS with a failed allocation",
    )?;
    check_on_device(&d, &buf, true)?;
    refault_read(&d, &buf)?;
    let c = migrate_to_sys(&d, &buf, &out)?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("CPU read", buf.words(), |i| i as u32)
}

/// FAIL_ALLOC when a device THP comes back: the huge allocation fails, the
/// folio comes back as 512 small pages, all of them, intact and no longer
/// PMD-mapped.
fn fail_alloc_to_sys_thp() -> TestResult {
    let d = Dmirror::open(0)?;
    let (_region, addr) = thp_buffer(&d)?;
    let size = mem::pmd_size();
    let n = npages(size);
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let flags = HMM_DMIRROR_FLAG_FAIL_ALLOC as usize;
    d.cmd(HMM_DMIRROR_FLAGS, addr, out.addr(), flags)?;
    let c = d.cmd(HMM_DMIRROR_MIGRATE_TO_SYS, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    let snap = Mapping::rw(n)?;
    d.snapshot(addr, snap.addr(), n)?;
    let kinds: Vec<u8> = snap.bytes()[..n]
        .iter()
        .map(|b| b & (KIND | HMM_DMIRROR_PROT_PMD))
        .collect();
    check_each("snapshot after the small-page fallback", &kinds, |_| {
        HMM_DMIRROR_PROT_NONE
    })?;
    check_each("CPU read", words_at(addr, size), |i| i as u32)
}

/// FAIL_ALLOC pending while the CPU faults device pages back: the data
/// comes back intact on both modules. They differ on the flag, by design:
/// C's `migrate_to_ram` consumes the flag of the file that migrated the
/// page (its first fault fails with VM_FAULT_OOM and is retried), so the
/// next migration succeeds; the Rust module's CPU faults do not look at a
/// file's flags (a device page does not point to a file, which may be
/// gone), so the next migration fails its one allocation (ENOENT).
fn fail_alloc_cpu_fault() -> TestResult {
    let c_module = c_module_loaded();
    let d = Dmirror::open(0)?;
    let buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let flags = HMM_DMIRROR_FLAG_FAIL_ALLOC as usize;
    d.cmd(HMM_DMIRROR_FLAGS, buf.addr(), out.addr(), flags)?;
    check_each("CPU read of the device pages", buf.words(), |i| i as u32)?;
    check_on_device(&d, &buf, false)?;
    let page = buffer(page_size())?;
    let next = d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, page.addr(), out.addr(), 1);
    if c_module {
        let c = next?;
        ensure_eq!(c.cpages, 1, "C: the CPU fault consumed FAIL_ALLOC");
    } else {
        expect_errno(next, libc::ENOENT, "Rust: FAIL_ALLOC still pending")?;
    }
    Ok(())
}

/// EXCLUSIVE over pages in the device's own memory brings them back to
/// system memory and gives the device atomic access to them: the device
/// reads them intact, CHECK_EXCLUSIVE refuses, a CPU access takes the
/// access back.
fn exclusive_on_device() -> TestResult {
    let d = Dmirror::open(0)?;
    let mut buf = buffer(SIZE)?;
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d, &buf, &out)?;
    let mut excl = Mapping::rw(SIZE)?;
    excl.bytes_mut().fill(0xA5);
    let c = d.cmd(HMM_DMIRROR_EXCLUSIVE, buf.addr(), excl.addr(), npages(SIZE))?;
    ensure_eq!(c.cpages, npages(SIZE) as u64);
    check_each("device read under exclusive access", excl.words(), |i| {
        i as u32
    })?;
    expect_errno(check_exclusive(&d, &buf, &out), libc::EPERM, "exclusive")?;
    for w in buf.words_mut() {
        *w = w.wrapping_add(1);
    }
    check_exclusive(&d, &buf, &out)?;
    check_each("CPU data", buf.words(), |i| i as u32 + 1)
}

/// EXCLUSIVE over a PMD-mapped THP: every page, with its data, then a CPU
/// write takes the access back.
fn exclusive_thp() -> TestResult {
    let d = Dmirror::open(0)?;
    let (_region, addr) = thp_buffer(&d)?;
    let size = mem::pmd_size();
    let n = npages(size);
    let out = Mapping::rw(size)?;
    let c = d.cmd(HMM_DMIRROR_EXCLUSIVE, addr, out.addr(), n)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read under exclusive access", out.words(), |i| {
        i as u32
    })?;
    expect_errno(
        d.cmd(HMM_DMIRROR_CHECK_EXCLUSIVE, addr, out.addr(), n),
        libc::EPERM,
        "CHECK_EXCLUSIVE right after EXCLUSIVE",
    )?;
    // SAFETY: [addr, addr + size) lies in `_region`, mapped read-write.
    let words = unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, size / 4) };
    for w in words.iter_mut() {
        *w = w.wrapping_add(1);
    }
    d.cmd(HMM_DMIRROR_CHECK_EXCLUSIVE, addr, out.addr(), n)?;
    check_each("CPU data", words, |i| i as u32 + 1)
}

/// READ_UNLOCKABLE over pages in the device's own memory faults them into
/// its mirror where they are (mprotect() erased the mirror the migration
/// made; they stay in device memory); through the other device it faults
/// them back to system memory. The data is intact both ways.
fn read_unlockable_on_device() -> TestResult {
    let d0 = Dmirror::open(0)?;
    let d1 = Dmirror::open(1)?;
    let buf = buffer(SIZE)?;
    let n = npages(SIZE);
    let out = Mapping::rw(SIZE)?;
    migrate_to_dev(&d0, &buf, &out)?;
    buf.protect(libc::PROT_READ)?;
    for (d, name, on_device_after) in [(&d0, "own", true), (&d1, "other", false)] {
        let mut out = Mapping::rw(SIZE)?;
        out.bytes_mut().fill(0xA5);
        let c = d.read_unlockable(buf.addr(), out.addr(), n)?;
        ensure_eq!(
            c.cpages,
            n as u64,
            "READ_UNLOCKABLE through the {name} device"
        );
        check_each(&format!("{name} device's read"), out.words(), |i| i as u32)?;
        check_on_device(&d0, &buf, on_device_after)?;
    }
    check_each("CPU read", buf.words(), |i| i as u32)
}

/// Every command, looping in a child while another thread of it keeps
/// invalidating the range (MADV_DONTNEED, mprotect, migration): SIGKILL
/// ends the child within the prompt bound.
fn killable_under_invalidation() -> TestResult {
    let commands = [
        HMM_DMIRROR_READ,
        HMM_DMIRROR_WRITE,
        HMM_DMIRROR_SNAPSHOT,
        HMM_DMIRROR_READ_UNLOCKABLE,
        HMM_DMIRROR_MIGRATE_TO_DEV,
        HMM_DMIRROR_MIGRATE_TO_SYS,
        HMM_DMIRROR_EXCLUSIVE,
        HMM_DMIRROR_CHECK_EXCLUSIVE,
        HMM_DMIRROR_RELEASE,
    ];
    let size = 4 << 20;
    for request in commands {
        let buf = buffer(size)?;
        let scratch = Mapping::rw(size)?;
        let (addr, ptr, n) = (buf.addr(), scratch.addr(), npages(size));
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe into `fds`.
        ensure!(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, "pipe");
        // SAFETY: the child loops in its two threads until it is killed.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if pid == 0 {
            let Ok(d) = Dmirror::open(0) else {
                // SAFETY: ends the child.
                unsafe { libc::_exit(3) };
            };
            std::thread::spawn(move || loop {
                let _ = mem::madvise(addr, size, libc::MADV_DONTNEED);
                let _ = mem::protect(addr, size, libc::PROT_READ);
                let _ = mem::protect(addr, size, libc::PROT_READ | libc::PROT_WRITE);
            });
            let helper = Dmirror::open(1).ok();
            std::thread::spawn(move || loop {
                if let Some(h) = &helper {
                    let _ = h.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, addr, n);
                }
            });
            // Tells the parent both threads run.
            write_byte(fds[1], 1);
            loop {
                let _ = d.cmd(request, addr, ptr, n);
            }
        }
        let got = read_byte(fds[0], super::prompt());
        // SAFETY: our pipe, done with.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: kills our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let status = reap_within(pid, super::prompt(), &format!("command {request:#x}"))?;
        ensure_eq!(got?, Some(1), "command {request:#x}: child did not start");
        ensure!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "command {request:#x}: child {}",
            describe(status)
        );
    }
    Ok(())
}
