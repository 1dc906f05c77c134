// SPDX-License-Identifier: GPL-2.0

//! A per-command watchdog: fails the case, naming the command and showing
//! its task's kernel stack, when a command has not returned within a
//! bound.
//!
//! A task that loops in the kernel with preemption enabled leaves no splat
//! (no soft lockup, no hung-task report: it is running), and the harness
//! would only see the whole case time out, much later and without a name.
//! The commands in flight are kept in `MAP_SHARED` memory, so a command of
//! a child forked after [`Watchdog::start`] is watched too.

use crate::harness;
use crate::mem::Mapping;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Commands that can be watched at once; more run unwatched.
const SLOTS: usize = 256;

/// One command in flight.
#[repr(C)]
struct Slot {
    /// `CLOCK_MONOTONIC` milliseconds when it began, plus one; 0 if free.
    began: AtomicU64,
    /// What it is, for the caller's `describe`.
    what: AtomicU64,
    /// The thread that issued it.
    tid: AtomicU64,
}

pub struct Watchdog {
    slots: &'static [Slot],
    bound: Duration,
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Whether task `tid` still runs: it exists and is not a zombie.
fn task_alive(tid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which may hold ") ".
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
    })
}

impl Watchdog {
    /// Starts a thread that ends the process with status 3 once a command
    /// watched by [`Self::watch`] has been in flight for longer than
    /// `bound`, after sending `describe(what)` of that command and its
    /// task's kernel stack as diagnostics. It lives as long as the process:
    /// every case runs in a process of its own.
    pub fn start(bound: Duration, describe: fn(u64) -> String) -> io::Result<&'static Self> {
        let len = crate::mem::align_up(
            SLOTS * std::mem::size_of::<Slot>(),
            crate::dmirror::page_size(),
        );
        let map = Mapping::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
        )?;
        // SAFETY: the mapping is page aligned, zero-filled (every slot
        // free), at least SLOTS slots long, and leaked below, so it lives
        // for the rest of the process; Slot is atomics only.
        let slots = unsafe { std::slice::from_raw_parts(map.addr() as *const Slot, SLOTS) };
        std::mem::forget(map);
        let dog: &'static Self = Box::leak(Box::new(Watchdog { slots, bound }));
        std::thread::spawn(move || dog.guard(describe));
        Ok(dog)
    }

    fn guard(&self, describe: fn(u64) -> String) {
        let bound = self.bound.as_millis() as u64;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = monotonic_ms() + 1;
            for slot in self.slots {
                let began = slot.began.load(Ordering::SeqCst);
                if began == 0 || now.saturating_sub(began) <= bound {
                    continue;
                }
                let tid = slot.tid.load(Ordering::SeqCst);
                if !task_alive(tid) {
                    // A child that exited (or was killed) in the middle of
                    // a command, as the stress cases make them: nothing is
                    // stuck, the slot is just never given back.
                    let _ =
                        slot.began
                            .compare_exchange(began, 0, Ordering::SeqCst, Ordering::SeqCst);
                    continue;
                }
                harness::send_diag(&format!(
                    "watchdog: {} (task {tid}) has not returned after {:?}",
                    describe(slot.what.load(Ordering::SeqCst)),
                    self.bound
                ));
                for path in [format!("/proc/{tid}/stat"), format!("/proc/{tid}/stack")] {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        for line in text.lines() {
                            harness::send_diag(&format!("  {path}: {line}"));
                        }
                    }
                }
                // The command's task may be stuck in the kernel: end the
                // process from here (the runner reports the diagnostic).
                // SAFETY: plain syscall; ends the process.
                unsafe { libc::_exit(3) };
            }
        }
    }

    /// Runs `f`, the command `what`, under watch; returns its result and
    /// how long it took.
    pub fn watch<T>(&self, what: u64, f: impl FnOnce() -> T) -> (T, Duration) {
        let start = std::time::Instant::now();
        let began = monotonic_ms() + 1;
        let slot = self.slots.iter().find(|s| {
            s.began
                .compare_exchange(0, began, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        if let Some(slot) = slot {
            slot.what.store(what, Ordering::SeqCst);
            // SAFETY: gettid has no preconditions.
            slot.tid
                .store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
        }
        let r = f();
        if let Some(slot) = slot {
            slot.began.store(0, Ordering::SeqCst);
        }
        (r, start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_frees_its_slot() {
        let dog = Watchdog::start(Duration::from_secs(600), |w| w.to_string()).unwrap();
        let (r, _) = dog.watch(7, || {
            let busy: Vec<u64> = dog
                .slots
                .iter()
                .filter(|s| s.began.load(Ordering::SeqCst) != 0)
                .map(|s| s.what.load(Ordering::SeqCst))
                .collect();
            busy
        });
        assert_eq!(r, vec![7]);
        assert!(dog
            .slots
            .iter()
            .all(|s| s.began.load(Ordering::SeqCst) == 0));
    }

    /// Runs `child` in a forked process, which ends with status 0 when
    /// `child` returns; returns the wait status.
    fn wait_status_of(child: impl FnOnce()) -> i32 {
        // SAFETY: the child only runs `child` and _exit()s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            child();
            // SAFETY: plain syscall.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    /// A child that exits in the middle of a watched command leaves its
    /// slot taken; that is not a hang.
    #[test]
    fn a_command_whose_task_exited_is_not_a_hang() {
        let status = wait_status_of(|| {
            let dog = Watchdog::start(Duration::from_millis(300), |w| w.to_string()).unwrap();
            // SAFETY: the grandchild exits inside the command.
            let gone = unsafe { libc::fork() };
            if gone == 0 {
                // SAFETY: plain syscall, in the middle of the command.
                dog.watch(1, || unsafe { libc::_exit(0) });
            }
            let mut status = 0;
            // SAFETY: reaps the grandchild.
            unsafe { libc::waitpid(gone, &mut status, 0) };
            std::thread::sleep(Duration::from_millis(1500));
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    /// A command of a child forked after the start that outlives the
    /// bound ends the process that started the watchdog, with status 3.
    #[test]
    fn a_stuck_command_of_a_forked_child_ends_the_process() {
        let start = std::time::Instant::now();
        let status = wait_status_of(|| {
            let dog = Watchdog::start(Duration::from_millis(300), |w| w.to_string()).unwrap();
            // SAFETY: the grandchild only sleeps under watch.
            let stuck = unsafe { libc::fork() };
            if stuck == 0 {
                // SAFETY: plain syscall; the grandchild goes with its parent.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                dog.watch(1, || std::thread::sleep(Duration::from_secs(20)));
                // SAFETY: plain syscall.
                unsafe { libc::_exit(0) };
            }
            std::thread::sleep(Duration::from_secs(10));
            // SAFETY: the grandchild outlived the bound and was not seen.
            unsafe { libc::kill(stuck, libc::SIGKILL) };
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
