// SPDX-License-Identifier: GPL-2.0

//! `fuzz.*`: seeded random sequences of CPU accesses, address-space
//! changes (mprotect, MADV_DONTNEED, munmap, mmap over, fork) and all ten
//! dmirror commands, through three files (two on device 0, one on device
//! 1), over one region of two PMDs. A model says what each page must hold
//! and how each command must end:
//!
//! - data written by the CPU or by WRITE reads back through the CPU,
//!   READ, READ_UNLOCKABLE, EXCLUSIVE, MIGRATE_TO_DEV and a forked child;
//! - a command succeeds when every page it needs allows it, and otherwise
//!   fails with the errno C gives for the first page that does not
//!   (`EFAULT` unmapped or `PROT_NONE`, `EPERM` a WRITE to a read-only
//!   page, `EINVAL` a migration over a page it cannot read); a
//!   MIGRATE_TO_DEV may also end with `ENOENT` when a page stayed behind;
//! - SNAPSHOT reports `ERROR` exactly where nothing readable is mapped,
//!   never `WRITE` on a read-only page, never `PMD` with THP off;
//! - CHECK_EXCLUSIVE right after a successful EXCLUSIVE finds the
//!   device's exclusive entries, and none once the CPU read the pages;
//! - every command returns within a bound: a watchdog thread fails the
//!   case, naming the step, if one does not.
//!
//! `DMIRROR_FUZZ_SEED` is the first seed (random by default, printed
//! either way), `DMIRROR_FUZZ_SEEDS` how many seeds run (default 2) and
//! `DMIRROR_FUZZ_STEPS` the steps per seed (default 250). A sequence
//! depends on its seed only, so a failure replays with
//! `DMIRROR_FUZZ_SEED=<seed> DMIRROR_FUZZ_SEEDS=1 hmm-dmirror-selftests fuzz.<case>`;
//! the failure names the seed and the step, and lists the steps before it.
//! `DMIRROR_FUZZ_TRACE=1` prints every step before it runs, for a step
//! that takes the kernel down with it.

use super::ops::Op;
use super::stress::{parse_number, Rng};
use crate::dmirror::{errno, errno_name, page_size, result_errno, Dmirror};
use crate::harness::{self, scaled, Failure, Test, TestResult};
use crate::mem::{self, Mapping};
use crate::watchdog::Watchdog;
use crate::{diag, ensure};
use hmm_dmirror_uapi::*;
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

pub const TESTS: &[Test] = &[
    Test::new("fuzz.small_pages", small_pages).with_timeout(120),
    Test::new("fuzz.thp", thp).with_timeout(120),
];

fn small_pages() -> TestResult {
    run(false)
}

fn thp() -> TestResult {
    run(true)
}

/// The region: two PMDs, so that THP runs cover whole huge pages.
const PMDS: usize = 2;
/// Steps kept for the report of a failure.
const HISTORY: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Config {
    first_seed: u64,
    seeds: u64,
    steps: u64,
}

fn parse_u64(name: &str, default: u64) -> Result<u64, Failure> {
    match std::env::var(name).ok().as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some(s) => {
            parse_number(s).ok_or_else(|| Failure::Fail(format!("{name}={s:?}: want a number")))
        }
    }
}

fn config() -> Result<Config, Failure> {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let c = Config {
        first_seed: parse_u64("DMIRROR_FUZZ_SEED", clock ^ std::process::id() as u64)?,
        seeds: parse_u64("DMIRROR_FUZZ_SEEDS", 2)?.max(1),
        steps: parse_u64("DMIRROR_FUZZ_STEPS", 250)?.max(1),
    };
    diag!(
        "seeds {:#x}.. ({} of them), {} steps each",
        c.first_seed,
        c.seeds,
        c.steps
    );
    Ok(c)
}

fn run(thp: bool) -> TestResult {
    let cfg = config()?;
    let watchdog = Watchdog::start(scaled(Duration::from_secs(20)), |step| {
        format!("the command of step {step}")
    })?;
    let files = [Dmirror::open(0)?, Dmirror::open(0)?, Dmirror::open(1)?];
    let mut slowest = (Duration::ZERO, String::new());
    let start = Instant::now();
    for i in 0..cfg.seeds {
        let seed = cfg.first_seed.wrapping_add(i);
        let mut f = Fuzzer::new(seed, thp, &files, watchdog)?;
        let r = f.run(cfg.steps);
        if f.slowest.0 > slowest.0 {
            slowest = f.slowest.clone();
        }
        if let Err(e) = r {
            diag!(
                "seed {seed:#x} failed at step {}; the steps before:",
                f.step
            );
            for l in &f.history {
                diag!("  {l}");
            }
            diag!(
                "replay: DMIRROR_FUZZ_SEED={seed:#x} DMIRROR_FUZZ_SEEDS=1 DMIRROR_FUZZ_STEPS={}",
                f.step + 1
            );
            return Err(match e {
                Failure::Fail(m) => Failure::Fail(format!("seed {seed:#x} step {}: {m}", f.step)),
                skip => skip,
            });
        }
        diag!("seed {seed:#x}: {}", f.summary());
    }
    diag!(
        "{} seeds x {} steps in {:.1} s; slowest command {:.0} ms ({})",
        cfg.seeds,
        cfg.steps,
        start.elapsed().as_secs_f64(),
        slowest.0.as_secs_f64() * 1000.0,
        slowest.1
    );
    Ok(())
}

/// What the process may do with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prot {
    Unmapped,
    None,
    Read,
    ReadWrite,
}

impl Prot {
    fn readable(self) -> bool {
        matches!(self, Prot::Read | Prot::ReadWrite)
    }

    fn bits(self) -> i32 {
        match self {
            Prot::Unmapped | Prot::None => libc::PROT_NONE,
            Prot::Read => libc::PROT_READ,
            Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// One page of the model: its protection, and the stamp of the data it
/// holds (0: zeros).
#[derive(Clone, Copy, Debug)]
struct Page {
    prot: Prot,
    stamp: u32,
}

/// The word at `word` of page `page` when it holds `stamp`: varies with
/// all three, so a page in the wrong place, a stale one or a torn copy
/// shows.
fn word(stamp: u32, page: usize, word: usize) -> u64 {
    if stamp == 0 {
        return 0;
    }
    (u64::from(stamp) << 32) | ((page as u64) << 9) | word as u64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    CpuRead,
    CpuWrite,
    Mprotect,
    DontNeed,
    Unmap,
    MapOver,
    Fork,
    /// Map one whole PMD afresh and write it: a new huge page, with THP on.
    NewPmd,
    /// FLAGS(FAIL_ALLOC), a migration, FLAGS(0).
    FailedAllocMigration,
    Cmd(Op),
}

const STEPS: &[(Step, u64)] = &[
    (Step::CpuRead, 10),
    (Step::CpuWrite, 10),
    (Step::Mprotect, 5),
    (Step::DontNeed, 3),
    (Step::Unmap, 2),
    (Step::MapOver, 3),
    (Step::Fork, 1),
    (Step::NewPmd, 3),
    (Step::Cmd(Op::Read), 8),
    (Step::Cmd(Op::ReadUnlockable), 4),
    (Step::Cmd(Op::Write), 8),
    (Step::Cmd(Op::MigrateToDev), 8),
    (Step::Cmd(Op::MigrateToSys), 5),
    (Step::Cmd(Op::Snapshot), 5),
    (Step::Cmd(Op::Exclusive), 4),
    (Step::Cmd(Op::CheckExclusive), 2),
    (Step::Cmd(Op::Release), 1),
    (Step::FailedAllocMigration, 3),
];

struct Fuzzer<'a> {
    rng: Rng,
    thp: bool,
    files: &'a [Dmirror; 3],
    watchdog: &'a Watchdog,
    /// Keeps the region's address range ours; its pages come and go.
    _reserve: Mapping,
    base: usize,
    pages: Vec<Page>,
    /// The device's side of every transfer: READ's output, WRITE's input.
    buf: Mapping,
    next_stamp: u32,
    step: u64,
    /// Print every step before it runs (`DMIRROR_FUZZ_TRACE=1`): the
    /// history of a step that crashed the kernel.
    trace: bool,
    history: VecDeque<String>,
    slowest: (Duration, String),
    /// Results by command and errno (0: success).
    counts: std::collections::BTreeMap<(usize, i32), u64>,
    /// Pages SNAPSHOT found mapped by a PMD.
    pmd_seen: u64,
}

impl<'a> Fuzzer<'a> {
    fn new(
        seed: u64,
        thp: bool,
        files: &'a [Dmirror; 3],
        watchdog: &'a Watchdog,
    ) -> Result<Self, Failure> {
        let pmd = mem::pmd_size();
        let len = PMDS * pmd;
        let reserve = Mapping::rw(len + pmd)?;
        let base = mem::align_up(reserve.addr(), pmd);
        let n = len / page_size();
        let mut f = Fuzzer {
            rng: Rng::new(seed),
            thp,
            files,
            watchdog,
            _reserve: reserve,
            base,
            pages: vec![
                Page {
                    prot: Prot::ReadWrite,
                    stamp: 0
                };
                n
            ],
            buf: Mapping::rw(len)?,
            next_stamp: 1,
            step: 0,
            trace: std::env::var_os("DMIRROR_FUZZ_TRACE").is_some_and(|v| v == "1"),
            history: VecDeque::new(),
            slowest: (Duration::ZERO, String::new()),
            counts: Default::default(),
            pmd_seen: 0,
        };
        f.advise(0, n)?;
        // Data everywhere from the start; with THP on, two huge pages.
        f.one(Step::CpuWrite, 0, n, 0)?;
        Ok(f)
    }

    /// `READ 20 ok 3 EFAULT, ...; N pages seen in PMDs`.
    fn summary(&self) -> String {
        let mut s: Vec<String> = Vec::new();
        for (i, op) in super::ops::OPS.iter().enumerate() {
            let r: Vec<String> = self
                .counts
                .range((i, 0)..=(i, i32::MAX))
                .map(|(&(_, e), n)| match e {
                    0 => format!("{n} ok"),
                    e => format!("{n} {}", errno_name(e)),
                })
                .collect();
            if !r.is_empty() {
                s.push(format!("{} {}", op.name(), r.join(" ")));
            }
        }
        format!(
            "{}; SNAPSHOT saw {} pages in PMDs",
            s.join(", "),
            self.pmd_seen
        )
    }

    fn addr(&self, page: usize) -> usize {
        self.base + page * page_size()
    }

    fn npages(&self) -> usize {
        self.pages.len()
    }

    fn advise(&self, first: usize, n: usize) -> io::Result<()> {
        let advice = if self.thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        mem::madvise(self.addr(first), n * page_size(), advice)
    }

    fn run(&mut self, steps: u64) -> TestResult {
        for step in 0..steps {
            self.step = step;
            let kind = self.pick_step();
            let (first, n) = self.pick_range();
            let file = self.rng.below(3) as usize;
            let line = format!("{step}: {kind:?} pages {first}+{n} file {file}");
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            if self.trace {
                diag!("{line}");
            }
            self.history.push_back(line);
            self.one(kind, first, n, file)?;
        }
        // Everything the model knows, through the CPU, at the end.
        self.cpu_check(0, self.npages(), "final CPU check")
    }

    fn pick_step(&mut self) -> Step {
        let total: u64 = STEPS.iter().map(|&(_, w)| w).sum();
        let mut x = self.rng.below(total);
        for &(s, w) in STEPS {
            if x < w {
                return s;
            }
            x -= w;
        }
        unreachable!()
    }

    /// A run of pages: mostly short, sometimes one whole PMD, sometimes
    /// anything up to the end of the region.
    fn pick_range(&mut self) -> (usize, usize) {
        let n = self.npages();
        let per_pmd = n / PMDS;
        let (first, len) = match self.rng.below(10) {
            0..=4 => (
                self.rng.below(n as u64) as usize,
                1 + self.rng.below(4) as usize,
            ),
            5..=7 => (
                self.rng.below(n as u64) as usize,
                1 + self.rng.below(64) as usize,
            ),
            8 => (per_pmd * self.rng.below(PMDS as u64) as usize, per_pmd),
            _ => {
                let f = self.rng.below(n as u64) as usize;
                (f, 1 + self.rng.below((n - f) as u64) as usize)
            }
        };
        (first, len.min(n - first))
    }

    /// The first page of `[first, first + n)` that does not satisfy `ok`.
    fn first_not(&self, first: usize, n: usize, ok: impl Fn(Prot) -> bool) -> Option<usize> {
        (first..first + n).find(|&p| !ok(self.pages[p].prot))
    }

    /// `[first, first + n)` cut short before the first page without `ok`.
    fn clip(&self, first: usize, n: usize, ok: impl Fn(Prot) -> bool) -> usize {
        self.first_not(first, n, ok).map_or(n, |p| p - first)
    }

    fn new_stamp(&mut self) -> u32 {
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }

    fn one(&mut self, kind: Step, first: usize, n: usize, file: usize) -> TestResult {
        let ps = page_size();
        match kind {
            Step::CpuRead => {
                let n = self.clip(first, n, Prot::readable);
                self.cpu_check(first, n, "CPU read")?;
            }
            Step::CpuWrite => {
                let n = self.clip(first, n, |p| p == Prot::ReadWrite);
                let stamp = self.new_stamp();
                for p in first..first + n {
                    // SAFETY: page p of the region is mapped read/write.
                    let w = unsafe { page_words_mut(self.addr(p)) };
                    for (i, x) in w.iter_mut().enumerate() {
                        *x = word(stamp, p, i);
                    }
                    self.pages[p].stamp = stamp;
                }
            }
            Step::Mprotect => {
                let n = self.clip(first, n, |p| p != Prot::Unmapped);
                let prot = [Prot::None, Prot::Read, Prot::ReadWrite][self.rng.below(3) as usize];
                if n > 0 {
                    mem::protect(self.addr(first), n * ps, prot.bits())?;
                }
                for p in &mut self.pages[first..first + n] {
                    p.prot = prot;
                }
            }
            Step::DontNeed => {
                let n = self.clip(first, n, |p| p != Prot::Unmapped);
                if n > 0 {
                    mem::madvise(self.addr(first), n * ps, libc::MADV_DONTNEED)?;
                }
                for p in &mut self.pages[first..first + n] {
                    p.stamp = 0;
                }
            }
            Step::Unmap => {
                mem::unmap(self.addr(first), n * ps)?;
                for p in &mut self.pages[first..first + n] {
                    *p = Page {
                        prot: Prot::Unmapped,
                        stamp: 0,
                    };
                }
            }
            Step::MapOver => {
                mem::unmap(self.addr(first), n * ps)?;
                mem::map_anon_at(self.addr(first), n * ps, libc::MAP_FIXED_NOREPLACE)?;
                self.advise(first, n)?;
                for p in &mut self.pages[first..first + n] {
                    *p = Page {
                        prot: Prot::ReadWrite,
                        stamp: 0,
                    };
                }
            }
            Step::Fork => self.fork(first, n)?,
            Step::NewPmd => {
                let per_pmd = self.npages() / PMDS;
                let first = first / per_pmd * per_pmd;
                self.one(Step::MapOver, first, per_pmd, file)?;
                self.one(Step::CpuWrite, first, per_pmd, file)?;
            }
            Step::FailedAllocMigration => self.failed_alloc_migration(first, n, file)?,
            Step::Cmd(op) => self.cmd(op, first, n, file, false)?,
        }
        Ok(())
    }

    /// Every readable page of `[first, first + n)` must hold what the
    /// model says, through the CPU.
    fn cpu_check(&self, first: usize, n: usize, what: &str) -> TestResult {
        for p in first..first + n {
            let page = self.pages[p];
            if !page.prot.readable() {
                continue;
            }
            // SAFETY: page p of the region is mapped readable.
            let w = unsafe { page_words(self.addr(p)) };
            check_page(what, p, page.stamp, w)?;
        }
        Ok(())
    }

    /// A child checks the whole region through the CPU and writes some of
    /// it; the parent's pages must not change (the next checks see).
    fn fork(&mut self, first: usize, n: usize) -> TestResult {
        let n = self.clip(first, n, |p| p == Prot::ReadWrite);
        let status = harness::fork_and_wait(|| {
            self.cpu_check(0, self.npages(), "CPU read in a forked child")?;
            for p in first..first + n {
                // SAFETY: page p is mapped read/write in the child too.
                let w = unsafe { page_words_mut(self.addr(p)) };
                w.fill(!0);
            }
            Ok(())
        })?;
        ensure!(status == 0, "forked child: {}", harness::describe(status));
        Ok(())
    }

    /// FLAGS sets FAIL_ALLOC, a migration to or from the device meets it,
    /// FLAGS clears it: the flag is never left set where a later command
    /// or a CPU fault could meet it unforeseen.
    fn failed_alloc_migration(&mut self, first: usize, n: usize, file: usize) -> TestResult {
        let flags = |f: &mut Self, flags| f.cmd(Op::Flags, first, flags, file, true);
        flags(self, HMM_DMIRROR_FLAG_FAIL_ALLOC as usize)?;
        let op = [Op::MigrateToDev, Op::MigrateToSys][self.rng.below(2) as usize];
        self.cmd(op, first, n, file, true)?;
        // An unused flag bit: 0 pages is EINVAL for every command.
        flags(self, 2)
    }

    /// One command; with `fail_alloc`, FAIL_ALLOC may be set on `file`.
    /// FLAGS takes its flags in `n`.
    fn cmd(&mut self, op: Op, first: usize, n: usize, file: usize, fail_alloc: bool) -> TestResult {
        let ps = page_size();
        let addr = self.addr(first);
        let mut write_stamp = 0;
        if op == Op::Write {
            write_stamp = self.new_stamp();
            for p in 0..n {
                // SAFETY: `buf` is read/write and as long as the region.
                let w = unsafe { page_words_mut(self.buf.addr() + p * ps) };
                for (i, x) in w.iter_mut().enumerate() {
                    *x = word(write_stamp, first + p, i);
                }
            }
        }
        let files = self.files;
        let d = &files[file];
        let (r, took) = self
            .watchdog
            .watch(self.step, || d.cmd(op.request(), addr, self.buf.addr(), n));
        if took > self.slowest.0 {
            self.slowest = (took, format!("{} of {n} pages", op.name()));
        }
        let e = r.as_ref().map_or_else(errno, |_| 0);
        *self.counts.entry((op.nr(), e)).or_default() += 1;
        let want = self.expected(op, first, n);
        let what = format!("{} pages {first}+{n} file {file}", op.name());
        let counters = match (r, want) {
            (Ok(c), Ok(())) => c,
            // A page it could not bring to this device (another device
            // holds it, or FAIL_ALLOC) is not in the device page table
            // when the command reads the range back, as in C.
            (Err(e), Ok(())) if op == Op::MigrateToDev && errno(&e) == libc::ENOENT => {
                return Ok(())
            }
            // Exclusive entries go with any invalidation; the model does
            // not follow them, so either answer is right.
            (Err(e), Ok(())) if op == Op::CheckExclusive && errno(&e) == libc::EPERM => {
                return Ok(())
            }
            // FAIL_ALLOC on a small page moving back to the system is
            // VM_FAULT_OOM, before any later page is looked at.
            (Err(e), _) if fail_alloc && op == Op::MigrateToSys && errno(&e) == libc::ENOMEM => {
                return Ok(())
            }
            (Err(e), Err(w)) if errno(&e) == w => {
                if op == Op::Write {
                    self.resolve_partial_write(first, n, write_stamp)?;
                }
                return Ok(());
            }
            (r, want) => {
                return Err(Failure::Fail(format!(
                    "{what}: got {}, want {}",
                    result_errno(&r),
                    want.map_or_else(|e| errno_name(e).to_string(), |_| "success".into())
                )))
            }
        };
        match op {
            Op::Read | Op::ReadUnlockable | Op::Exclusive | Op::MigrateToDev => {
                ensure!(
                    counters.cpages == n as u64,
                    "{what}: cpages {}",
                    counters.cpages
                );
                for p in 0..n {
                    // SAFETY: `buf` is read/write and as long as the region.
                    let w = unsafe { page_words(self.buf.addr() + p * ps) };
                    check_page(&what, first + p, self.pages[first + p].stamp, w)?;
                }
                if op == Op::Exclusive {
                    self.check_exclusive_revoked(d, first, n, &what)?;
                }
            }
            Op::Write => {
                ensure!(
                    counters.cpages == n as u64,
                    "{what}: cpages {}",
                    counters.cpages
                );
                for p in &mut self.pages[first..first + n] {
                    p.stamp = write_stamp;
                }
            }
            Op::Snapshot => {
                self.check_snapshot(first, n, &what)?;
                let bytes = &self.buf.bytes()[..n];
                self.pmd_seen += bytes
                    .iter()
                    .filter(|&&b| b != HMM_DMIRROR_PROT_ERROR && b & HMM_DMIRROR_PROT_PMD != 0)
                    .count() as u64;
            }
            _ => {}
        }
        Ok(())
    }

    /// Right after a successful EXCLUSIVE, CHECK_EXCLUSIVE reports the
    /// device's exclusive entries (`EPERM`); once the CPU touched every
    /// page, none is left.
    fn check_exclusive_revoked(
        &self,
        d: &Dmirror,
        first: usize,
        n: usize,
        what: &str,
    ) -> TestResult {
        let addr = self.addr(first);
        let check = || {
            self.watchdog
                .watch(self.step, || {
                    d.cmd(Op::CheckExclusive.request(), addr, self.buf.addr(), n)
                })
                .0
        };
        let r = check();
        ensure!(
            r.as_ref().is_err_and(|e| errno(e) == libc::EPERM),
            "CHECK_EXCLUSIVE right after {what}: got {}, want EPERM",
            result_errno(&r)
        );
        self.cpu_check(first, n, "CPU read after EXCLUSIVE")?;
        let r = check();
        ensure!(
            r.is_ok(),
            "CHECK_EXCLUSIVE after {what} and a CPU read: got {}, want success",
            result_errno(&r)
        );
        Ok(())
    }

    /// How `op` over `[first, first + n)` must end: success, or the errno
    /// for the first page it cannot use.
    fn expected(&self, op: Op, first: usize, n: usize) -> Result<(), i32> {
        let bad = |ok: fn(Prot) -> bool| self.first_not(first, n, ok).map(|p| self.pages[p].prot);
        match op {
            Op::Read | Op::ReadUnlockable => match bad(Prot::readable) {
                Some(_) => Err(libc::EFAULT),
                None => Ok(()),
            },
            Op::Write => match bad(|p| p == Prot::ReadWrite) {
                Some(Prot::Read) => Err(libc::EPERM),
                Some(_) => Err(libc::EFAULT),
                None => Ok(()),
            },
            Op::Exclusive => match bad(|p| p == Prot::ReadWrite) {
                Some(_) => Err(libc::EFAULT),
                None => Ok(()),
            },
            Op::MigrateToDev | Op::MigrateToSys => match bad(Prot::readable) {
                Some(_) => Err(libc::EINVAL),
                None => Ok(()),
            },
            Op::CheckExclusive | Op::Snapshot | Op::Release | Op::Flags => Ok(()),
        }
    }

    /// A WRITE failed part way: the pages before the one it could not
    /// write may or may not hold the new data. Find out through the CPU
    /// (they are all read/write) and make the model say what they hold.
    fn resolve_partial_write(&mut self, first: usize, n: usize, stamp: u32) -> TestResult {
        let n = self.clip(first, n, |p| p == Prot::ReadWrite);
        for p in first..first + n {
            // SAFETY: page p of the region is mapped read/write.
            let w = unsafe { page_words(self.addr(p)) };
            let old = self.pages[p].stamp;
            if check_page("after a failed WRITE", p, old, w).is_err() {
                check_page("after a failed WRITE (old or new data)", p, stamp, w)?;
                self.pages[p].stamp = stamp;
            }
        }
        Ok(())
    }

    fn check_snapshot(&self, first: usize, n: usize, what: &str) -> TestResult {
        let bytes = &self.buf.bytes()[..n];
        for (i, &b) in bytes.iter().enumerate() {
            let p = first + i;
            let prot = self.pages[p].prot;
            let ok =
                match prot {
                    Prot::Unmapped | Prot::None => b == HMM_DMIRROR_PROT_ERROR,
                    Prot::Read => b != HMM_DMIRROR_PROT_ERROR && b & HMM_DMIRROR_PROT_WRITE == 0,
                    Prot::ReadWrite => b != HMM_DMIRROR_PROT_ERROR,
                } && (self.thp || b == HMM_DMIRROR_PROT_ERROR || b & HMM_DMIRROR_PROT_PMD == 0);
            ensure!(
                ok,
                "{what}: page {p} ({prot:?}, thp {}): {b:#04x}",
                self.thp
            );
        }
        Ok(())
    }
}

/// # Safety
/// `addr` is a page mapped readable for the life of the result.
unsafe fn page_words<'p>(addr: usize) -> &'p [u64] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(addr as *const u64, page_size() / 8) }
}

/// # Safety
/// `addr` is a page mapped read/write, and nothing else refers to it, for
/// the life of the result.
unsafe fn page_words_mut<'p>(addr: usize) -> &'p mut [u64] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u64, page_size() / 8) }
}

fn check_page(what: &str, page: usize, stamp: u32, w: &[u64]) -> TestResult {
    match w
        .iter()
        .enumerate()
        .find(|&(i, &x)| x != word(stamp, page, i))
    {
        None => Ok(()),
        Some((i, &x)) => Err(mismatch(what, page, stamp, i, x)),
    }
}

fn mismatch(what: &str, page: usize, stamp: u32, i: usize, x: u64) -> Failure {
    Failure::Fail(format!(
        "{what}: page {page} word {i}: got {x:#018x} (stamp {}, page {}), want stamp {stamp}",
        x >> 32,
        (x >> 9) & 0x7f_ffff
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_tell_stamp_page_and_offset_apart() {
        assert_eq!(word(0, 5, 7), 0);
        assert_ne!(word(1, 5, 7), word(2, 5, 7));
        assert_ne!(word(1, 5, 7), word(1, 6, 7));
        assert_ne!(word(1, 5, 7), word(1, 5, 8));
        assert_eq!(word(3, 5, 7) >> 32, 3);
        assert_eq!((word(3, 5, 7) >> 9) & 0x7f_ffff, 5);
    }
}
