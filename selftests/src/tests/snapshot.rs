// SPDX-License-Identifier: GPL-2.0

//! SNAPSHOT: one PROT byte per page, read from the CPU page table without
//! faulting anything in.

use crate::check::check_each;
use crate::dmirror::{page_size, Dmirror};
use crate::harness::{Test, TestResult};
use crate::mem::{self, align_up, Mapping};
use crate::{diag, ensure_eq, skip};
use hmm_dmirror_uapi::*;

pub const TESTS: &[Test] = &[
    Test::new("hmm.mixedmap", mixedmap),
    Test::new("hmm.snapshot", snapshot),
    Test::new("hmm.compound", compound),
];

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// The device's own mmap() inserts zeroed pages; a private mapping of them
/// is read-only until written.
fn mixedmap() -> TestResult {
    let d = Dmirror::open(0)?;
    let ps = page_size();
    let buf = Mapping::new(ps, RW, libc::MAP_PRIVATE, d.raw_fd())?;
    let mut prot = Mapping::rw(ps)?;
    prot.bytes_mut()[0] = 0xAA;
    let c = d.snapshot(buf.addr(), prot.addr(), 1)?;
    ensure_eq!(c.cpages, 1);
    ensure_eq!(prot.bytes()[0], HMM_DMIRROR_PROT_READ);
    check_each("the device's pages are zeroed", buf.bytes(), |_| 0)
}

/// Upstream hmm2.snapshot without the migrated pages: a hole, the zero
/// page, read-only, read-write and never-touched pages.
fn snapshot() -> TestResult {
    let d = Dmirror::open(0)?;
    let ps = page_size();
    let npages = 6;
    // Map the output first, so it cannot land in the hole punched below.
    let mut prot = Mapping::rw(ps)?;
    prot.bytes_mut().fill(0xAA);
    let (base, len) = Mapping::anon(npages * ps, libc::PROT_NONE)?.leak();
    let _cleanup = Unmap(base, len);
    let page = |i: usize| base + i * ps;
    // Page 0 stays PROT_NONE; page 1 becomes a hole.
    mem::unmap(page(1), ps)?;
    // Page 2: the zero page, read-only.
    mem::protect(page(2), ps, libc::PROT_READ)?;
    // SAFETY: page 2 is mapped and readable.
    let v = unsafe { std::ptr::read_volatile(page(2) as *const u32) };
    ensure_eq!(v, 0);
    // Page 3: written, then read-only.
    mem::protect(page(3), ps, RW)?;
    // SAFETY: page 3 is mapped and writable.
    unsafe { std::ptr::write_volatile(page(3) as *mut u32, 3) };
    mem::protect(page(3), ps, libc::PROT_READ)?;
    // Page 4: read-write, written. Page 5: read-write, never touched.
    mem::protect(page(4), 2 * ps, RW)?;
    // SAFETY: page 4 is mapped and writable.
    unsafe { std::ptr::write_volatile(page(4) as *mut u32, 4) };

    let c = d.snapshot(base, prot.addr(), npages)?;
    ensure_eq!(c.cpages, npages as u64);
    let m = &prot.bytes()[..npages];
    let want = [
        HMM_DMIRROR_PROT_ERROR,
        HMM_DMIRROR_PROT_ERROR,
        HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ,
        HMM_DMIRROR_PROT_READ,
        HMM_DMIRROR_PROT_WRITE,
        HMM_DMIRROR_PROT_NONE,
    ];
    check_each("snapshot", m, |i| want[i])?;
    ensure_eq!(prot.bytes()[npages], 0xAA, "byte past the snapshot");

    // The snapshot did not fault page 5 in.
    let mut vec = [0u8; 1];
    // SAFETY: page 5 is mapped; vec has room for one page.
    let r = unsafe { libc::mincore(page(5) as *mut _, ps, vec.as_mut_ptr()) };
    ensure_eq!(r, 0);
    ensure_eq!(vec[0] & 1, 0, "page 5 resident after SNAPSHOT");
    Ok(())
}

/// A hugetlbfs page is reported on every page at the level its size says:
/// PMD for a PMD-sized huge page (2 MiB on x86-64), PUD for a PUD-sized
/// one (1 GiB). The level is worked out from the default huge page size,
/// not taken from the module's answer, so a module that reports the wrong
/// level, or none, fails.
fn compound() -> TestResult {
    let hsize = match mem::ensure_free_hugepages(1) {
        Ok(s) => s,
        Err(why) => skip!("{why}"),
    };
    let level = hugetlb_level(hsize);
    if level == 0 {
        diag!("{hsize}-byte huge pages are neither PMD nor PUD sized: no level bit");
    }
    let d = Dmirror::open(0)?;
    let size = align_up(mem::TWO_MB, hsize);
    let npages = size / page_size();
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
    let mut buf = match Mapping::new(size, RW, flags, -1) {
        Ok(m) => m,
        Err(e) => skip!("huge page could not be mapped: {e}"),
    };
    for (i, w) in buf.words_mut().iter_mut().enumerate() {
        *w = i as u32;
    }
    let prot = Mapping::rw(align_up(npages, page_size()))?;
    for (access, label) in [
        (HMM_DMIRROR_PROT_WRITE, "read-write"),
        (HMM_DMIRROR_PROT_READ, "read-only"),
    ] {
        if access == HMM_DMIRROR_PROT_READ {
            buf.protect(libc::PROT_READ)?;
        }
        let c = d.snapshot(buf.addr(), prot.addr(), npages)?;
        ensure_eq!(c.cpages, npages as u64);
        check_each(label, &prot.bytes()[..npages], |_| access | level)?;
    }
    Ok(())
}

/// The SNAPSHOT level bit of a hugetlb page of `hsize` bytes, as C's
/// dmirror_mkentry() sets it from the map order: PMD if the page is what
/// one PMD entry maps (the kernel's hpage_pmd_size, 2 MiB on x86-64), PUD
/// if one PUD entry (as many PMDs as a PMD maps pages: 1 GiB), none
/// otherwise (arm64's contiguous-PTE sizes, for one).
fn hugetlb_level(hsize: usize) -> u8 {
    let pmd = mem::pmd_size();
    let pud = pmd * (pmd / page_size());
    if hsize == pmd {
        HMM_DMIRROR_PROT_PMD
    } else if hsize == pud {
        HMM_DMIRROR_PROT_PUD
    } else {
        0
    }
}

/// Unmaps a range on drop (for regions with holes punched in them).
struct Unmap(usize, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        let _ = mem::unmap(self.0, self.1);
    }
}
