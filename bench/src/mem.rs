// SPDX-License-Identifier: GPL-2.0

//! Memory for the workloads, on top of the selftests' mappings.

use hmm_dmirror_selftests::mem::{align_up, unmap, Mapping};
use std::io;

/// An anonymous read/write mapping whose start is aligned to `align`,
/// unmapped on drop. The 2 MiB-block userfaultfd handler needs this: it
/// resolves the aligned block around a fault, which must lie inside the
/// registered region. (The selftests' `Mapping` takes whatever address
/// mmap picks.)
pub struct AlignedMapping {
    addr: usize,
    len: usize,
}

impl AlignedMapping {
    pub fn new(len: usize, align: usize) -> io::Result<Self> {
        // Over-allocate, then trim the unaligned head and the tail.
        let (base, total) = Mapping::rw(len + align)?.leak();
        let addr = align_up(base, align);
        if addr > base {
            unmap(base, addr - base)?;
        }
        let end = addr + len;
        if base + total > end {
            unmap(end, base + total - end)?;
        }
        Ok(AlignedMapping { addr, len })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Write one byte in every page, as [`touch`] does.
    pub fn touch(&mut self, page_size: usize) {
        for offset in (0..self.len).step_by(page_size) {
            // SAFETY: the mapping is ours, read/write, `len` bytes long.
            unsafe { ((self.addr + offset) as *mut u8).write_volatile(0x5a) };
        }
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        let _ = unmap(self.addr, self.len);
    }
}

/// Write one byte in every page, so that all of `m` is present (and
/// writable) in the CPU page tables.
pub fn touch(m: &mut Mapping, page_size: usize) {
    for b in m.bytes_mut().iter_mut().step_by(page_size) {
        *b = 0x5a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_mapping_is_aligned_and_usable() {
        let align = 2 << 20;
        let m = AlignedMapping::new(64 << 10, align).unwrap();
        assert_eq!(m.addr() % align, 0);
        // SAFETY: the 64 KiB at addr are ours, read/write.
        unsafe {
            *((m.addr() + 4096) as *mut u8) = 7;
            assert_eq!(*((m.addr() + 4096) as *const u8), 7);
        }
    }
}
