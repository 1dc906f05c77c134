// SPDX-License-Identifier: GPL-2.0

//! The test runner: every test runs in a forked child with a timeout, so a
//! crash or a hang in one test cannot take the run down with it.
//!
//! The child reports over a pipe, one message a line: `D text` is a
//! diagnostic, `P`, `F reason` and `S reason` are the result. The parent
//! prints everything, so the KTAP stream stays in order.

use crate::ktap::{self, Counts, Outcome};
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why a test did not pass.
#[derive(Debug)]
pub enum Failure {
    Fail(String),
    Skip(String),
}

pub type TestResult = Result<(), Failure>;

// `?` passes its own location to a #[track_caller] From: the failure says
// which line's call failed.
impl From<io::Error> for Failure {
    #[track_caller]
    fn from(e: io::Error) -> Self {
        let at = std::panic::Location::caller();
        Failure::Fail(format!("{}:{}: {e}", at.file(), at.line()))
    }
}

impl From<&str> for Failure {
    #[track_caller]
    fn from(s: &str) -> Self {
        let at = std::panic::Location::caller();
        Failure::Fail(format!("{}:{}: {s}", at.file(), at.line()))
    }
}

impl From<String> for Failure {
    #[track_caller]
    fn from(s: String) -> Self {
        s.as_str().into()
    }
}

pub struct Test {
    pub name: &'static str,
    pub func: fn() -> TestResult,
    pub timeout: Duration,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest timeout scale: a hang must still end the test.
const MAX_TIMEOUT_SCALE: u32 = 10;

/// What each test's own timeout, and the bounds a test puts on "promptly",
/// are multiplied by: `DMIRROR_TIMEOUT_SCALE`, clamped to 1..=10.
/// scripts/vm-run sets it to 4 under TCG, where the guest runs many times
/// slower than the hardware the bounds were chosen on.
pub fn timeout_scale() -> u32 {
    static SCALE: OnceLock<u32> = OnceLock::new();
    *SCALE.get_or_init(|| parse_scale(std::env::var("DMIRROR_TIMEOUT_SCALE").ok().as_deref()))
}

fn parse_scale(value: Option<&str>) -> u32 {
    value
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .clamp(1, MAX_TIMEOUT_SCALE)
}

/// `d` times the timeout scale.
pub fn scaled(d: Duration) -> Duration {
    d * timeout_scale()
}

impl Test {
    pub const fn new(name: &'static str, func: fn() -> TestResult) -> Self {
        Test {
            name,
            func,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub const fn with_timeout(mut self, secs: u64) -> Self {
        self.timeout = Duration::from_secs(secs);
        self
    }
}

/// Fail the test with a location and message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        $crate::ensure!($cond, "{}", stringify!($cond))
    };
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::harness::Failure::Fail(format!(
                "{}:{}: {}", file!(), line!(), format!($($fmt)+)
            )));
        }
    };
}

/// Fail the test unless `left == right`, printing both.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {
        $crate::ensure_eq!($left, $right, "{} == {}", stringify!($left), stringify!($right))
    };
    ($left:expr, $right:expr, $($fmt:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if *l != *r {
            return Err($crate::harness::Failure::Fail(format!(
                "{}:{}: {}: left {:?}, right {:?}", file!(), line!(), format!($($fmt)+), l, r
            )));
        }
    }};
}

/// Skip the test with a reason.
#[macro_export]
macro_rules! skip {
    ($($fmt:tt)+) => {
        return Err($crate::harness::Failure::Skip(format!($($fmt)+)))
    };
}

/// Print a diagnostic line from inside a test.
#[macro_export]
macro_rules! diag {
    ($($fmt:tt)+) => {
        $crate::harness::send_diag(&format!($($fmt)+))
    };
}

/// The write end of the report pipe, in a test child; -1 elsewhere.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

fn send(kind: char, text: &str) {
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // A diagnostic may span lines; a result is one line.
    let lines: Vec<&str> = text.lines().collect();
    let msg = if kind == 'D' && !lines.is_empty() {
        lines.iter().map(|l| format!("D {l}\n")).collect()
    } else {
        format!("{kind} {}\n", lines.join(" | "))
    };
    if fd < 0 {
        // Not in a test child (e.g. a unit test calling a helper).
        eprint!("{msg}");
        return;
    }
    let mut buf = msg.as_bytes();
    while !buf.is_empty() {
        // SAFETY: writes from a live buffer to a pipe we own.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

pub fn send_diag(text: &str) {
    send('D', text);
}

/// Run `f` in a forked child of the test and wait for it. The child's
/// failure is sent as a diagnostic; its exit status is 0 on success, 1 on
/// failure, 2 on skip. Returns the wait status.
pub fn fork_and_wait(f: impl FnOnce() -> TestResult) -> io::Result<i32> {
    let _ = io::stdout().flush();
    // SAFETY: the child runs f and _exit()s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => 0,
            Ok(Err(Failure::Fail(why))) => {
                send_diag(&format!("child: {why}"));
                1
            }
            Ok(Err(Failure::Skip(why))) => {
                send_diag(&format!("child skipped: {why}"));
                2
            }
            Err(_) => 1,
        };
        // SAFETY: ends the child without unwinding into the test.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What the parent learnt about one test.
#[derive(Debug)]
pub struct Report {
    pub outcome: Outcome,
    pub diags: Vec<String>,
    pub elapsed: Duration,
}

/// How long to wait for a killed or finished child to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(10);

/// Run one test in a forked child.
pub fn run_one(test: &Test, timeout: Duration) -> Report {
    let start = Instant::now();
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return internal_error(start, "pipe2", io::Error::last_os_error());
    }
    let (rfd, wfd) = (fds[0], fds[1]);
    let _ = io::stdout().flush();
    // SAFETY: the child only runs the test and _exit()s; it never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        close(rfd);
        close(wfd);
        return internal_error(start, "fork", e);
    }
    if pid == 0 {
        close(rfd);
        child(test, wfd);
    }
    close(wfd);
    // Its own process group, so a timeout also kills what the test forked.
    // SAFETY: plain syscall on our child.
    unsafe { libc::setpgid(pid, pid) };

    let deadline = start + timeout;
    let (result, diags, timed_out) = collect(rfd, deadline);
    close(rfd);
    if timed_out {
        kill_group(pid);
    }
    let status = reap(pid);
    // Whatever the test left behind in its group goes too.
    kill_group(pid);

    let outcome = match (timed_out, result, status) {
        (true, _, _) => Outcome::Fail(format!("timed out after {timeout:?}")),
        (_, _, None) => Outcome::Fail("the test process could not be reaped (unkillable?)".into()),
        (_, Some(r), Some(st)) if exited_zero(st) => r,
        (_, Some(_), Some(st)) => Outcome::Fail(format!("reported, then {}", describe(st))),
        (_, None, Some(st)) => {
            Outcome::Fail(format!("no result: the test process {}", describe(st)))
        }
    };
    Report {
        outcome,
        diags,
        elapsed: start.elapsed(),
    }
}

fn internal_error(start: Instant, what: &str, e: io::Error) -> Report {
    Report {
        outcome: Outcome::Fail(format!("runner: {what}: {e}")),
        diags: Vec::new(),
        elapsed: start.elapsed(),
    }
}

fn child(test: &Test, wfd: i32) -> ! {
    REPORT_FD.store(wfd, Ordering::Relaxed);
    // SAFETY: plain syscall.
    unsafe { libc::setpgid(0, 0) };
    panic::set_hook(Box::new(|info| send_diag(&format!("panic: {info}"))));
    let outcome = panic::catch_unwind(AssertUnwindSafe(test.func));
    match outcome {
        Ok(Ok(())) => send('P', ""),
        Ok(Err(Failure::Fail(why))) => send('F', &why),
        Ok(Err(Failure::Skip(why))) => send('S', &why),
        Err(_) => send('F', "the test panicked"),
    }
    // SAFETY: leave without running destructors or atexit handlers of the
    // parent's copy of the process.
    unsafe { libc::_exit(0) }
}

/// Read the child's messages until EOF, a result, or the deadline.
fn collect(rfd: i32, deadline: Instant) -> (Option<Outcome>, Vec<String>, bool) {
    let mut diags = Vec::new();
    let mut pending = Vec::new();
    let mut result = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (result, diags, true);
        }
        let mut pfd = libc::pollfd {
            fd: rfd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (result, diags, false);
        }
        if n == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a local buffer.
        let r = unsafe { libc::read(rfd, buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if r <= 0 {
            return (result, diags, false);
        }
        pending.extend_from_slice(&buf[..r as usize]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            match parse_message(&line) {
                Message::Diag(d) => diags.push(d),
                Message::Result(o) => result = Some(o),
            }
        }
        // Grandchildren may hold the pipe open: a result is enough.
        if result.is_some() {
            return (result, diags, false);
        }
    }
}

enum Message {
    Diag(String),
    Result(Outcome),
}

fn parse_message(line: &str) -> Message {
    let (kind, text) = line.split_at(line.len().min(1));
    let text = text.strip_prefix(' ').unwrap_or(text).to_string();
    match kind {
        "P" => Message::Result(Outcome::Pass),
        "F" => Message::Result(Outcome::Fail(text)),
        "S" => Message::Result(Outcome::Skip(text)),
        "D" => Message::Diag(text),
        _ => Message::Diag(line.to_string()),
    }
}

fn kill_group(pid: i32) {
    // SAFETY: plain syscall; ESRCH when the group is gone is fine.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}

/// waitpid() with a bound: a child stuck in the kernel must not hang the run.
fn reap(pid: i32) -> Option<i32> {
    let until = Instant::now() + REAP_GRACE;
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: plain syscall on our child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
        if Instant::now() >= until {
            if killed {
                return None;
            }
            // It sent its result but does not exit: kill it and wait again.
            kill_group(pid);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn exited_zero(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

pub fn describe(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!("was killed by signal {sig} ({})", signal_name(sig))
    } else if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else {
        format!("ended with wait status {status:#x}")
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        _ => "?",
    }
}

fn close(fd: i32) {
    // SAFETY: closes a descriptor this function's caller owns.
    unsafe { libc::close(fd) };
}

/// Run `tests` in order and print KTAP to `out`. Returns the totals.
pub fn run(tests: &[&Test], timeout: Option<Duration>, out: &mut dyn Write) -> io::Result<Counts> {
    let mut counts = Counts::default();
    writeln!(out, "{}", ktap::header())?;
    writeln!(out, "{}", ktap::plan(tests.len()))?;
    if timeout.is_none() && timeout_scale() > 1 {
        let msg = format!(
            "per-test timeouts x{} (DMIRROR_TIMEOUT_SCALE)",
            timeout_scale()
        );
        writeln!(out, "{}", ktap::diag(&msg))?;
    }
    for (i, test) in tests.iter().enumerate() {
        writeln!(out, "{}", ktap::diag(&format!("RUN {}", test.name)))?;
        out.flush()?;
        let report = run_one(test, timeout.unwrap_or_else(|| scaled(test.timeout)));
        for d in &report.diags {
            writeln!(out, "{}", ktap::diag(d))?;
        }
        if let Outcome::Fail(why) = &report.outcome {
            writeln!(out, "{}", ktap::diag(&format!("FAIL {}: {why}", test.name)))?;
        }
        writeln!(
            out,
            "{}",
            ktap::diag(&format!(
                "{} took {} ms",
                test.name,
                report.elapsed.as_millis()
            ))
        )?;
        writeln!(
            out,
            "{}",
            ktap::result_line(i + 1, test.name, &report.outcome)
        )?;
        out.flush()?;
        counts.add(&report.outcome);
    }
    writeln!(out, "{}", ktap::totals_line(&counts))?;
    writeln!(out, "{}", ktap::summary_line(&counts))?;
    out.flush()?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_scale_is_clamped() {
        assert_eq!(parse_scale(None), 1);
        assert_eq!(parse_scale(Some("")), 1);
        assert_eq!(parse_scale(Some("x")), 1);
        assert_eq!(parse_scale(Some("0")), 1);
        assert_eq!(parse_scale(Some("4")), 4);
        assert_eq!(parse_scale(Some(" 3\n")), 3);
        assert_eq!(parse_scale(Some("1000")), MAX_TIMEOUT_SCALE);
    }

    fn pass() -> TestResult {
        crate::diag!("hello\nworld");
        Ok(())
    }
    fn fail() -> TestResult {
        ensure_eq!(1 + 1, 3, "arithmetic");
        Ok(())
    }
    fn skip() -> TestResult {
        skip!("not here")
    }
    fn panics() -> TestResult {
        panic!("boom")
    }
    fn segfaults() -> TestResult {
        // SAFETY: deliberately not; the child is meant to die of SIGSEGV.
        unsafe { (8 as *mut u32).write_volatile(1) };
        Ok(())
    }
    fn hangs() -> TestResult {
        // A grandchild that hangs too: the timeout must kill the group.
        // SAFETY: the grandchild only sleeps.
        if unsafe { libc::fork() } == 0 {
            std::thread::sleep(Duration::from_secs(100));
        }
        std::thread::sleep(Duration::from_secs(100));
        Ok(())
    }
    const IO_ERROR_LINE: u32 = line!() + 2;
    fn io_error() -> TestResult {
        Err(io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(())
    }
    fn exits() -> TestResult {
        // SAFETY: ends the child without a result.
        unsafe { libc::_exit(3) }
    }

    fn one(f: fn() -> TestResult) -> Report {
        run_one(&Test::new("t", f), Duration::from_secs(20))
    }

    #[test]
    fn outcomes_cross_the_fork() {
        let r = one(pass);
        assert_eq!(r.outcome, Outcome::Pass);
        assert_eq!(r.diags, ["hello", "world"]);
        match one(fail).outcome {
            Outcome::Fail(why) => assert!(why.contains("arithmetic: left 2, right 3"), "{why}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(one(skip).outcome, Outcome::Skip("not here".into()));
        match one(io_error).outcome {
            // `?` reports where it was used.
            Outcome::Fail(why) => assert!(
                why.contains(&format!("harness.rs:{}", IO_ERROR_LINE))
                    && why.contains("Bad address"),
                "{why}"
            ),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn crashes_are_failures() {
        let r = one(panics);
        assert_eq!(r.outcome, Outcome::Fail("the test panicked".into()));
        assert!(r.diags.iter().any(|d| d.contains("boom")), "{:?}", r.diags);
        match one(segfaults).outcome {
            Outcome::Fail(why) => assert!(why.contains("SIGSEGV"), "{why}"),
            o => panic!("{o:?}"),
        }
        match one(exits).outcome {
            Outcome::Fail(why) => assert!(why.contains("status 3"), "{why}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn hangs_time_out() {
        let start = Instant::now();
        let r = run_one(&Test::new("t", hangs), Duration::from_millis(500));
        assert_eq!(r.outcome, Outcome::Fail("timed out after 500ms".into()));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_prints_ktap() {
        let a = Test::new("g.pass", pass);
        let b = Test::new("g.fail", fail);
        let c = Test::new("g.skip", skip);
        let mut out = Vec::new();
        let counts = run(&[&a, &b, &c], None, &mut out).unwrap();
        assert_eq!(
            counts,
            Counts {
                pass: 1,
                fail: 1,
                skip: 1
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "TAP version 13");
        assert_eq!(lines[1], "1..3");
        assert!(lines.contains(&"ok 1 g.pass"));
        assert!(lines.contains(&"# hello"));
        assert!(lines.contains(&"not ok 2 g.fail"));
        assert!(lines.contains(&"ok 3 g.skip # SKIP not here"));
        assert_eq!(
            lines[lines.len() - 2],
            "# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0"
        );
        assert_eq!(lines[lines.len() - 1], "1 passed, 1 failed, 1 skipped");
        assert!(lines.iter().all(|l| l.starts_with('#')
            || l.starts_with("ok ")
            || l.starts_with("not ok ")
            || l.starts_with("TAP ")
            || l.starts_with("1..")
            || l.ends_with(" skipped")));
    }
}
