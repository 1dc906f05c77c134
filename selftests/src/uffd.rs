// SPDX-License-Identifier: GPL-2.0

//! A thin userfaultfd wrapper over libc, and a fault-handler thread.
//!
//! Our own wrapper rather than the `userfaultfd` crate: the faults under
//! test come from the kernel (hmm_range_fault on behalf of the device), so
//! the fd must be created *without* UFFD_USER_MODE_ONLY, which that crate
//! sets by default; and the tests need the raw errno of every ioctl
//! (EEXIST, ENOENT after munmap, ...), MISSING mode on hugetlbfs and
//! UFFDIO_WAKE. Six ioctls and three structs are less than a dependency.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// From <linux/userfaultfd.h>; tests/uffd_abi.rs checks them against it.
pub const UFFD_API: u64 = 0xAA;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;

const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u32, size: usize) -> u32 {
    (2 << 30) | ((size as u32) << 16) | (0xAA << 8) | nr
}

pub const UFFDIO_API: u32 = iowr(0x3F, size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: u32 = iowr(0x00, size_of::<UffdioRegister>());
pub const UFFDIO_UNREGISTER: u32 = ior(0x01, size_of::<UffdioRange>());
pub const UFFDIO_WAKE: u32 = ior(0x02, size_of::<UffdioRange>());
pub const UFFDIO_COPY: u32 = iowr(0x03, size_of::<UffdioCopy>());
pub const UFFDIO_ZEROPAGE: u32 = iowr(0x04, size_of::<UffdioZeropage>());

#[repr(C)]
#[derive(Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffd_msg`: 8 header bytes and a 24-byte union.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

impl UffdMsg {
    /// For a page fault: the faulting address.
    pub fn address(&self) -> u64 {
        self.arg[1]
    }
    pub fn flags(&self) -> u64 {
        self.arg[0]
    }
}

const _: () = {
    assert!(size_of::<UffdMsg>() == 32);
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
};

/// A userfaultfd, non-blocking, catching kernel-mode faults too.
pub struct Uffd {
    fd: OwnedFd,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    pub fn new() -> io::Result<Self> {
        // No UFFD_USER_MODE_ONLY: the device's faults are kernel-mode.
        // SAFETY: plain syscall.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours.
        let uffd = Uffd {
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: arg is the struct this request expects.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) })
    }

    /// Register [start, start+len) in MISSING mode; returns the ioctl mask.
    pub fn register_missing(&self, start: usize, len: usize) -> io::Result<u64> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)?;
        Ok(reg.ioctls)
    }

    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Install a copy of `src` at `dst` and wake the faulting threads.
    /// Retries EAGAIN, which the kernel returns while mappings change.
    pub fn copy(&self, dst: usize, src: &[u8]) -> io::Result<()> {
        loop {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                ..Default::default()
            };
            match self.ioctl(UFFDIO_COPY, &mut c) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                r => return r,
            }
        }
    }

    /// Map the zero page over [dst, dst+len) and wake.
    pub fn zeropage(&self, dst: usize, len: usize) -> io::Result<()> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst as u64,
                    len: len as u64,
                },
                ..Default::default()
            };
            match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                r => return r,
            }
        }
    }

    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// Wait up to `timeout` for the next event, or for `stop` to become
    /// readable (then `Ok(None)`).
    pub fn next_event(
        &self,
        stop: Option<RawFd>,
        timeout: Duration,
    ) -> io::Result<Option<UffdMsg>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pfds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no userfaultfd event",
                ));
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: two valid pollfds (fd -1 is ignored by poll).
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pfds[1].revents != 0 {
                return Ok(None);
            }
            if pfds[0].revents & libc::POLLIN == 0 {
                if pfds[0].revents != 0 {
                    return Err(io::Error::other(format!(
                        "userfaultfd poll: {:#x}",
                        pfds[0].revents
                    )));
                }
                continue;
            }
            let mut msg = UffdMsg::default();
            // SAFETY: reads one message into a local struct of its size.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    size_of::<UffdMsg>(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                // Another reader got it first, or a signal: wait again.
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    continue;
                }
                return Err(e);
            }
            if r as usize != size_of::<UffdMsg>() {
                return Err(io::Error::other(format!("short userfaultfd read: {r}")));
            }
            return Ok(Some(msg));
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An eventfd used to stop a handler thread.
pub struct StopFd(OwnedFd);

impl StopFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours.
        Ok(StopFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn raise(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// How the handler resolves a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// UFFDIO_COPY of a unit filled by the fill function.
    Copy,
    /// UFFDIO_ZEROPAGE.
    ZeroPage,
}

/// Fills the unit with index `unit` (counted from the region base).
pub type Fill = fn(unit: usize, buf: &mut [u8]);

#[derive(Clone, Copy)]
pub struct HandlerConfig {
    /// Start of the registered region; units are counted from here.
    pub base: usize,
    /// Bytes resolved per fault: the page size, or the huge page size.
    pub unit: usize,
    pub answer: Answer,
    pub fill: Fill,
    /// Sleep this long before answering each fault.
    pub delay: Duration,
}

impl HandlerConfig {
    pub fn copy(base: usize, unit: usize, fill: Fill) -> Self {
        HandlerConfig {
            base,
            unit,
            answer: Answer::Copy,
            fill,
            delay: Duration::ZERO,
        }
    }
}

/// What the handler saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Unit-aligned address of every fault answered, in order.
    pub faults: Vec<usize>,
    /// Faults whose unit was already there (EEXIST): answered by a wake.
    pub already_present: usize,
}

/// A thread that answers page faults on a userfaultfd until stopped.
pub struct Handler {
    stop: Arc<StopFd>,
    thread: Option<JoinHandle<io::Result<Stats>>>,
    seen: Arc<AtomicUsize>,
}

impl Handler {
    /// Starts the handler thread and returns once it waits for events:
    /// its start (stack, buffer) takes the mmap lock, which must not race
    /// with the faults it is there to serve, or with a benchmark's clock.
    pub fn spawn(uffd: Arc<Uffd>, cfg: HandlerConfig) -> io::Result<Self> {
        let stop = Arc::new(StopFd::new()?);
        let seen = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), seen.clone());
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || serve(&uffd, &cfg, &s, &n, ready_tx))?;
        let mut handler = Handler {
            stop,
            thread: Some(thread),
            seen,
        };
        if ready.recv().is_err() {
            // It ended before it was ready: its error says why.
            let t = handler.thread.take().expect("not joined yet");
            return match t.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(io::Error::other("uffd handler ended before it started")),
            };
        }
        Ok(handler)
    }

    /// Faults seen so far (including one being answered).
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// Stop the thread and return what it saw, or its error.
    pub fn stop(mut self) -> io::Result<Stats> {
        self.stop.raise();
        let t = self.thread.take().expect("joined once");
        t.join()
            .map_err(|_| io::Error::other("uffd handler panicked"))?
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.raise();
            let _ = t.join();
        }
    }
}

fn serve(
    uffd: &Uffd,
    cfg: &HandlerConfig,
    stop: &StopFd,
    seen: &AtomicUsize,
    ready: std::sync::mpsc::SyncSender<()>,
) -> io::Result<Stats> {
    // Written now, so that its pages are there before the first fault.
    let mut buf = vec![0xffu8; cfg.unit];
    let mut st = Stats::default();
    // The spawner waits for this; it may have given up already.
    let _ = ready.send(());
    drop(ready);
    // A long timeout only bounds a forgotten handler; tests stop it.
    while let Some(msg) = uffd.next_event(Some(stop.raw_fd()), Duration::from_secs(600))? {
        if msg.event != UFFD_EVENT_PAGEFAULT {
            return Err(io::Error::other(format!(
                "unexpected userfaultfd event {:#x}",
                msg.event
            )));
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let addr = msg.address() as usize & !(cfg.unit - 1);
        if !cfg.delay.is_zero() {
            std::thread::sleep(cfg.delay);
        }
        let r = match cfg.answer {
            Answer::Copy => {
                (cfg.fill)((addr - cfg.base) / cfg.unit, &mut buf);
                uffd.copy(addr, &buf)
            }
            Answer::ZeroPage => uffd.zeropage(addr, cfg.unit),
        };
        match r {
            Ok(()) => st.faults.push(addr),
            // A second fault on a unit already resolved: wake its waiter.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                st.already_present += 1;
                uffd.wake(addr, cfg.unit)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("resolving {addr:#x}: {e}"),
                ))
            }
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::Mapping;

    fn uffd_or_skip() -> Option<Arc<Uffd>> {
        match Uffd::new() {
            Ok(u) => Some(Arc::new(u)),
            Err(e) => {
                eprintln!("skipping: no userfaultfd on this host: {e}");
                None
            }
        }
    }

    fn fill(unit: usize, buf: &mut [u8]) {
        buf.fill(unit as u8 + 1);
    }

    /// CPU (user-mode) faults exercise the same handler on the host.
    #[test]
    fn handler_copies_and_zeroes() {
        let Some(uffd) = uffd_or_skip() else { return };
        let ps = crate::dmirror::page_size();
        for answer in [Answer::Copy, Answer::ZeroPage] {
            let m = Mapping::rw(8 * ps).unwrap();
            uffd.register_missing(m.addr(), m.len()).unwrap();
            let cfg = HandlerConfig {
                answer,
                ..HandlerConfig::copy(m.addr(), ps, fill)
            };
            let h = Handler::spawn(uffd.clone(), cfg).unwrap();
            for page in [5, 0, 7] {
                let want = if answer == Answer::Copy {
                    page as u8 + 1
                } else {
                    0
                };
                assert_eq!(m.bytes()[page * ps + 9], want);
            }
            assert_eq!(h.seen(), 3);
            let st = h.stop().unwrap();
            assert_eq!(st.faults, [5, 0, 7].map(|p| m.addr() + p * ps));
            uffd.unregister(m.addr(), m.len()).unwrap();
        }
    }

    #[test]
    fn copy_over_present_page_is_eexist() {
        let Some(uffd) = uffd_or_skip() else { return };
        let ps = crate::dmirror::page_size();
        let m = Mapping::rw(ps).unwrap();
        uffd.register_missing(m.addr(), ps).unwrap();
        let page = vec![3u8; ps];
        uffd.copy(m.addr(), &page).unwrap();
        assert_eq!(m.bytes()[0], 3);
        let e = uffd.copy(m.addr(), &page).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn next_event_times_out_and_stops() {
        let Some(uffd) = uffd_or_skip() else { return };
        let e = uffd
            .next_event(None, Duration::from_millis(20))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let stop = StopFd::new().unwrap();
        stop.raise();
        assert!(uffd
            .next_event(Some(stop.raw_fd()), Duration::from_secs(5))
            .unwrap()
            .is_none());
    }
}
