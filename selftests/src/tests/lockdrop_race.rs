// SPDX-License-Identifier: GPL-2.0

//! READ_UNLOCKABLE while the world changes under a waiting fault: the
//! region is unmapped, the userfaultfd is closed, the reader is signalled
//! or killed. The read must end (with an error where the memory is gone),
//! never hang.

use super::lockdrop::{
    check_faults, check_pages, hugetlb_registered, new_uffd, UffdRegion, HANDLER_SEED,
};
use super::prompt;
use crate::check::{check_each, expect_errno, pattern};
use crate::dmirror::{page_size, Dmirror};
use crate::harness::{describe, send_diag, Test, TestResult};
use crate::mem::{self, Mapping};
use crate::uffd::{Answer, Handler, HandlerConfig, UFFD_EVENT_PAGEFAULT};
use crate::{diag, ensure, ensure_eq};
use hmm_dmirror_uapi::HMM_DMIRROR_READ_UNLOCKABLE;
use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub const TESTS: &[Test] = &[
    Test::new("lockdrop.unmap_while_waiting", unmap_while_waiting),
    Test::new(
        "lockdrop.uffd_closed_while_waiting",
        uffd_closed_while_waiting,
    ),
    Test::new("lockdrop.nonfatal_signal", nonfatal_signal),
    Test::new("lockdrop.killed_while_waiting", killed_while_waiting),
    Test::new(
        "lockdrop.invalidate_while_waiting",
        invalidate_while_waiting,
    ),
    Test::new("lockdrop.wake_without_resolving", wake_without_resolving),
    Test::new("lockdrop.hugetlb_zeropage", hugetlb_zeropage),
];

type ReadResult = io::Result<crate::dmirror::Counters>;

/// Start READ_UNLOCKABLE of `n` pages at `addr` on another thread.
fn spawn_reader(
    d: Arc<Dmirror>,
    addr: usize,
    out: usize,
    n: usize,
) -> (mpsc::Receiver<ReadResult>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(d.read_unlockable(addr, out, n));
    });
    (rx, t)
}

/// The region is unmapped by another thread while the device's fault waits
/// for the handler. The handler's UFFDIO_COPY then finds no VMA; it wakes
/// the waiter instead, and the read must fail with EFAULT (the range has no
/// VMA any more), not hang or succeed.
fn unmap_while_waiting() -> TestResult {
    let (n, ps) = (4, page_size());
    let d = Arc::new(Dmirror::open(0)?);
    let r = UffdRegion::new(n)?;
    let uffd = r.uffd.clone();
    let (base, len) = r.map.leak();
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xEE);
    let (rx, reader) = spawn_reader(d, base, out.addr(), n);

    // We are the handler: take the fault, and do not answer yet.
    let msg = uffd.next_event(None, prompt())?.ok_or("no fault")?;
    ensure_eq!(msg.event, UFFD_EVENT_PAGEFAULT);
    let fault = msg.address() as usize & !(ps - 1);
    ensure_eq!(fault, base, "first fault");
    ensure!(
        rx.try_recv().is_err(),
        "the read returned before the fault was answered"
    );

    // Allocated before the munmap, so it cannot land in the freed range.
    let page = vec![0x11u8; ps];
    let unmapper = std::thread::spawn(move || mem::unmap(base, len));
    unmapper
        .join()
        .map_err(|_| "unmapper panicked".to_string())??;

    let copy = uffd.copy(fault, &page);
    diag!(
        "UFFDIO_COPY after munmap: {:?}",
        copy.as_ref().map_err(|e| e.to_string())
    );
    expect_errno(copy, libc::ENOENT, "UFFDIO_COPY into the unmapped range")?;
    uffd.wake(base, len)?;

    let res = rx
        .recv_timeout(prompt())
        .map_err(|_| format!("the read did not end within {:?} of the wake", prompt()))?;
    reader.join().map_err(|_| "reader panicked".to_string())?;
    expect_errno(
        res,
        libc::EFAULT,
        "READ_UNLOCKABLE of a range unmapped under it",
    )?;
    check_each("buffer after failed read", out.bytes(), |_| 0xEE)
}

/// While a fault on page `WAIT` waits for the handler, page `ZAP` (faulted
/// just before, in the same window) is zapped with MADV_DONTNEED. A module
/// that resumes the walk after the lock drop must notice the invalidation
/// and fault `ZAP` again: the handler is asked for it twice and answers the
/// second time with new content, which the read must return. Keeping the
/// first pfn would read the freed page.
fn invalidate_while_waiting() -> TestResult {
    const WAIT: usize = 8;
    const ZAP: usize = 3;
    let (n, ps) = (16, page_size());
    let d = Arc::new(Dmirror::open(0)?);
    let r = UffdRegion::new(n)?;
    let out = Mapping::rw(n * ps)?;
    let (rx, reader) = spawn_reader(d, r.base(), out.addr(), n);

    // We are the handler. Generation g of page p is pattern(g, p, ..).
    let seed = |generation: usize| HANDLER_SEED.wrapping_add(generation as u8);
    let mut answered = vec![0usize; n];
    let mut page = vec![0u8; ps];
    let res = loop {
        if let Ok(res) = rx.try_recv() {
            break res;
        }
        let Some(msg) = r.uffd.next_event(None, prompt())? else {
            continue;
        };
        ensure_eq!(msg.event, UFFD_EVENT_PAGEFAULT);
        let p = (msg.address() as usize - r.base()) / ps;
        ensure!(p < n, "fault outside the region");
        if p == WAIT && answered[WAIT] == 0 {
            ensure_eq!(answered[ZAP], 1, "page {ZAP} answered before page {WAIT}");
            mem::madvise(r.page(ZAP), ps, libc::MADV_DONTNEED)?;
        }
        for (off, b) in page.iter_mut().enumerate() {
            *b = pattern(seed(answered[p]), p, off);
        }
        r.uffd.copy(r.page(p), &page)?;
        answered[p] += 1;
        if answered.iter().all(|&a| a > 0) && answered[ZAP] == 2 {
            break rx
                .recv_timeout(prompt())
                .map_err(|_| "the read did not end".to_string())?;
        }
    };
    reader.join().map_err(|_| "reader panicked".to_string())?;
    let c = res?;
    ensure_eq!(c.cpages, n as u64);
    diag!("the handler answered page {ZAP} {} times", answered[ZAP]);
    ensure_eq!(answered[ZAP], 2, "the zapped page must be faulted again");
    ensure!(
        answered
            .iter()
            .enumerate()
            .all(|(p, &a)| p == ZAP || a == 1),
        "other pages answered more than once: {answered:?}"
    );
    check_each("device read", out.bytes(), |i| {
        let p = i / ps;
        pattern(seed(usize::from(p == ZAP)), p, i % ps)
    })
}

/// The handler takes the fault and closes the userfaultfd without
/// answering. Closing unregisters the range and wakes the waiter; the
/// retried fault is an ordinary one, so the read succeeds with zeros.
fn uffd_closed_while_waiting() -> TestResult {
    let (n, ps) = (8, page_size());
    let d = Arc::new(Dmirror::open(0)?);
    let map = Mapping::rw(n * ps)?;
    let uffd = new_uffd()?;
    uffd.register_missing(map.addr(), map.len())?;
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xEE);
    let (rx, reader) = spawn_reader(d, map.addr(), out.addr(), n);
    let msg = uffd.next_event(None, prompt())?.ok_or("no fault")?;
    ensure_eq!(msg.event, UFFD_EVENT_PAGEFAULT);
    ensure!(
        rx.try_recv().is_err(),
        "the read returned before the fault was answered"
    );
    drop(uffd);
    let c = end_of_read(rx, reader)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read", out.bytes(), |_| 0)?;
    check_each("CPU view", map.bytes(), |_| 0)
}

/// A handler that answers a hugetlb fault with UFFDIO_ZEROPAGE, which
/// hugetlb does not support: the ioctl fails with EINVAL and the fault is
/// never resolved. The read waits, then must end once the userfaultfd is
/// closed (the range is no longer registered: it reads fresh zeros).
fn hugetlb_zeropage() -> TestResult {
    let (map, uffd) = hugetlb_registered()?;
    let hsize = map.len();
    let n = hsize / page_size();
    let d = Arc::new(Dmirror::open(0)?);
    let cfg = HandlerConfig {
        answer: Answer::ZeroPage,
        ..HandlerConfig::copy(map.addr(), hsize, |_, _| {})
    };
    let h = Handler::spawn(uffd.clone(), cfg)?;
    let mut out = Mapping::rw(hsize)?;
    out.bytes_mut().fill(0xEE);
    let (rx, reader) = spawn_reader(d, map.addr(), out.addr(), n);
    let start = Instant::now();
    while h.seen() == 0 && start.elapsed() < prompt() {
        std::thread::sleep(Duration::from_millis(1));
    }
    ensure!(h.seen() > 0, "no fault reached the handler");
    let err = match h.stop() {
        Err(e) => e,
        Ok(st) => return Err(format!("UFFDIO_ZEROPAGE on hugetlb succeeded: {st:?}").into()),
    };
    // The handler keeps the errno's kind: EINVAL is InvalidInput.
    ensure_eq!(err.kind(), io::ErrorKind::InvalidInput, "handler: {err}");
    ensure!(
        rx.try_recv().is_err(),
        "the read returned though its fault was never resolved"
    );
    drop(uffd);
    let c = end_of_read(rx, reader)?;
    ensure_eq!(c.cpages, n as u64);
    check_each("device read", out.bytes(), |_| 0)
}

/// The result of a read started by [`spawn_reader`], which must end within
/// the prompt bound now that its userfaultfd is closed.
fn end_of_read(rx: mpsc::Receiver<ReadResult>, reader: std::thread::JoinHandle<()>) -> ReadResult {
    let res = rx.recv_timeout(prompt()).map_err(|_| {
        io::Error::other(format!(
            "the read did not end within {:?} of the close",
            prompt()
        ))
    })?;
    reader
        .join()
        .map_err(|_| io::Error::other("reader panicked"))?;
    res
}

/// The handler answers every fault with UFFDIO_WAKE alone: the fault
/// drops the lock, the retry faults the same page, and so on. The read
/// must end with EBUSY while the handler still wakes (a second after the
/// retries stop getting further), not retry for as long as the handler
/// keeps waking. C's READ_UNLOCKED asks
/// `hmm_range_fault_unlocked_timeout()` for no timeout at all, so it
/// retries until killed, by design; with a timeout, plain 7.3 restarted
/// the clock at every drop and never gave up either (patch 0009).
fn wake_without_resolving() -> TestResult {
    if !std::path::Path::new("/sys/module/rust_hmm_dmirror").exists() {
        crate::skip!("C's READ_UNLOCKED retries for as long as the handler wakes (timeout 0)");
    }
    let (n, ps) = (4, page_size());
    let d = Arc::new(Dmirror::open(0)?);
    let r = UffdRegion::new(n)?;
    let uffd = r.uffd.clone();
    let mut out = Mapping::rw(n * ps)?;
    out.bytes_mut().fill(0xEE);
    let (rx, reader) = spawn_reader(d, r.base(), out.addr(), n);
    let start = Instant::now();
    let mut wakes = 0;
    let res = loop {
        if let Ok(res) = rx.try_recv() {
            break Some(res);
        }
        if start.elapsed() > prompt() {
            break None;
        }
        let msg = match uffd.next_event(None, Duration::from_millis(100)) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => None,
            r => r?,
        };
        if let Some(msg) = msg {
            ensure_eq!(msg.event, UFFD_EVENT_PAGEFAULT);
            ensure_eq!(msg.address() as usize & !(ps - 1), r.base(), "fault");
            uffd.wake(r.base(), ps)?;
            wakes += 1;
        }
    };
    let Some(res) = res else {
        // Resolve the faults, so that the read ends and the test can too.
        let h = r.handler()?;
        let res = rx.recv_timeout(prompt());
        reader.join().map_err(|_| "reader panicked".to_string())?;
        h.stop()?;
        return Err(format!(
            "the read still retried after {wakes} wakes in {:?} (then: {:?})",
            prompt(),
            res.map(|r| r.map(|c| c.cpages))
        )
        .into());
    };
    reader.join().map_err(|_| "reader panicked".to_string())?;
    diag!("{wakes} wakes before the read gave up");
    ensure!(wakes > 1, "the read gave up after {wakes} wake(s)");
    expect_errno(res, libc::EBUSY, "READ_UNLOCKABLE whose handler only wakes")?;
    check_each("buffer after the failed read", out.bytes(), |_| 0xEE)
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

/// SIGUSR1 (caught, no SA_RESTART) hits the reader over and over while a
/// slow handler answers. A non-fatal signal must not abort the read: one
/// ioctl, not retried on EINTR, completes.
fn nonfatal_signal() -> TestResult {
    let (n, ps) = (8, page_size());
    // SAFETY: installs a handler that does nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        ensure_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let d = Arc::new(Dmirror::open(0)?);
    let r = UffdRegion::new(n)?;
    let cfg = HandlerConfig {
        delay: Duration::from_millis(50),
        ..HandlerConfig::copy(r.base(), ps, super::lockdrop::fill_handler)
    };
    let h = Handler::spawn(r.uffd.clone(), cfg)?;
    let out = Mapping::rw(n * ps)?;
    let (tx, rx) = mpsc::channel();
    let (base, dst) = (r.base(), out.addr());
    let reader = std::thread::spawn(move || {
        let _ = tx.send(d.cmd_once(HMM_DMIRROR_READ_UNLOCKABLE, base, dst, n));
    });
    let tid = reader.as_pthread_t();
    let mut sent = 0;
    let res = loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(res) => break res,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // SAFETY: the reader thread is alive until it sends.
                unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
                sent += 1;
            }
            Err(e) => return Err(format!("reader: {e}").into()),
        }
    };
    reader.join().map_err(|_| "reader panicked".to_string())?;
    let st = h.stop()?;
    diag!("{sent} signals sent during the read");
    ensure!(sent > 0, "the read ended before any signal was sent");
    let c = res.map_err(|e| format!("the read, hit by {sent} SIGUSR1: {e}"))?;
    ensure_eq!(c.cpages, n as u64);
    check_faults(&st, r.base(), 0..n)?;
    check_pages("device read", out.bytes(), |_| HANDLER_SEED)
}

/// A child reads through a handler thread that takes the fault and exits
/// without answering. The read waits for ever; SIGKILL must end the child
/// promptly (the wait is killable), leaving no hung task.
fn killed_while_waiting() -> TestResult {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two.
    ensure_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (rfd, wfd) = (fds[0], fds[1]);
    // SAFETY: the child runs reader_child() and _exit()s.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the child's copy of the read end.
        unsafe { libc::close(rfd) };
        let code = match reader_child(wfd) {
            Ok(code) => code,
            Err(e) => {
                send_diag(&format!("child: {e}"));
                2
            }
        };
        // SAFETY: leaves the child.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: the parent's copy of the write end.
    unsafe { libc::close(wfd) };
    let res = watch_and_kill(pid, rfd);
    // SAFETY: closes our read end; kills and reaps the child if still there.
    unsafe {
        libc::close(rfd);
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
    }
    res
}

/// In the child: report `F` once the handler has the fault, `R` if the
/// read ever returns. Exit code 3 means the read returned.
fn reader_child(wfd: i32) -> io::Result<i32> {
    let n = 4;
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(n).map_err(|e| io::Error::other(format!("{e:?}")))?;
    let uffd = r.uffd.clone();
    let told = Arc::new(AtomicBool::new(false));
    let t = told.clone();
    // The handler takes one fault and leaves without answering; the fd
    // stays open, so the fault stays pending.
    std::thread::spawn(move || {
        if let Ok(Some(_)) = uffd.next_event(None, Duration::from_secs(60)) {
            t.store(true, Ordering::SeqCst);
            write_byte(wfd, b'F');
        }
    });
    let out = Mapping::rw(n * page_size())?;
    let res = d.read_unlockable(r.base(), out.addr(), n);
    write_byte(wfd, b'R');
    send_diag(&format!(
        "child: the read returned {res:?} (handler told: {})",
        told.load(Ordering::SeqCst)
    ));
    Ok(3)
}

pub(super) fn write_byte(fd: i32, b: u8) {
    // SAFETY: writes one byte from a local.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Wait until the child's handler has the fault, check the read is still
/// blocked, SIGKILL the child and time its death.
fn watch_and_kill(pid: i32, rfd: i32) -> TestResult {
    let got = read_byte(rfd, prompt())?;
    ensure_eq!(
        got,
        Some(b'F'),
        "child's first message (F = handler took the fault)"
    );
    // Give a wrongly returning read time to show itself.
    std::thread::sleep(Duration::from_millis(300));
    let mut status = 0;
    // SAFETY: polls our child.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    ensure!(
        r == 0,
        "the child ended before the kill: {}",
        describe(status)
    );
    ensure_eq!(
        read_byte(rfd, Duration::ZERO)?,
        None,
        "message before the kill (R = read returned)"
    );

    // SAFETY: kills our child.
    ensure_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let start = Instant::now();
    loop {
        // SAFETY: polls our child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        ensure!(
            start.elapsed() < prompt(),
            "the child survived SIGKILL for {:?}: stuck in the read",
            prompt()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    diag!(
        "the child died {} ms after SIGKILL",
        start.elapsed().as_millis()
    );
    ensure!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "child {}",
        describe(status)
    );
    Ok(())
}

/// One byte from the pipe within `timeout`; None on timeout or EOF.
pub(super) fn read_byte(fd: i32, timeout: Duration) -> io::Result<Option<u8>> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None);
    }
    let mut b = 0u8;
    // SAFETY: reads one byte into a local.
    let r = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
    Ok(if r == 1 { Some(b) } else { None })
}
