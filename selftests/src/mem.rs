// SPDX-License-Identifier: GPL-2.0

//! Memory the tests hand to the device: mmap()ed regions, huge pages,
//! temporary files.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::ptr;

pub const TWO_MB: usize = 2 << 20;

/// An mmap()ed region, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// The tests share mappings with helper threads by address; the kernel,
// not Rust, arbitrates access to the memory.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(len: usize, prot: i32, flags: i32, fd: RawFd) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Private anonymous memory.
    pub fn anon(len: usize, prot: i32) -> io::Result<Self> {
        Self::new(len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    /// Read/write private anonymous memory.
    pub fn rw(len: usize) -> io::Result<Self> {
        Self::anon(len, libc::PROT_READ | libc::PROT_WRITE)
    }

    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes. The mapping must be readable.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the whole range is mapped for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable. The mapping must be writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as bytes(), and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The region as native-endian u32 words (mappings are page aligned).
    pub fn words(&self) -> &[u32] {
        // SAFETY: page alignment satisfies u32 alignment.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len / 4) }
    }

    pub fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: as words(), exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len / 4) }
    }

    pub fn protect(&self, prot: i32) -> io::Result<()> {
        protect(self.addr(), self.len, prot)
    }

    /// Give up ownership: the caller (or a racing thread) unmaps.
    pub fn leak(self) -> (usize, usize) {
        let r = (self.addr(), self.len);
        std::mem::forget(self);
        r
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `pages` pages with protection `prot` between two PROT_NONE guard
/// pages: nothing else can be mapped right before or after them, and an
/// access one byte past either end faults. One reservation, unmapped on
/// drop.
pub struct Guarded {
    whole: Mapping,
    pages: usize,
}

impl Guarded {
    pub fn new(pages: usize, prot: i32) -> io::Result<Self> {
        let ps = crate::dmirror::page_size();
        let whole = Mapping::anon((pages + 2) * ps, libc::PROT_NONE)?;
        if pages > 0 && prot != libc::PROT_NONE {
            protect(whole.addr() + ps, pages * ps, prot)?;
        }
        Ok(Guarded { whole, pages })
    }

    /// Read/write pages between guards.
    pub fn rw(pages: usize) -> io::Result<Self> {
        Self::new(pages, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// A hole of `pages` unmapped pages between two guards: an address
    /// range with no VMA that no later mmap() can fill by chance (it would
    /// have to fit exactly).
    pub fn hole(pages: usize) -> io::Result<Self> {
        let g = Self::new(pages, libc::PROT_NONE)?;
        if pages > 0 {
            unmap(g.addr(), g.len())?;
        }
        Ok(g)
    }

    /// First byte after the leading guard.
    pub fn addr(&self) -> usize {
        self.whole.addr() + crate::dmirror::page_size()
    }

    pub fn len(&self) -> usize {
        self.pages * crate::dmirror::page_size()
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// First byte of the trailing guard.
    pub fn end(&self) -> usize {
        self.addr() + self.len()
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The bytes between the guards. They must be readable.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the range is mapped for the life of self.
        unsafe { std::slice::from_raw_parts(self.addr() as *const u8, self.len()) }
    }

    /// The bytes, writable. They must be writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as bytes(), and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.addr() as *mut u8, self.len()) }
    }
}

pub fn protect(addr: usize, len: usize, prot: i32) -> io::Result<()> {
    // SAFETY: changes protection of memory the test owns.
    if unsafe { libc::mprotect(addr as *mut _, len, prot) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fresh read/write private anonymous memory at exactly `addr`, with
/// `fixed` (`MAP_FIXED`: over what is there, or `MAP_FIXED_NOREPLACE`:
/// only where nothing is).
pub fn map_anon_at(addr: usize, len: usize, fixed: i32) -> io::Result<()> {
    // SAFETY: the caller owns the range (for MAP_FIXED, what it replaces).
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if p as usize != addr {
        return Err(io::Error::other(format!("mapped at {p:?}, not {addr:#x}")));
    }
    Ok(())
}

pub fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range (see Mapping::leak).
    if unsafe { libc::munmap(addr as *mut _, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn madvise(addr: usize, len: usize, advice: i32) -> io::Result<()> {
    // SAFETY: advice on memory the test owns.
    if unsafe { libc::madvise(addr as *mut _, len, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

/// The PMD size for THP, as the kernel reports it.
pub fn pmd_size() -> usize {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(TWO_MB)
}

/// The THP mode, `/sys/kernel/mm/transparent_hugepage/enabled` (for
/// example `always [madvise] never`), or why it cannot be read.
pub fn thp_enabled() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// How many bytes of the VMA holding `addr` the kernel maps with
/// PMD-sized anonymous huge pages: its `AnonHugePages` in
/// /proc/self/smaps. Tells whether the system gave a THP without asking
/// the module under test.
pub fn anon_huge_bytes(addr: usize) -> io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            let kb = v
                .split_whitespace()
                .next()
                .and_then(|k| k.parse::<usize>().ok());
            return kb
                .map(|kb| kb * 1024)
                .ok_or_else(|| io::Error::other(format!("smaps: {line:?}")));
        }
    }
    Err(io::Error::other(format!(
        "no AnonHugePages for {addr:#x} in /proc/self/smaps"
    )))
}

/// A field of /proc/meminfo, in its own unit (pages or kB).
fn meminfo(field: &str) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The default hugetlb page size in bytes, if hugetlbfs is there.
pub fn default_hugepage_size() -> Option<usize> {
    meminfo("Hugepagesize").map(|kb| kb * 1024)
}

/// Make sure `n` default-size huge pages are free, growing the pool
/// through /proc/sys/vm/nr_hugepages if needed (we run as root). Returns
/// the huge page size, or why not.
pub fn ensure_free_hugepages(n: usize) -> Result<usize, String> {
    let size = default_hugepage_size().ok_or("no hugetlb support (no Hugepagesize)")?;
    let free = meminfo("HugePages_Free").unwrap_or(0);
    if free >= n {
        return Ok(size);
    }
    let total = meminfo("HugePages_Total").unwrap_or(0);
    let want = total + (n - free);
    if let Err(e) = std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string()) {
        return Err(format!(
            "{free} free huge pages, cannot raise nr_hugepages: {e}"
        ));
    }
    let free = meminfo("HugePages_Free").unwrap_or(0);
    if free < n {
        return Err(format!(
            "only {free} free huge pages after asking for {want}"
        ));
    }
    Ok(size)
}

/// A temporary file of `size` bytes, already unlinked.
pub fn temp_file(size: usize) -> io::Result<OwnedFd> {
    let fd = open_tmpfile().or_else(|_| mkstemp_unlinked())?;
    // SAFETY: sizes a file we own.
    loop {
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn open_tmpfile() -> io::Result<OwnedFd> {
    let dir = CString::new("/tmp").unwrap();
    // SAFETY: valid path; O_TMPFILE needs a mode.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_EXCL,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Fallback where /tmp lacks O_TMPFILE: a file in the (writable) cwd.
fn mkstemp_unlinked() -> io::Result<OwnedFd> {
    let mut template = *b"./.hmm-dmirror-selftest-XXXXXX\0";
    // SAFETY: template is a writable, NUL-terminated buffer.
    let fd = unsafe { libc::mkstemp(template.as_mut_ptr().cast()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: unlinks the file mkstemp just created.
    unsafe { libc::unlink(template.as_ptr().cast()) };
    // SAFETY: fd is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pwrite() of all of `buf` at `off`, retried on EINTR and short writes.
pub fn pwrite_all(fd: impl AsFd, buf: &[u8], off: usize) -> io::Result<()> {
    File::from(fd.as_fd().try_clone_to_owned()?).write_all_at(buf, off as u64)
}

/// pread() of all of `buf` from `off`; end of file is an error.
pub fn pread_all(fd: impl AsFd, buf: &mut [u8], off: usize) -> io::Result<()> {
    File::from(fd.as_fd().try_clone_to_owned()?).read_exact_at(buf, off as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align() {
        assert_eq!(align_up(1, 4096), 4096);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_up(0, TWO_MB), 0);
    }

    #[test]
    fn mapping_round_trip() {
        let mut m = Mapping::rw(8192).unwrap();
        m.words_mut()[5] = 0xdead_beef;
        assert_eq!(m.words()[5], 0xdead_beef);
        assert_eq!(m.bytes().len(), 8192);
        assert_eq!(m.addr() % 4096, 0);
    }

    #[test]
    fn guarded_has_guards() {
        let ps = crate::dmirror::page_size();
        let mut g = Guarded::rw(3).unwrap();
        assert_eq!(
            (g.len(), g.end() - g.addr(), g.pages()),
            (3 * ps, 3 * ps, 3)
        );
        g.bytes_mut()[3 * ps - 1] = 9;
        assert_eq!(g.bytes()[3 * ps - 1], 9);
        // The guards are PROT_NONE: mprotect() on them succeeds (they are
        // mapped), and mincore() says the hole is not.
        protect(g.addr() - ps, ps, libc::PROT_NONE).unwrap();
        protect(g.end(), ps, libc::PROT_NONE).unwrap();
        let h = Guarded::hole(2).unwrap();
        let mut vec = [0u8; 2];
        // SAFETY: mincore() writes one byte per page into vec.
        let r = unsafe { libc::mincore(h.addr() as *mut _, 2 * ps, vec.as_mut_ptr()) };
        assert_eq!(r, -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOMEM)
        );
        protect(h.addr() - ps, ps, libc::PROT_NONE).unwrap();
    }

    #[test]
    fn anon_huge_bytes_reads_smaps() {
        let m = Mapping::rw(4 * TWO_MB).unwrap();
        madvise(m.addr(), m.len(), libc::MADV_NOHUGEPAGE).unwrap();
        assert_eq!(anon_huge_bytes(m.addr() + TWO_MB).unwrap(), 0);
        let h = Guarded::hole(1).unwrap();
        assert!(anon_huge_bytes(h.addr()).is_err());
    }

    #[test]
    fn temp_file_io() {
        let fd = temp_file(8192).unwrap();
        pwrite_all(&fd, b"hello", 4096).unwrap();
        let mut b = [0u8; 5];
        pread_all(&fd, &mut b, 4096).unwrap();
        assert_eq!(&b, b"hello");
    }
}
