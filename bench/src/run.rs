// SPDX-License-Identifier: GPL-2.0

//! The guest side: run the workloads against whichever dmirror module is
//! loaded, timing only the ioctl.

use crate::mem::{touch, AlignedMapping};
use crate::model::{GuestInfo, ModuleRun, Outcome, Sample, WorkloadRun};
use crate::workload::{Backing, Memory, Op, Resolve, Workload, MIN_REPS, PAGE};
use hmm_dmirror_selftests::dmirror::{page_size, Dmirror};
use hmm_dmirror_selftests::mem::{madvise, Mapping, TWO_MB};
use hmm_dmirror_selftests::uffd::{Handler, HandlerConfig, Uffd};
use std::io;
use std::sync::Arc;
use std::time::Instant;

/// Why a workload stopped before its last repetition.
enum Stop {
    /// An ioctl answered EOPNOTSUPP: the module does not implement it.
    Unsupported(&'static str),
    Failed(String),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Failed(e.to_string())
    }
}

type Result<T> = std::result::Result<T, Stop>;

/// Run every workload in `list` against the loaded module, reporting
/// progress on stderr.
pub fn run_all(module: &str, list: &[Workload]) -> ModuleRun {
    let workloads = list
        .iter()
        .map(|w| {
            let started = Instant::now();
            let outcome = run_one(w);
            eprintln!(
                "bench [{module}] {}: {} ({:.1} s)",
                w.name(),
                describe(&outcome),
                started.elapsed().as_secs_f64()
            );
            WorkloadRun {
                name: w.name(),
                op: w.op,
                memory: w.memory,
                pages: w.pages,
                outcome,
            }
        })
        .collect();
    ModuleRun {
        module: module.to_string(),
        guest: guest_info(),
        workloads,
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Ok { samples } => {
            let mut ns: Vec<u64> = samples.iter().map(|s| s.ns).collect();
            ns.sort_unstable();
            format!("{} reps, median {} us", ns.len(), ns[ns.len() / 2] / 1000)
        }
        Outcome::Skipped { note } => format!("skipped: {note}"),
        Outcome::Failed { error } => format!("FAILED: {error}"),
    }
}

pub fn run_one(w: &Workload) -> Outcome {
    if page_size() != PAGE {
        return Outcome::Failed {
            error: format!("page size {} (the workloads assume {PAGE})", page_size()),
        };
    }
    match measure(w) {
        Ok(samples) => Outcome::Ok { samples },
        Err(Stop::Unsupported(op)) => Outcome::Skipped {
            note: format!("{op} returns EOPNOTSUPP (not implemented by this module)"),
        },
        Err(Stop::Failed(error)) => Outcome::Failed { error },
    }
}

/// `w.warmups` untimed repetitions, then up to `w.reps` timed ones:
/// fewer, but at least `MIN_REPS`, once `w.budget` is spent.
///
/// Every repetition sets up its memory and buffer afresh: under TCG one
/// setup can run a small ioctl twice as slow as another, for its whole
/// life, and a workload's median must not hang on one setup.
fn measure(w: &Workload) -> Result<Vec<Sample>> {
    let d = Dmirror::open(0)?;
    let started = Instant::now();
    let mut samples = Vec::with_capacity(w.reps);
    for rep in 0..w.warmups + w.reps {
        if samples.len() >= MIN_REPS.min(w.reps) && started.elapsed() > w.budget {
            break;
        }
        // The buffer the device copies to or from: present before timing,
        // so the ioctl's copy_to_user/copy_from_user does not fault.
        let mut buf = Mapping::rw(w.bytes())?;
        touch(&mut buf, PAGE);
        let sample = match w.memory {
            Memory::Userfault(resolve) => timed_userfault(&d, w, resolve, buf.addr())?,
            memory => {
                let m = prepare(&d, w, memory, buf.addr())?;
                timed(&d, w, m.addr(), buf.addr())?
            }
        };
        if rep >= w.warmups {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// The memory under one repetition, unmapped on drop.
enum Region {
    Plain(Mapping),
    Aligned(AlignedMapping),
}

impl Region {
    fn addr(&self) -> usize {
        match self {
            Region::Plain(m) => m.addr(),
            Region::Aligned(m) => m.addr(),
        }
    }
}

/// A new mapping, prepared as `memory` asks, for one repetition.
fn prepare(d: &Dmirror, w: &Workload, memory: Memory, buf: usize) -> Result<Region> {
    let (backing, to_device) = match memory {
        Memory::Touched(b) => (b, false),
        Memory::OnDevice(b) => (b, true),
        Memory::Untouched => return Ok(Region::Plain(Mapping::rw(w.bytes())?)),
        Memory::Mirrored => {
            let mut m = Mapping::rw(w.bytes())?;
            touch(&mut m, PAGE);
            ioctl(d, Op::Read, m.addr(), buf, w.pages)?;
            return Ok(Region::Plain(m));
        }
        Memory::Userfault(_) => unreachable!("timed_userfault sets it up"),
    };
    // Aligned, so that THP backing gets whole PMDs.
    let mut m = AlignedMapping::new(w.bytes(), TWO_MB)?;
    let advice = match backing {
        Backing::Small => libc::MADV_NOHUGEPAGE,
        Backing::Thp => libc::MADV_HUGEPAGE,
    };
    madvise(m.addr(), w.bytes(), advice)?;
    m.touch(PAGE);
    if to_device {
        ioctl(d, Op::MigrateToDev, m.addr(), buf, w.pages)?;
    }
    Ok(Region::Aligned(m))
}

/// One repetition over a fresh userfaultfd-MISSING region, with a handler
/// thread answering the device's faults.
fn timed_userfault(d: &Dmirror, w: &Workload, resolve: Resolve, buf: usize) -> Result<Sample> {
    let len = w.bytes();
    let unit = match resolve {
        Resolve::Page => PAGE,
        Resolve::Block => len.min(TWO_MB),
    };
    // The handler rounds a fault down to a multiple of `unit`; with a
    // 2 MiB-aligned region that stays inside it if `unit` divides both.
    if !unit.is_power_of_two() || !len.is_multiple_of(unit) {
        return Err(Stop::Failed(format!(
            "{len} bytes cannot be resolved in units of {unit}"
        )));
    }
    let region = AlignedMapping::new(len, TWO_MB)?;
    // Not user-mode-only: the faults come from the kernel, for the device.
    let uffd = Arc::new(Uffd::new()?);
    uffd.register_missing(region.addr(), len)?;
    let handler = Handler::spawn(uffd, HandlerConfig::copy(region.addr(), unit, fill))?;
    let mut sample = timed(d, w, region.addr(), buf)?;
    let stats = handler.stop()?;
    sample.uffd_copies = Some(stats.faults.len() as u64);
    sample.uffd_events = Some((stats.faults.len() + stats.already_present) as u64);
    Ok(sample)
}

/// The handler's page content: cheap, and the same for both modules.
fn fill(_unit: usize, buf: &mut [u8]) {
    buf.fill(0xa5);
}

/// The timed ioctl over `w.pages` pages at `addr`.
fn timed(d: &Dmirror, w: &Workload, addr: usize, buf: usize) -> Result<Sample> {
    let started = Instant::now();
    let r = ioctl(d, w.op, addr, buf, w.pages);
    let ns = started.elapsed().as_nanos() as u64;
    let c = r?;
    // Every page is accounted for by these ops; a short count is a bug.
    let whole = matches!(
        w.op,
        Op::Read | Op::Write | Op::Snapshot | Op::ReadUnlockable
    );
    if whole && c.cpages != w.pages as u64 {
        return Err(Stop::Failed(format!(
            "{}: cpages {} for {} pages",
            w.op.name(),
            c.cpages,
            w.pages
        )));
    }
    Ok(Sample {
        ns,
        cpages: c.cpages,
        faults: c.faults,
        ..Default::default()
    })
}

fn ioctl(
    d: &Dmirror,
    op: Op,
    addr: usize,
    buf: usize,
    pages: usize,
) -> Result<hmm_dmirror_selftests::dmirror::Counters> {
    d.cmd(op.request(), addr, buf, pages).map_err(|e| {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            Stop::Unsupported(op.name())
        } else {
            Stop::Failed(format!("{}: {e}", op.name()))
        }
    })
}

fn guest_info() -> GuestInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpuinfo = read("/proc/cpuinfo");
    GuestInfo {
        kernel: read("/proc/sys/kernel/osrelease"),
        cpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count(),
        bench_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        page_size: page_size(),
        thp: read("/sys/kernel/mm/transparent_hugepage/enabled"),
        hypervisor_flag: cpuinfo
            .lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor")),
    }
}
