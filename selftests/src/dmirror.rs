// SPDX-License-Identifier: GPL-2.0

//! The dmirror device: open and ioctl, nothing more.

use hmm_dmirror_uapi::*;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// A mirror of this process's address space: one open of a dmirror device.
pub struct Dmirror {
    fd: OwnedFd,
}

/// What a successful command reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub cpages: u64,
    pub faults: u64,
}

impl Dmirror {
    pub fn path(unit: u32) -> String {
        format!("/dev/hmm_dmirror{unit}")
    }

    pub fn open(unit: u32) -> io::Result<Self> {
        let path = Self::path(unit);
        let c = CString::new(path.clone()).unwrap();
        // SAFETY: c is a valid C string.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("open {path}: {e}")));
        }
        // SAFETY: fd was just opened and is ours.
        Ok(Dmirror {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// One ioctl, not retried: an EINTR reaches the caller.
    fn ioctl_once(&self, request: u32, cmd: &mut HmmDmirrorCmd) -> io::Result<()> {
        // SAFETY: cmd is a live, writable HmmDmirrorCmd.
        let r =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, cmd as *mut HmmDmirrorCmd) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One ioctl, retried on EINTR as upstream's hmm_dmirror_cmd() does.
    /// `cmd` is updated only as far as the driver copies it back.
    pub fn ioctl(&self, request: u32, cmd: &mut HmmDmirrorCmd) -> io::Result<()> {
        loop {
            match self.ioctl_once(request, cmd) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn counted(
        &self,
        request: u32,
        addr: usize,
        ptr: usize,
        npages: usize,
        retry_eintr: bool,
    ) -> io::Result<Counters> {
        let mut cmd = HmmDmirrorCmd {
            addr: addr as u64,
            ptr: ptr as u64,
            npages: npages as u64,
            ..Default::default()
        };
        if retry_eintr {
            self.ioctl(request, &mut cmd)?;
        } else {
            self.ioctl_once(request, &mut cmd)?;
        }
        Ok(Counters {
            cpages: cmd.cpages,
            faults: cmd.faults,
        })
    }

    /// Issue `request` over `npages` pages at `addr` with buffer `ptr`.
    pub fn cmd(
        &self,
        request: u32,
        addr: usize,
        ptr: usize,
        npages: usize,
    ) -> io::Result<Counters> {
        self.counted(request, addr, ptr, npages, true)
    }

    /// As [`cmd`](Self::cmd), but one ioctl, not retried: an EINTR reaches
    /// the caller, which is how a test sees that a non-fatal signal
    /// aborted a command.
    pub fn cmd_once(
        &self,
        request: u32,
        addr: usize,
        ptr: usize,
        npages: usize,
    ) -> io::Result<Counters> {
        self.counted(request, addr, ptr, npages, false)
    }

    pub fn read(&self, addr: usize, ptr: usize, npages: usize) -> io::Result<Counters> {
        self.cmd(HMM_DMIRROR_READ, addr, ptr, npages)
    }

    pub fn write(&self, addr: usize, ptr: usize, npages: usize) -> io::Result<Counters> {
        self.cmd(HMM_DMIRROR_WRITE, addr, ptr, npages)
    }

    pub fn snapshot(&self, addr: usize, ptr: usize, npages: usize) -> io::Result<Counters> {
        self.cmd(HMM_DMIRROR_SNAPSHOT, addr, ptr, npages)
    }

    /// A read whose faults may drop the mmap lock (userfaultfd-safe).
    pub fn read_unlockable(&self, addr: usize, ptr: usize, npages: usize) -> io::Result<Counters> {
        self.cmd(HMM_DMIRROR_READ_UNLOCKABLE, addr, ptr, npages)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Close, reporting close()'s error (drop would ignore it).
    pub fn close(self) -> io::Result<()> {
        let fd = self.fd.into_raw_fd();
        // SAFETY: fd is ours and closed once.
        if unsafe { libc::close(fd) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One ioctl with any request word and any argument, for callers that
/// pass garbage on purpose (a bad struct pointer, an unknown command) or
/// that hold only a raw descriptor. Retried on EINTR; returns the ioctl's
/// non-negative result.
pub fn ioctl_raw(fd: RawFd, request: libc::c_ulong, arg: usize) -> io::Result<i32> {
    loop {
        // SAFETY: the kernel validates `arg`; a bad pointer gives EFAULT.
        let r = unsafe { libc::ioctl(fd, request as _, arg) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the module under test is C's `test_hmm.ko`, for the cases whose
/// expected result differs between the modules by design.
pub fn c_module_loaded() -> bool {
    std::path::Path::new("/sys/module/test_hmm").exists()
}

pub fn page_size() -> usize {
    // SAFETY: plain libc call.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The errno of an io::Error, or 0 if it has none.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// A readable name for the errnos these tests expect.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        0 => "success",
        libc::EINVAL => "EINVAL",
        libc::EFAULT => "EFAULT",
        libc::EPERM => "EPERM",
        libc::EBUSY => "EBUSY",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::ENOMEM => "ENOMEM",
        libc::EEXIST => "EEXIST",
        libc::EAGAIN => "EAGAIN",
        libc::ENOTTY => "ENOTTY",
        libc::ESRCH => "ESRCH",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EACCES => "EACCES",
        libc::EBADF => "EBADF",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::EIO => "EIO",
        libc::ENOSYS => "ENOSYS",
        libc::E2BIG => "E2BIG",
        libc::ENOSPC => "ENOSPC",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ERANGE => "ERANGE",
        _ => "?",
    }
}

/// The errno a result carries, 0 for success: for `ensure_eq!` messages.
pub fn result_errno<T>(r: &io::Result<T>) -> &'static str {
    match r {
        Ok(_) => "success",
        Err(e) => errno_name(errno(e)),
    }
}
