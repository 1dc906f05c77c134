// SPDX-License-Identifier: GPL-2.0

//! `stress.*`: bounded races between dmirror ioctls and everything that can
//! change under them: the address space (munmap, mmap, mprotect, mremap,
//! MADV_DONTNEED, fork), the file (close), the process (exit) and a
//! userfaultfd handler (SIGKILL).
//!
//! A case passes if every ioctl that returned gave success or an errno in
//! the set allowed for its command (listed with each case), nothing
//! crashed and it ended within its bound. Each prints `# N ioctls` and a
//! breakdown by command and result. A command that has not returned after
//! 30 s (times `DMIRROR_TIMEOUT_SCALE`) fails the case at once, named, with
//! its task's kernel stack ([`Watchdog`]): a task looping in the kernel
//! leaves no splat.
//!
//! Bounds: each case runs for `DMIRROR_STRESS_SECS` seconds (default 3) or
//! until `DMIRROR_STRESS_IOCTLS` ioctls were issued, whichever comes first.
//! `DMIRROR_STRESS_SEED` fixes the random seed (printed either way). The
//! runner's timeout for these cases is 120 s: for longer runs pass
//! `--timeout` too, e.g.
//! `DMIRROR_STRESS_SECS=600 DMIRROR_STRESS_IOCTLS=100000 hmm-dmirror-selftests --timeout 900 stress`.

use super::lockdrop::{fill_handler, UffdRegion, HANDLER_SEED};
use super::ops::{Op, OPS};
use super::{prompt, reap};
use crate::check::{check_each, pattern};
use crate::dmirror::{errno_name, ioctl_raw, page_size, Dmirror};
use crate::harness::{describe, scaled, Failure, Test, TestResult};
use crate::mem::{self, Guarded, Mapping};
use crate::watchdog::Watchdog;
use crate::{diag, ensure, ensure_eq};
use hmm_dmirror_uapi::{HmmDmirrorCmd, HMM_DMIRROR_MIGRATE_TO_DEV, HMM_DMIRROR_RELEASE};
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

/// The runner's timeout for a stress case: the case bounds itself, this
/// only catches a hang.
const TIMEOUT_SECS: u64 = 120;

pub const TESTS: &[Test] = &[
    Test::new("stress.mm_churn", mm_churn).with_timeout(TIMEOUT_SECS),
    Test::new("stress.close_during_ioctl", close_during_ioctl).with_timeout(TIMEOUT_SECS),
    Test::new("stress.exit_during_ioctl", exit_during_ioctl).with_timeout(TIMEOUT_SECS),
    Test::new("stress.uffd_handler_killed", uffd_handler_killed).with_timeout(TIMEOUT_SECS),
];

/// The stress bounds, from the environment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub duration: Duration,
    pub max_ioctls: u64,
    pub seed: u64,
}

pub const DEFAULT_SECS: f64 = 3.0;

/// Parse `DMIRROR_STRESS_SECS` (seconds, may be fractional),
/// `DMIRROR_STRESS_IOCTLS` (a count) and `DMIRROR_STRESS_SEED` (decimal or
/// 0x hex). `seed_default` is used without a seed.
pub fn parse_config(
    secs: Option<&str>,
    ioctls: Option<&str>,
    seed: Option<&str>,
    seed_default: u64,
) -> Result<Config, String> {
    let secs = match secs.map(str::trim).filter(|s| !s.is_empty()) {
        None => DEFAULT_SECS,
        Some(s) => match s.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => v,
            _ => {
                return Err(format!(
                    "DMIRROR_STRESS_SECS={s:?}: want seconds in (0, 86400]"
                ))
            }
        },
    };
    let max_ioctls = match ioctls.map(str::trim).filter(|s| !s.is_empty()) {
        None => u64::MAX,
        Some(s) => match s.parse::<u64>() {
            Ok(v) if v > 0 => v,
            _ => {
                return Err(format!(
                    "DMIRROR_STRESS_IOCTLS={s:?}: want a positive count"
                ))
            }
        },
    };
    let seed = match seed.map(str::trim).filter(|s| !s.is_empty()) {
        None => seed_default,
        Some(s) => {
            parse_number(s).ok_or_else(|| format!("DMIRROR_STRESS_SEED={s:?}: want a number"))?
        }
    };
    Ok(Config {
        duration: Duration::from_secs_f64(secs),
        max_ioctls,
        seed,
    })
}

/// A decimal or `0x` hexadecimal number, as seeds are printed.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn config() -> Result<Config, Failure> {
    let var = |n| std::env::var(n).ok();
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let c = parse_config(
        var("DMIRROR_STRESS_SECS").as_deref(),
        var("DMIRROR_STRESS_IOCTLS").as_deref(),
        var("DMIRROR_STRESS_SEED").as_deref(),
        clock ^ std::process::id() as u64,
    )
    .map_err(Failure::Fail)?;
    diag!(
        "bounds: {:.1} s, {} ioctls; seed {:#x}",
        c.duration.as_secs_f64(),
        if c.max_ioctls == u64::MAX {
            "unlimited".to_string()
        } else {
            c.max_ioctls.to_string()
        },
        c.seed
    );
    Ok(c)
}

/// xorshift64*: small, deterministic for a seed, no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Never zero, and nearby seeds far apart.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Errnos above this are tallied together.
const MAX_ERRNO: usize = 255;
const SLOTS_PER_OP: usize = MAX_ERRNO + 1;
/// Slot index of the issued-ioctl counter, after the per-op tables.
const ISSUED: usize = 10 * SLOTS_PER_OP;
const STOP: usize = ISSUED + 1;
/// Where a child got to, for the report if it does not end.
const PHASE: usize = STOP + 1;
const SLOTS: usize = PHASE + 1;

/// Counters in MAP_SHARED memory, so that forked children count too:
/// results per command and errno (slot 0 is success), ioctls issued, and
/// a stop flag.
pub struct Tally {
    map: Mapping,
}

impl Tally {
    pub fn new() -> io::Result<Self> {
        let len = mem::align_up(SLOTS * 8, page_size());
        Ok(Tally {
            map: Mapping::new(
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
            )?,
        })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < SLOTS);
        // SAFETY: the mapping is page aligned, zero-filled, SLOTS words
        // long and lives as long as self; AtomicU64 has u64's layout.
        unsafe { &*(self.map.addr() as *const AtomicU64).add(i) }
    }

    /// Count an ioctl about to be issued.
    pub fn issue(&self) {
        self.slot(ISSUED).fetch_add(1, Ordering::Relaxed);
    }

    /// Count what it returned.
    pub fn record<T>(&self, op: Op, r: &io::Result<T>) {
        let e = match r {
            Ok(_) => 0,
            Err(e) => (e.raw_os_error().unwrap_or(MAX_ERRNO as i32) as usize).clamp(1, MAX_ERRNO),
        };
        self.slot(op.nr() * SLOTS_PER_OP + e)
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn issued(&self) -> u64 {
        self.slot(ISSUED).load(Ordering::Relaxed)
    }

    pub fn count(&self, op: Op, errno: usize) -> u64 {
        self.slot(op.nr() * SLOTS_PER_OP + errno.min(MAX_ERRNO))
            .load(Ordering::Relaxed)
    }

    pub fn returned(&self) -> u64 {
        OPS.iter()
            .map(|&op| (0..SLOTS_PER_OP).map(|e| self.count(op, e)).sum::<u64>())
            .sum()
    }

    pub fn stop(&self) {
        self.slot(STOP).store(1, Ordering::SeqCst);
    }

    /// Clears [`Self::stop`], for another round.
    pub fn resume(&self) {
        self.slot(STOP).store(0, Ordering::SeqCst);
    }

    pub fn stopped(&self) -> bool {
        self.slot(STOP).load(Ordering::Relaxed) != 0
    }

    pub fn set_phase(&self, phase: u64) {
        self.slot(PHASE).store(phase, Ordering::SeqCst);
    }

    pub fn phase(&self) -> u64 {
        self.slot(PHASE).load(Ordering::SeqCst)
    }

    /// One line per command: `READ: 10 ok, 2 EFAULT`.
    pub fn breakdown(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for &op in OPS {
            let parts: Vec<String> = (0..SLOTS_PER_OP)
                .filter_map(|e| {
                    let n = self.count(op, e);
                    (n > 0).then(|| format!("{n} {}", errno_label(e as i32)))
                })
                .collect();
            if !parts.is_empty() {
                lines.push(format!("{}: {}", op.name(), parts.join(", ")));
            }
        }
        lines
    }

    /// The results outside `allowed(op)` (success is always allowed).
    pub fn unexpected(&self, allowed: impl Fn(Op) -> &'static [i32]) -> Vec<String> {
        let mut bad = Vec::new();
        for &op in OPS {
            for e in 1..SLOTS_PER_OP {
                let n = self.count(op, e);
                if n > 0 && !allowed(op).contains(&(e as i32)) {
                    bad.push(format!(
                        "{} returned {} {n} times",
                        op.name(),
                        errno_label(e as i32)
                    ));
                }
            }
        }
        bad
    }
}

fn errno_label(e: i32) -> String {
    match (e, errno_name(e)) {
        (0, _) => "ok".into(),
        (_, "?") => format!("errno {e}"),
        (_, n) => n.into(),
    }
}

/// The end of a case: every result allowed, `# N ioctls`, the breakdown.
fn report(what: &str, tally: &Tally, allowed: impl Fn(Op) -> &'static [i32]) -> TestResult {
    diag!("{} ioctls", tally.issued());
    diag!("{what}: {} returned", tally.returned());
    for l in tally.breakdown() {
        diag!("  {l}");
    }
    let bad = tally.unexpected(allowed);
    ensure!(bad.is_empty(), "{what}: {}", bad.join("; "));
    Ok(())
}

/// When to stop: a deadline and a count of ioctls issued.
#[derive(Clone, Copy)]
struct Budget {
    deadline: Instant,
    max: u64,
}

impl Budget {
    fn new(c: &Config) -> Self {
        Budget {
            deadline: Instant::now() + c.duration,
            max: c.max_ioctls,
        }
    }

    fn more(&self, t: &Tally) -> bool {
        !t.stopped() && t.issued() < self.max && Instant::now() < self.deadline
    }
}

/// The commands the random workers issue, by weight.
const RANDOM_OPS: &[(Op, u64)] = &[
    (Op::Read, 4),
    (Op::Write, 3),
    (Op::Snapshot, 3),
    (Op::ReadUnlockable, 3),
    (Op::CheckExclusive, 1),
    (Op::Flags, 1),
];

/// The commands of `mm_churn`'s workers, by weight: [`RANDOM_OPS`] and
/// the ones that move pages between system and device memory.
const CHURN_OPS: &[(Op, u64)] = &[
    (Op::Read, 4),
    (Op::Write, 3),
    (Op::Snapshot, 2),
    (Op::ReadUnlockable, 3),
    (Op::MigrateToDev, 3),
    (Op::MigrateToSys, 2),
    (Op::Exclusive, 2),
    (Op::CheckExclusive, 1),
    (Op::Release, 1),
    (Op::Flags, 1),
];

fn random_op(rng: &mut Rng) -> Op {
    pick_op(rng, RANDOM_OPS)
}

fn pick_op(rng: &mut Rng, ops: &[(Op, u64)]) -> Op {
    let total: u64 = ops.iter().map(|&(_, w)| w).sum();
    let mut x = rng.below(total);
    for &(op, w) in ops {
        if x < w {
            return op;
        }
        x -= w;
    }
    unreachable!()
}

/// One random command over `[region, region + pages)`, sometimes running
/// one page into the guard after it. `out` has room for `pages + 1` pages.
/// Does not allocate. Returns the errno, 0 for success.
fn random_ioctl(
    fd: RawFd,
    rng: &mut Rng,
    region: usize,
    pages: usize,
    out: usize,
    t: &Tally,
) -> i32 {
    let op = random_op(rng);
    let first = rng.below(pages as u64);
    let npages = match op {
        // Bit 0 (FAIL_ALLOC) clear: it only matters to migrations anyway.
        Op::Flags => 2 + 2 * rng.below(8),
        _ => 1 + rng.below(pages as u64 - first + 1),
    };
    let addr = region + first as usize * page_size();
    let r = tallied_ioctl(fd, op, addr, out, npages, t);
    r.map_or_else(|e| e.raw_os_error().unwrap_or(-1), |_| 0)
}

/// Issues `op` over `npages` pages at `addr` with `ptr` as its buffer,
/// counted in `t`.
fn tallied_ioctl(
    fd: RawFd,
    op: Op,
    addr: usize,
    ptr: usize,
    npages: u64,
    t: &Tally,
) -> io::Result<i32> {
    let mut cmd = HmmDmirrorCmd {
        addr: addr as u64,
        ptr: ptr as u64,
        npages,
        ..Default::default()
    };
    t.issue();
    let (r, _) = watchdog().watch(op.nr() as u64, || {
        ioctl_raw(
            fd,
            op.request() as libc::c_ulong,
            &mut cmd as *mut _ as usize,
        )
    });
    t.record(op, &r);
    r
}

/// How long one stress command may take before the case fails: far above
/// what any took in a run (TCG, debug kernel), far below the case's own
/// timeout, so that a command stuck in the kernel is named.
const COMMAND_BOUND: Duration = Duration::from_secs(30);

/// The watchdog of every [`tallied_ioctl`] of this process and of the
/// children it forks afterwards (they share its slots).
fn watchdog() -> &'static Watchdog {
    static DOG: OnceLock<&'static Watchdog> = OnceLock::new();
    DOG.get_or_init(|| {
        Watchdog::start(scaled(COMMAND_BOUND), |nr| {
            let op = OPS.iter().find(|op| op.nr() as u64 == nr);
            format!("stress command {}", op.map_or("?", |op| op.name()))
        })
        .expect("the watchdog's shared slots")
    })
}

/// Allowed errnos while the address space changes under the commands:
/// EFAULT where a page is unmapped, PROT_NONE, moved away or in the guard;
/// EPERM for WRITE to a page made read-only; EBUSY when invalidations
/// keep a range fault retrying past its timeout (1 s in C; READ,
/// WRITE and SNAPSHOT). READ_UNLOCKABLE retries without a timeout, so no
/// EBUSY. SNAPSHOT does not fault (holes are reported, not refused).
/// Migrations look the VMA up first: EINVAL where there is none or it is
/// PROT_NONE (the guard too). MIGRATE_TO_DEV answers ENOENT when its
/// read-back finds a page that did not move (locked, shared with a forked
/// child, or invalidated under it) and EFAULT/EBUSY as READ for that
/// read-back. FLAGS sometimes asks for a failed allocation: MIGRATE_TO_DEV
/// then leaves that page (ENOENT), MIGRATE_TO_SYS fails with ENOMEM.
/// EXCLUSIVE fails as a write fault would (EFAULT; EBUSY from its
/// read-back), and with ENOENT when its read-back finds a page whose
/// exclusive access a CPU access or an invalidation already took back.
/// CHECK_EXCLUSIVE answers EPERM while EXCLUSIVE's access lasts. RELEASE
/// and FLAGS always succeed.
fn allowed_churn(op: Op) -> &'static [i32] {
    if fault_consumes_fail_alloc() {
        // C's migrate_to_ram honours a pending FAIL_ALLOC of the file that
        // migrated the page: a command whose fault brings a device page
        // back then fails with ENOMEM (VM_FAULT_OOM). The Rust module
        // applies FAIL_ALLOC to its own migrations only.
        return match op {
            Op::Read => &[libc::EFAULT, libc::EBUSY, libc::ENOMEM],
            Op::ReadUnlockable => &[libc::EFAULT, libc::ENOMEM],
            Op::Write => &[libc::EFAULT, libc::EPERM, libc::EBUSY, libc::ENOMEM],
            Op::Exclusive => &[libc::EFAULT, libc::EBUSY, libc::ENOENT, libc::ENOMEM],
            _ => allowed_churn_rust(op),
        };
    }
    allowed_churn_rust(op)
}

fn allowed_churn_rust(op: Op) -> &'static [i32] {
    match op {
        Op::Read => &[libc::EFAULT, libc::EBUSY],
        Op::ReadUnlockable => &[libc::EFAULT],
        Op::Write => &[libc::EFAULT, libc::EPERM, libc::EBUSY],
        Op::Snapshot => &[libc::EBUSY],
        Op::MigrateToDev => &[libc::EINVAL, libc::ENOENT, libc::EFAULT, libc::EBUSY],
        Op::MigrateToSys => &[libc::EINVAL, libc::ENOMEM],
        Op::Exclusive => &[libc::EFAULT, libc::EBUSY, libc::ENOENT],
        Op::CheckExclusive => &[libc::EPERM],
        _ => &[],
    }
}

/// Whether the module under test is C's, whose CPU faults on device pages
/// consume FAIL_ALLOC.
fn fault_consumes_fail_alloc() -> bool {
    crate::dmirror::c_module_loaded()
}

/// What the region of `mm_churn` holds: page `page` is either all zero
/// (never written, zapped or mapped over) or all this pattern, which the
/// CPU and WRITE are the only ones to write.
fn churn_byte(page: usize, off: usize) -> u8 {
    pattern(0x3C, page, off)
}

/// Fills `buf` with the churn pattern of the pages from `first` on.
fn churn_fill(first: usize, buf: &mut [u8]) {
    let ps = page_size();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = churn_byte(first + i / ps, i % ps);
    }
}

/// Where `data`, read from the pages from `first` on, holds a byte that
/// is neither zero nor the churn pattern: a page of the wrong data.
fn churn_mismatch(first: usize, data: &[u8]) -> Option<String> {
    let ps = page_size();
    data.iter().enumerate().find_map(|(i, &b)| {
        let want = churn_byte(first + i / ps, i % ps);
        (b != want && b != 0).then(|| {
            format!(
                "page {} offset {}: {b:#04x}, want {want:#04x} or 0",
                first + i / ps,
                i % ps
            )
        })
    })
}

/// One random command of [`CHURN_OPS`] over the churn region, sometimes
/// running one page into the guard. WRITE writes the churn pattern; what
/// READ and READ_UNLOCKABLE return must be zero or that pattern.
fn churn_ioctl(fd: RawFd, rng: &mut Rng, region: usize, out: &mut [u8], t: &Tally) -> TestResult {
    let ps = page_size();
    let pages = CHURN_PAGES;
    let op = pick_op(rng, CHURN_OPS);
    let first = rng.below(pages as u64) as usize;
    let npages = match op {
        // FAIL_ALLOC (bit 0) now and then: a migration then fails one
        // allocation, which must lose no data. Else bit 1 alone (the Rust
        // module's FAIL_ALLOC_NTH with N = 0: none; C ignores it). Zero is
        // EINVAL.
        Op::Flags => {
            if rng.below(4) == 0 {
                1
            } else {
                2
            }
        }
        _ => 1 + rng.below((pages - first + 1) as u64) as usize,
    };
    let len = npages.min(pages + 1) * ps;
    if op == Op::Write {
        churn_fill(first, &mut out[..len]);
    }
    let ptr = out.as_mut_ptr() as usize;
    let r = tallied_ioctl(fd, op, region + first * ps, ptr, npages as u64, t);
    if r.is_ok() && matches!(op, Op::Read | Op::ReadUnlockable) {
        if let Some(bad) = churn_mismatch(first, &out[..len]) {
            return Err(format!("{} of {npages} pages at page {first}: {bad}", op.name()).into());
        }
    }
    Ok(())
}

const CHURN_PAGES: usize = 32;
const CHURN_WORKERS: usize = 3;

#[derive(Default, Debug)]
struct Mutations {
    remap: u64,
    mprotect: u64,
    dontneed: u64,
    mremap: u64,
    mremap_refused: u64,
    fork: u64,
    filled: u64,
}

impl Mutations {
    fn add(&mut self, o: &Mutations) {
        self.remap += o.remap;
        self.mprotect += o.mprotect;
        self.dontneed += o.dontneed;
        self.mremap += o.mremap;
        self.mremap_refused += o.mremap_refused;
        self.fork += o.fork;
        self.filled += o.filled;
    }
}

/// Rounds of `mm_churn`: the data is checked after each.
const CHURN_ROUNDS: u32 = 4;

/// Workers issue every command but the unlocked read at random over a
/// region while a mutator unmaps and maps it back, maps over it, changes
/// its protection, zaps it with MADV_DONTNEED, fills pages with their
/// pattern, forks (the child exits at once) and moves parts away and back
/// with mremap. Allowed: see
/// `allowed_churn`. Data: every page the device or the CPU reads is zero
/// or its pattern, during the run; and after each of [`CHURN_ROUNDS`]
/// rounds, once everything stopped, too, and then the device reads
/// exactly what the CPU does.
fn mm_churn() -> TestResult {
    let cfg = config()?;
    let d = Dmirror::open(0)?;
    let region = Guarded::rw(CHURN_PAGES)?;
    let scratch = Guarded::rw(CHURN_PAGES)?;
    let tally = Arc::new(Tally::new()?);
    let (base, fd) = (region.addr(), d.raw_fd());
    let mut rng = Rng::new(cfg.seed);
    let mut m = Mutations::default();
    for round in 0..CHURN_ROUNDS {
        tally.resume();
        let budget = Budget {
            deadline: Instant::now() + cfg.duration / CHURN_ROUNDS,
            max: cfg.max_ioctls,
        };
        if !budget.more(&tally) {
            break;
        }
        let mut workers = Vec::new();
        for i in 0..CHURN_WORKERS {
            let mut out = Mapping::rw((CHURN_PAGES + 1) * page_size())?;
            let t = tally.clone();
            let mut rng = Rng::new(cfg.seed ^ (i as u64 + 1) ^ (u64::from(round) << 32));
            workers.push(std::thread::spawn(move || -> TestResult {
                while budget.more(&t) {
                    if let Err(e) = churn_ioctl(fd, &mut rng, base, out.bytes_mut(), &t) {
                        t.stop();
                        return Err(e);
                    }
                }
                Ok(())
            }));
        }
        let res = mutate(&mut rng, base, scratch.addr(), &budget, &tally);
        tally.stop();
        for w in workers {
            w.join().map_err(|_| "a worker panicked".to_string())??;
        }
        m.add(&res?);
        churn_settled(&d, base, round)?;
    }
    diag!(
        "mutations: {} mmap over, {} mprotect, {} MADV_DONTNEED, {} mremap there and back ({} refused), {} fork, {} pages filled",
        m.remap, m.mprotect, m.dontneed, m.mremap, m.mremap_refused, m.fork, m.filled
    );
    report("mm_churn", &tally, allowed_churn)
}

/// After a round of the churn: each page of the region is all zero or all
/// its pattern (nothing torn: nobody writes any more), and the device
/// reads exactly what the CPU does. Leaves the region read/write.
fn churn_settled(d: &Dmirror, base: usize, round: u32) -> TestResult {
    let ps = page_size();
    // Seen once in CI (1 run in ~30), when the mutator still moved with a
    // plain mremap: mprotect() of the whole region failed with ENOMEM,
    // most likely the hole that step left (see `mutate`). Should it come
    // back: print the maps, and check page by page, leaving out (and
    // counting) pages that mprotect() still refuses.
    let whole = mem::protect(base, CHURN_PAGES * ps, rw());
    if let Err(e) = &whole {
        diag!("mprotect of the whole region after round {round}: {e}; its maps:");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        for line in maps.lines().filter(|l| {
            l.split('-')
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok())
                .is_some_and(|a| a + (1 << 20) > base && a < base + (1 << 20))
        }) {
            diag!("  {line}");
        }
    }
    let (mut filled, mut refused) = (0, 0);
    let out = Mapping::rw(ps)?;
    for page in 0..CHURN_PAGES {
        let addr = base + page * ps;
        if whole.is_err() && mem::protect(addr, ps, rw()).is_err() {
            refused += 1;
            continue;
        }
        // SAFETY: the page is mapped read/write, and nothing else runs.
        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, ps) };
        if data.iter().any(|&b| b != 0) {
            let mut want = vec![0; ps];
            churn_fill(page, &mut want);
            check_each(&format!("page {page} after round {round}"), data, |i| {
                want[i]
            })?;
            filled += 1;
        }
        let c = d.read(addr, out.addr(), 1)?;
        ensure_eq!(c.cpages, 1);
        check_each(
            &format!("device read of page {page}, round {round}"),
            out.bytes(),
            |i| data[i],
        )?;
    }
    diag!("after round {round}: {filled} pages hold their pattern, the rest zero ({refused} left out)");
    Ok(())
}

fn rw() -> i32 {
    libc::PROT_READ | libc::PROT_WRITE
}

pub(super) fn mremap_to(from: usize, len: usize, to: usize) -> io::Result<()> {
    mremap_flags(from, len, to, 0)
}

/// Moves the pages of `[from, from + len)` onto `to`, leaving `from`
/// mapped, empty (`MREMAP_DONTUNMAP`): neither range is ever a hole that
/// another thread's mmap() could take meanwhile.
fn mremap_leaving_mapped(from: usize, len: usize, to: usize) -> io::Result<()> {
    mremap_flags(from, len, to, libc::MREMAP_DONTUNMAP)
}

fn mremap_flags(from: usize, len: usize, to: usize, flags: i32) -> io::Result<()> {
    // SAFETY: moves our own pages onto our own range.
    let p = unsafe {
        libc::mremap(
            from as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | flags,
            to as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The mutator: until the budget is spent, change the region. Every step
/// leaves the whole region mapped again (only its protection may differ),
/// so the workers never reach memory that is not the region's.
fn mutate(
    rng: &mut Rng,
    base: usize,
    scratch: usize,
    budget: &Budget,
    t: &Tally,
) -> Result<Mutations, Failure> {
    let ps = page_size();
    let mut m = Mutations::default();
    let lost = |what: &str, e: io::Error| -> Failure {
        t.stop();
        Failure::Fail(format!("{what}: {e}: the region is lost"))
    };
    while budget.more(t) {
        let first = rng.below(CHURN_PAGES as u64) as usize;
        let n = 1 + rng.below((CHURN_PAGES - first) as u64) as usize;
        let (addr, len) = (base + first * ps, n * ps);
        match rng.below(8) {
            0 | 1 => {
                // A new mapping over the range unmaps the old one (UNMAP
                // events) without leaving a hole: between a munmap() and a
                // MAP_FIXED_NOREPLACE, another thread's mmap() could take
                // it (EEXIST, seen once).
                mem::map_anon_at(addr, len, libc::MAP_FIXED).map_err(|e| lost("mmap over", e))?;
                m.remap += 1;
            }
            2 => {
                let prot = [libc::PROT_NONE, libc::PROT_READ, rw()][rng.below(3) as usize];
                mem::protect(addr, len, prot).map_err(|e| lost("mprotect", e))?;
                m.mprotect += 1;
            }
            3 => {
                // Back to read/write, and fill a few pages with their
                // pattern.
                mem::protect(base, CHURN_PAGES * ps, rw()).map_err(|e| lost("mprotect", e))?;
                // SAFETY: the whole region is mapped read/write now; the
                // workers only reach it through the kernel.
                let data = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
                churn_fill(first, data);
                m.mprotect += 1;
                m.filled += n as u64;
            }
            4 => {
                mem::madvise(addr, len, libc::MADV_DONTNEED).map_err(|e| lost("madvise", e))?;
                m.dontneed += 1;
            }
            5 => {
                // There and back, with MREMAP_DONTUNMAP: a plain move
                // leaves the range a hole until it comes back, where
                // another thread's mmap() can land (most likely a starting
                // worker's 3-page sigaltstack: a failing run showed a
                // 3-page hole in the region and a 3-page mapping near it).
                // The move back unmaps it, and its owner's munmap() later
                // cuts a hole into the region: pages then held other
                // pages' data, mprotect() failed with ENOMEM, the test
                // process crashed, all without one dmirror command. A range
                // across VMAs (mprotect splits them) may be refused: map it
                // afresh then, which keeps the region whole (zeros are
                // allowed).
                let to = scratch + first * ps;
                if mremap_leaving_mapped(addr, len, to).is_err() {
                    mem::map_anon_at(addr, len, libc::MAP_FIXED)
                        .map_err(|e| lost("mmap over a refused mremap", e))?;
                    m.mremap_refused += 1;
                    continue;
                }
                // Replaces the emptied range in one step; the scratch
                // area stays mapped, empty.
                mremap_leaving_mapped(to, len, addr).map_err(|e| lost("mremap back", e))?;
                m.mremap += 1;
            }
            6 => {
                // SAFETY: the child only calls _exit().
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(lost("fork", io::Error::last_os_error()));
                }
                if pid == 0 {
                    // SAFETY: leaves the child at once.
                    unsafe { libc::_exit(0) };
                }
                let st = reap(pid);
                ensure!(
                    libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                    "forked child {}",
                    describe(st)
                );
                m.fork += 1;
            }
            _ => std::thread::yield_now(),
        }
    }
    Ok(m)
}

/// Reap `pid` within `within`, or report where its threads are, SIGKILL
/// it and fail.
pub(super) fn reap_within(pid: libc::pid_t, within: Duration, what: &str) -> Result<i32, Failure> {
    let start = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: polls our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return Ok(st);
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(format!("{what}: waitpid: {}", io::Error::last_os_error()).into());
        }
        if start.elapsed() > within {
            for l in task_states(pid) {
                diag!("{l}");
            }
            // SAFETY: kills our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let killed = Instant::now();
            reap(pid);
            return Err(format!(
                "{what}: pid {pid} did not end within {within:?} (then died {} ms after SIGKILL)",
                killed.elapsed().as_millis()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// State, wait channel and kernel stack of each thread of `pid`, from
/// /proc (the stack needs root and CONFIG_STACKTRACE).
pub fn task_states(pid: libc::pid_t) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        out.push(format!("pid {pid}: no /proc entry"));
        return out;
    };
    for e in dir.flatten() {
        let p = e.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state is the field after the parenthesised command name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        out.push(format!(
            "pid {pid} thread {}: state {state}, wchan {}",
            e.file_name().to_string_lossy(),
            read("wchan")
        ));
        for l in read("stack").lines().take(16) {
            out.push(format!("    {l}"));
        }
    }
    out
}

fn open_raw() -> Result<RawFd, Failure> {
    let path = CString::new(Dmirror::path(0)).unwrap();
    // SAFETY: valid path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    ensure!(fd >= 0, "open: {}", io::Error::last_os_error());
    Ok(fd)
}

/// Allowed errnos when the file is closed under the commands: EBADF once
/// the descriptor is gone; EFAULT where a random range runs into the
/// guard page after the region; EBUSY for READ, WRITE and SNAPSHOT as in
/// `allowed_churn` (the workers' own write faults invalidate each other's
/// ranges). The region is not changed, so nothing else.
fn allowed_close(op: Op) -> &'static [i32] {
    match op {
        Op::Read | Op::Write => &[libc::EBADF, libc::EFAULT, libc::EBUSY],
        Op::Snapshot => &[libc::EBADF, libc::EBUSY],
        Op::ReadUnlockable => &[libc::EBADF, libc::EFAULT],
        _ => &[libc::EBADF],
    }
}

const CLOSE_PAGES: usize = 64;
const CLOSE_WORKERS: usize = 2;

/// The device file is closed by one thread while others are inside
/// ioctls on it. The descriptor table keeps the file alive for calls in
/// flight; later calls get EBADF, which every worker must see promptly
/// in every round. First, once, a deterministic version:
/// close while READ_UNLOCKABLE waits for a userfaultfd handler, which
/// then answers; the read must still complete. Allowed: see
/// `allowed_close`.
fn close_during_ioctl() -> TestResult {
    let cfg = config()?;
    let tally = Arc::new(Tally::new()?);
    close_while_uffd_waits(&tally)?;

    let budget = Budget::new(&cfg);
    let region = Guarded::rw(CLOSE_PAGES)?;
    let base = region.addr();
    let outs: Vec<Mapping> = (0..CLOSE_WORKERS)
        .map(|_| Mapping::rw((CLOSE_PAGES + 1) * page_size()))
        .collect::<io::Result<_>>()?;
    let mut rng = Rng::new(cfg.seed);
    let mut rounds = 0u64;
    while budget.more(&tally) {
        let fd = open_raw()?;
        let mut workers = Vec::new();
        for (i, out) in outs.iter().enumerate() {
            let (t, out) = (tally.clone(), out.addr());
            let mut wrng = Rng::new(cfg.seed ^ (rounds << 8) ^ (i as u64 + 1));
            // Each worker stops at its first EBADF. After the close the
            // descriptor number is not reused until every worker has been
            // joined.
            workers.push(std::thread::spawn(move || {
                while random_ioctl(fd, &mut wrng, base, CLOSE_PAGES, out, &t) != libc::EBADF {}
            }));
        }
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
        // SAFETY: closes the descriptor opened above, once.
        let r = unsafe { libc::close(fd) };
        ensure_eq!(r, 0, "close: {}", io::Error::last_os_error());
        // Every worker must see the closed descriptor promptly: a command
        // in flight at the close ends, the next one gets EBADF.
        let closed = Instant::now();
        while !workers.iter().all(|w| w.is_finished()) {
            ensure!(
                closed.elapsed() < prompt(),
                "round {rounds}: a worker still runs {:?} after the close",
                prompt()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        for w in workers {
            w.join().map_err(|_| "a worker panicked".to_string())?;
        }
        rounds += 1;
    }
    diag!("{rounds} open/close rounds");
    let ebadf: u64 = OPS
        .iter()
        .map(|&op| tally.count(op, libc::EBADF as usize))
        .sum();
    ensure!(
        ebadf >= rounds * CLOSE_WORKERS as u64,
        "{ebadf} EBADF in {rounds} rounds of {CLOSE_WORKERS} workers: each must see one"
    );
    report("close_during_ioctl", &tally, allowed_close)
}

fn close_while_uffd_waits(tally: &Tally) -> TestResult {
    let n = 4;
    let fd = open_raw()?;
    let r = UffdRegion::new(n)?;
    let out = Mapping::rw(n * page_size())?;
    let (base, outp) = (r.base(), out.addr());
    let (tx, rx) = mpsc::channel();
    tally.issue();
    let reader = std::thread::spawn(move || {
        let mut cmd = HmmDmirrorCmd {
            addr: base as u64,
            ptr: outp as u64,
            npages: n as u64,
            ..Default::default()
        };
        let res = ioctl_raw(
            fd,
            Op::ReadUnlockable.request() as libc::c_ulong,
            &mut cmd as *mut _ as usize,
        );
        let _ = tx.send((res, cmd.cpages));
    });
    let msg = r.uffd.next_event(None, prompt())?.ok_or("no fault")?;
    ensure!(
        rx.try_recv().is_err(),
        "the read ended before the fault was answered"
    );
    // SAFETY: closes our descriptor while the reader is inside the ioctl.
    ensure_eq!(unsafe { libc::close(fd) }, 0, "close");
    // The descriptor is gone (checked before anything can reuse its number).
    let mut cmd = HmmDmirrorCmd::default();
    tally.issue();
    let e = ioctl_raw(
        fd,
        Op::Read.request() as libc::c_ulong,
        &mut cmd as *mut _ as usize,
    );
    tally.record(Op::Read, &e);
    ensure_eq!(
        e.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EBADF)),
        "ioctl on the closed descriptor"
    );
    let h = r.handler()?;
    let ps = page_size();
    let first = msg.address() as usize & !(ps - 1);
    let mut page = vec![0u8; ps];
    fill_handler((first - base) / ps, &mut page);
    // The handler thread may race us to it: EEXIST then.
    match r.uffd.copy(first, &page) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e.into()),
        _ => {}
    }
    let (res, cpages) = rx
        .recv_timeout(prompt())
        .map_err(|_| format!("the read did not end within {:?} of the answer", prompt()))?;
    reader.join().map_err(|_| "reader panicked".to_string())?;
    h.stop()?;
    tally.record(Op::ReadUnlockable, &res);
    let _ = res.map_err(|e| format!("READ_UNLOCKABLE after its file was closed: {e}"))?;
    ensure_eq!(cpages, n as u64);
    super::lockdrop::check_pages("read through a closed file", out.bytes(), |_| HANDLER_SEED)?;
    diag!("READ_UNLOCKABLE waiting on userfaultfd survived close() of its file");
    Ok(())
}

/// Allowed errnos when the process that opened the file exits under
/// the commands (`A`): EFAULT where a random range runs into the guard
/// page, EBUSY for READ, WRITE and SNAPSHOT as in `allowed_close`. The
/// address space stays until the last command in flight has ended, so
/// nothing else.
fn allowed_exit_owner(op: Op) -> &'static [i32] {
    match op {
        Op::Read | Op::Write => &[libc::EFAULT, libc::EBUSY],
        Op::Snapshot => &[libc::EBUSY],
        Op::ReadUnlockable => &[libc::EFAULT],
        _ => &[],
    }
}

/// Allowed errnos in a second process that inherited the file and keeps
/// issuing commands while the opener exits (`B`): as `allowed_exit_owner`,
/// and once the mirrored address space is gone READ, READ_UNLOCKABLE and
/// WRITE fail with EFAULT and SNAPSHOT with EINVAL (C: mmget_not_zero()
/// fails).
fn allowed_exit_inherited(op: Op) -> &'static [i32] {
    match op {
        Op::Read | Op::Write => &[libc::EFAULT, libc::EBUSY],
        Op::Snapshot => &[libc::EINVAL, libc::EBUSY],
        Op::ReadUnlockable => &[libc::EFAULT],
        _ => &[],
    }
}

const EXIT_PAGES: usize = 16;
const EXIT_WORKERS: usize = 3;

/// Processes exit with ioctls in flight. A: a child opens the device,
/// starts workers and calls _exit() after a random few milliseconds.
/// B: the child forks a grandchild that inherits the file and issues
/// commands against the child's address space while the child exits.
/// Every process must be gone within 10 s. Allowed: see
/// `allowed_exit_owner` and `allowed_exit_inherited`.
fn exit_during_ioctl() -> TestResult {
    let cfg = config()?;
    let (a, b) = (Tally::new()?, Tally::new()?);
    let budget = Budget::new(&cfg);
    // Orphaned grandchildren are reparented to us, so we can wait for them.
    // SAFETY: plain prctl.
    ensure_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let mut rng = Rng::new(cfg.seed);
    let mut rounds = [0u64; 2];
    let both = |t: &Tally| t.issued();
    while budget.more(&a) && budget.more(&b) && both(&a) + both(&b) < cfg.max_ioctls {
        let variant = (rounds[0] + rounds[1]) % 2;
        let delay = Duration::from_micros(rng.below(4000));
        let seed = rng.next();
        a.set_phase(0);
        b.set_phase(0);
        // SAFETY: the child runs exit_child() and _exit()s.
        let pid = unsafe { libc::fork() };
        ensure!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let t = if variant == 0 { &a } else { &b };
            exit_child(variant, t, &budget, delay, seed);
        }
        let t = if variant == 0 { &a } else { &b };
        let st = reap_within(pid, prompt(), "a process exiting with ioctls in flight").map_err(
            |e| match e {
                Failure::Fail(m) => Failure::Fail(format!(
                    "{m}; variant {}, phase {} (1 set up, 2 workers running, 3 at _exit), {} ioctls issued, {} returned",
                    if variant == 0 { "A" } else { "B" },
                    t.phase(),
                    t.issued(),
                    t.returned()
                )),
                f => f,
            },
        )?;
        ensure!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "child {}",
            describe(st)
        );
        // Its grandchild, if any, was reparented to us.
        reap_orphans(prompt())?;
        rounds[variant as usize] += 1;
    }
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
    // Every exited process left device pages behind; RELEASE must find
    // them freed or evict them, and return (the case's timeout bounds it).
    let d = Dmirror::open(0)?;
    let scratch = Mapping::rw(page_size())?;
    d.cmd(HMM_DMIRROR_RELEASE, scratch.addr(), scratch.addr(), 1)?;
    diag!(
        "{} owner exits, {} owner exits under an inheriting process",
        rounds[0],
        rounds[1]
    );
    diag!("{} ioctls", a.issued() + b.issued());
    let ra = report_quiet("owner exits (A)", &a, allowed_exit_owner);
    let rb = report_quiet(
        "opener exits, inheritor continues (B)",
        &b,
        allowed_exit_inherited,
    );
    ra.and(rb)
}

/// As `report`, without the `# N ioctls` line (the caller prints a total).
fn report_quiet(what: &str, tally: &Tally, allowed: impl Fn(Op) -> &'static [i32]) -> TestResult {
    diag!(
        "{what}: {} issued, {} returned",
        tally.issued(),
        tally.returned()
    );
    for l in tally.breakdown() {
        diag!("  {l}");
    }
    let bad = tally.unexpected(allowed);
    ensure!(bad.is_empty(), "{what}: {}", bad.join("; "));
    Ok(())
}

/// Wait until we have no children left (ECHILD), for at most `within`.
fn reap_orphans(within: Duration) -> TestResult {
    let start = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: reaps any child of ours.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                return Ok(());
            }
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        } else if r > 0 {
            ensure!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "grandchild {}",
                describe(st)
            );
        } else if start.elapsed() > within {
            return Err(
                format!("a grandchild issuing ioctls did not end within {within:?}").into(),
            );
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// In the child of `exit_during_ioctl`. Never returns.
fn exit_child(variant: u64, t: &Tally, budget: &Budget, delay: Duration, seed: u64) -> ! {
    let code = match exit_child_run(variant, t, budget, delay, seed) {
        Ok(()) => 0,
        Err(e) => {
            crate::harness::send_diag(&format!("exit child: {e}"));
            1
        }
    };
    // SAFETY: leaves the child; its workers die with it, mid-ioctl.
    unsafe { libc::_exit(code) }
}

fn exit_child_run(
    variant: u64,
    t: &Tally,
    budget: &Budget,
    delay: Duration,
    seed: u64,
) -> io::Result<()> {
    let d = Dmirror::open(0)?;
    let region = Guarded::rw(EXIT_PAGES)?;
    let out = Mapping::rw((EXIT_PAGES + 1) * page_size())?;
    let (fd, base, outp) = (d.raw_fd(), region.addr(), out.addr());
    // Device pages outstanding when the process exits: its teardown, or
    // the file's release, must give them back (see the RELEASE after it).
    d.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, base, outp, EXIT_PAGES)?;
    t.set_phase(1);
    if variant == 0 {
        let before = t.issued();
        for i in 0..EXIT_WORKERS {
            let mut rng = Rng::new(seed ^ (i as u64 + 1));
            // The workers borrow nothing: raw numbers only. Their
            // region, buffer and file live until the _exit().
            // SAFETY: the Tally lives in the parent's shared mapping, which
            // stays mapped in this child until it exits.
            let t: &'static Tally = unsafe { &*(t as *const Tally) };
            let budget = *budget;
            std::thread::spawn(move || {
                while budget.more(t) {
                    random_ioctl(fd, &mut rng, base, EXIT_PAGES, outp, t);
                }
            });
        }
        // Let the workers get going, then exit at a random point.
        let started = Instant::now();
        while t.issued() < before + EXIT_WORKERS as u64
            && started.elapsed() < Duration::from_secs(2)
        {
            std::thread::yield_now();
        }
        t.set_phase(2);
        std::thread::sleep(delay);
        // Exit with everything in place: the workers are mid-ioctl.
        std::mem::forget((d, region, out));
        t.set_phase(3);
        return Ok(());
    }
    // B: a grandchild issues commands on our file from before we exit
    // until a while after (20 more once it has seen us gone). It
    // inherits the region at the same address (a copy), which does not
    // matter: the commands act on our address space.
    let mut fds = [0; 2];
    // SAFETY: fds has room for two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain syscall.
    let me = unsafe { libc::getpid() };
    // SAFETY: the grandchild runs the loop and _exit()s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let mut rng = Rng::new(seed);
        let (start, mut after) = (Instant::now(), 0);
        let mut told = false;
        while budget.more(t) && after < 20 && start.elapsed() < Duration::from_millis(500) {
            random_ioctl(fd, &mut rng, base, EXIT_PAGES, outp, t);
            if !told {
                let b = 1u8;
                // SAFETY: writes one byte from a local to our pipe.
                unsafe { libc::write(fds[1], (&b as *const u8).cast(), 1) };
                told = true;
            }
            // SAFETY: plain syscall.
            if unsafe { libc::getppid() } != me {
                after += 1;
            }
        }
        // SAFETY: leaves the grandchild.
        unsafe { libc::_exit(0) };
    }
    let mut b = 0u8;
    // SAFETY: closes our write end, then waits for the grandchild's first
    // command (or its exit: EOF).
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
    }
    t.set_phase(2);
    std::thread::sleep(delay);
    std::mem::forget((d, region, out));
    t.set_phase(3);
    Ok(())
}

const UFFD_PAGES: usize = 8;

/// A userfaultfd handler is killed in the middle of a fault.
/// A: the handler is a separate process; the reader (here) does
/// READ_UNLOCKABLE on a region whose only userfaultfd the handler holds.
/// Killing it releases the userfaultfd, which wakes the fault; the read
/// must complete, each page holding either the handler's data or zeros
/// (resolved after the release), and match the CPU's view.
/// B: a child with a handler thread and a reader thread is killed while
/// the reader waits; it must die within 10 s.
/// Allowed: READ_UNLOCKABLE must succeed (no errno is allowed).
fn uffd_handler_killed() -> TestResult {
    let cfg = config()?;
    let tally = Tally::new()?;
    let budget = Budget::new(&cfg);
    let mut rng = Rng::new(cfg.seed);
    let mut rounds = [0u64; 2];
    let (mut from_handler, mut zero) = (0usize, 0usize);
    while budget.more(&tally) {
        if (rounds[0] + rounds[1]) % 2 == 0 {
            let (h, z) = handler_process_killed(&tally, &mut rng)?;
            from_handler += h;
            zero += z;
            rounds[0] += 1;
        } else {
            reader_process_killed(&tally, &mut rng)?;
            rounds[1] += 1;
        }
    }
    diag!(
        "{} handler processes killed ({from_handler} pages from the handler, {zero} zero-filled after); {} reader processes killed",
        rounds[0],
        rounds[1]
    );
    report("uffd_handler_killed", &tally, |_| &[])
}

/// Variant A. Returns (pages the handler filled, pages zero-filled).
fn handler_process_killed(tally: &Tally, rng: &mut Rng) -> Result<(usize, usize), Failure> {
    let ps = page_size();
    let d = Arc::new(Dmirror::open(0)?);
    let UffdRegion { map, uffd } = UffdRegion::new(UFFD_PAGES)?;
    let base = map.addr();
    let mut page = vec![0u8; ps];
    let answer_delay = Duration::from_micros(200 + rng.below(1500));
    // SAFETY: the child serves faults until killed; it allocates nothing.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // The handler process: answer each fault after a delay.
        while let Ok(Some(msg)) = uffd.next_event(None, Duration::from_secs(60)) {
            std::thread::sleep(answer_delay);
            let addr = msg.address() as usize & !(ps - 1);
            fill_handler((addr - base) / ps, &mut page);
            if let Err(e) = uffd.copy(addr, &page) {
                if e.raw_os_error() == Some(libc::EEXIST) {
                    let _ = uffd.wake(addr, ps);
                }
            }
        }
        // SAFETY: leaves the handler process.
        unsafe { libc::_exit(0) };
    }
    // Only the handler holds the userfaultfd now.
    drop(uffd);
    let out = Mapping::rw(UFFD_PAGES * ps)?;
    let (outp, dd) = (out.addr(), d.clone());
    let (tx, rx) = mpsc::channel();
    tally.issue();
    let reader = std::thread::spawn(move || {
        let _ = tx.send(dd.read_unlockable(base, outp, UFFD_PAGES));
    });
    std::thread::sleep(Duration::from_micros(rng.below(UFFD_PAGES as u64 * 1500)));
    // SAFETY: kills our handler child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = reap_within(pid, prompt(), "a killed userfaultfd handler process")?;
    ensure!(
        libc::WIFSIGNALED(st) || (libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0),
        "handler {}",
        describe(st)
    );
    let res = rx.recv_timeout(prompt()).map_err(|_| {
        format!(
            "READ_UNLOCKABLE did not end within {:?} of the handler's death",
            prompt()
        )
    })?;
    reader.join().map_err(|_| "reader panicked".to_string())?;
    tally.record(Op::ReadUnlockable, &res);
    let c = res.map_err(|e| format!("READ_UNLOCKABLE after the handler was killed: {e}"))?;
    ensure_eq!(c.cpages, UFFD_PAGES as u64);
    let (mut filled, mut zero) = (0, 0);
    for (i, (got, cpu)) in out
        .bytes()
        .chunks(ps)
        .zip(map.bytes().chunks(ps))
        .enumerate()
    {
        ensure!(
            got == cpu,
            "page {i}: the device read differs from the CPU's view"
        );
        if got.iter().all(|&b| b == 0) {
            zero += 1;
        } else if got
            .iter()
            .enumerate()
            .all(|(o, &b)| b == pattern(HANDLER_SEED, i, o))
        {
            filled += 1;
        } else {
            return Err(format!("page {i}: neither the handler's data nor zeros").into());
        }
    }
    Ok((filled, zero))
}

/// Variant B.
fn reader_process_killed(tally: &Tally, rng: &mut Rng) -> TestResult {
    let kill_after = Duration::from_micros(500 + rng.below(10_000));
    let answer_delay = Duration::from_micros(200 + rng.below(2000));
    // SAFETY: the child reads in a loop until killed.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let r = reader_child(tally, answer_delay);
        if let Err(e) = r {
            crate::harness::send_diag(&format!("reader child: {e:?}"));
        }
        // SAFETY: leaves the child (only if the loop failed).
        unsafe { libc::_exit(1) };
    }
    std::thread::sleep(kill_after);
    // SAFETY: kills our child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = reap_within(pid, prompt(), "a reader process killed while a fault waits")?;
    ensure!(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
        "reader child {}",
        describe(st)
    );
    Ok(())
}

fn reader_child(tally: &Tally, answer_delay: Duration) -> Result<(), Failure> {
    let ps = page_size();
    let d = Dmirror::open(0)?;
    let r = UffdRegion::new(UFFD_PAGES)?;
    let cfg = crate::uffd::HandlerConfig {
        delay: answer_delay,
        ..crate::uffd::HandlerConfig::copy(r.base(), ps, fill_handler)
    };
    let _h = crate::uffd::Handler::spawn(r.uffd.clone(), cfg)?;
    let out = Mapping::rw(UFFD_PAGES * ps)?;
    loop {
        tally.issue();
        let res = d.read_unlockable(r.base(), out.addr(), UFFD_PAGES);
        tally.record(Op::ReadUnlockable, &res);
        res?;
        // Zap it so that the next read faults again.
        mem::madvise(r.base(), UFFD_PAGES * ps, libc::MADV_DONTNEED)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_values() {
        let c = parse_config(None, None, None, 7).unwrap();
        assert_eq!(c.duration, Duration::from_secs(3));
        assert_eq!((c.max_ioctls, c.seed), (u64::MAX, 7));
        let c = parse_config(Some("0.5"), Some("100000"), Some("0x10"), 7).unwrap();
        assert_eq!(c.duration, Duration::from_millis(500));
        assert_eq!((c.max_ioctls, c.seed), (100_000, 16));
        let c = parse_config(Some(" "), Some(""), Some("42"), 7).unwrap();
        assert_eq!(
            (c.duration, c.max_ioctls, c.seed),
            (Duration::from_secs(3), u64::MAX, 42)
        );
        for bad in ["0", "-1", "nan", "inf", "x", "100000"] {
            assert!(parse_config(Some(bad), None, None, 0).is_err(), "{bad}");
        }
        for bad in ["0", "-5", "1e5", "x"] {
            assert!(parse_config(None, Some(bad), None, 0).is_err(), "{bad}");
        }
        assert!(parse_config(None, None, Some("0xzz"), 0).is_err());
    }

    #[test]
    fn rng_is_deterministic_and_spread() {
        let (mut a, mut b) = (Rng::new(1), Rng::new(1));
        let xs: Vec<u64> = (0..100).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(2).next(), xs[0]);
        let mut r = Rng::new(0);
        let mut seen = [0u32; 6];
        for _ in 0..6000 {
            seen[r.below(6) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn random_ops_cover_the_workload() {
        let mut r = Rng::new(3);
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let op = random_op(&mut r);
            if !seen.contains(&op) {
                seen.push(op);
            }
        }
        assert_eq!(seen.len(), RANDOM_OPS.len());
    }

    #[test]
    fn tally_counts_and_judges() {
        let t = Tally::new().unwrap();
        t.issue();
        t.issue();
        t.record(Op::Read, &Ok(()));
        t.record::<()>(Op::Read, &Err(io::Error::from_raw_os_error(libc::EFAULT)));
        t.record::<()>(Op::Flags, &Err(io::Error::from_raw_os_error(4000)));
        assert_eq!((t.issued(), t.returned()), (2, 3));
        assert_eq!(t.count(Op::Read, 0), 1);
        assert_eq!(t.count(Op::Read, libc::EFAULT as usize), 1);
        assert_eq!(t.count(Op::Flags, MAX_ERRNO), 1);
        assert_eq!(
            t.breakdown(),
            ["READ: 1 ok, 1 EFAULT", "FLAGS: 1 errno 255"]
        );
        assert_eq!(
            t.unexpected(allowed_churn),
            ["FLAGS returned errno 255 1 times"]
        );
        assert!(!t.stopped());
        t.stop();
        assert!(t.stopped());
        // A forked child counts into the same memory.
        // SAFETY: the child only touches the shared tally and _exit()s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            t.issue();
            // SAFETY: leaves the child.
            unsafe { libc::_exit(0) };
        }
        reap(pid);
        assert_eq!(t.issued(), 3);
    }

    /// Every mutation leaves the whole region mapped: afterwards each page
    /// can be made read/write and touched.
    #[test]
    fn mutator_keeps_the_region_mapped() {
        let region = Guarded::rw(CHURN_PAGES).unwrap();
        let scratch = Guarded::rw(CHURN_PAGES).unwrap();
        let t = Tally::new().unwrap();
        let b = Budget::new(&Config {
            duration: Duration::from_millis(300),
            max_ioctls: u64::MAX,
            seed: 0,
        });
        let m = mutate(&mut Rng::new(5), region.addr(), scratch.addr(), &b, &t).unwrap();
        assert!(m.remap > 0 && m.mprotect > 0 && m.fork > 0, "{m:?}");
        assert!(m.mremap + m.mremap_refused > 0, "{m:?}");
        mem::protect(region.addr(), region.len(), rw()).unwrap();
        for p in (region.addr()..region.end()).step_by(page_size()) {
            // SAFETY: the region is mapped read/write (checked above).
            unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
        }
    }

    #[test]
    fn budget_stops_on_count_and_time() {
        let t = Tally::new().unwrap();
        let c = Config {
            duration: Duration::from_secs(60),
            max_ioctls: 2,
            seed: 0,
        };
        let b = Budget::new(&c);
        assert!(b.more(&t));
        t.issue();
        t.issue();
        assert!(!b.more(&t));
        let b = Budget::new(&Config {
            duration: Duration::ZERO,
            ..c
        });
        assert!(!b.more(&Tally::new().unwrap()));
    }
}
