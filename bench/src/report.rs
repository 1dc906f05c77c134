// SPDX-License-Identifier: GPL-2.0

//! The host side: pair the two modules' runs workload by workload and
//! reduce the samples to the numbers the table, JSON and plot show.

use crate::model::{GuestInfo, ModuleRun, Outcome, Sample};
use crate::stats::{loglog_slope, Summary};
use crate::workload::{Memory, Op, Resolve};
use serde::{Deserialize, Serialize};

/// Everything `results.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub vm: VmInfo,
    /// How to read `rust_over_c`.
    pub ratio: String,
    pub workloads: Vec<Row>,
    /// READ_UNLOCKABLE: how time grows with N, per module and handler.
    pub unlockable_growth: Vec<Growth>,
}

pub const RATIO_MEANING: &str =
    "rust_over_c = Rust pages/s / C pages/s (= C median time / Rust median time): \
     1 or more, Rust is as fast or faster";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    /// "kvm", "tcg" or "unknown", from vm-run's own line.
    pub accel: String,
    pub vm_run_line: String,
    pub guest: GuestInfo,
    /// The host's load averages (1, 5, 15 min) and CPU count just before
    /// and after the VM ran, as scripts/bench saved them.
    #[serde(default)]
    pub host_load_before: String,
    #[serde(default)]
    pub host_load_after: String,
    /// Runs of each module whose samples were merged, in the order C,
    /// Rust, Rust, C, ...: drift in the host's speed hits both alike.
    #[serde(default)]
    pub rounds: usize,
}

/// One workload, both modules.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub op: Op,
    pub memory: Memory,
    pub pages: usize,
    pub c: Side,
    pub rust: Side,
    pub rust_over_c: Option<f64>,
}

/// One module's result for a workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Side {
    Ok(Measured),
    Skipped {
        note: String,
    },
    Failed {
        error: String,
    },
    /// The module's run has no such workload (it did not load, say).
    Missing,
}

impl Side {
    pub fn measured(&self) -> Option<&Measured> {
        match self {
            Side::Ok(m) => Some(m),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    /// Whole ioctl, nanoseconds.
    pub time_ns: Summary,
    pub ns_per_page: Summary,
    /// From the median time.
    pub pages_per_s: f64,
    /// Medians over the repetitions of the command's outputs and, for
    /// userfaultfd workloads, of what the handler saw.
    pub cpages: u64,
    pub faults: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uffd_events: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uffd_copies: Option<u64>,
    pub samples: Vec<Sample>,
}

impl Measured {
    pub fn of(samples: &[Sample], pages: usize) -> Option<Self> {
        let time_ns = Summary::of(&samples.iter().map(|s| s.ns).collect::<Vec<_>>())?;
        let med = |f: fn(&Sample) -> Option<u64>| -> Option<u64> {
            let v: Vec<u64> = samples.iter().filter_map(f).collect();
            Summary::of(&v).map(|s| s.median.round() as u64)
        };
        Some(Measured {
            time_ns,
            ns_per_page: time_ns.scaled(pages as f64),
            pages_per_s: pages as f64 * 1e9 / time_ns.median,
            cpages: med(|s| Some(s.cpages)).unwrap_or(0),
            faults: med(|s| Some(s.faults)).unwrap_or(0),
            uffd_events: med(|s| s.uffd_events),
            uffd_copies: med(|s| s.uffd_copies),
            samples: samples.to_vec(),
        })
    }
}

/// Log-log slopes of READ_UNLOCKABLE time over N between successive N.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Growth {
    pub module: String,
    pub resolve: Resolve,
    /// (N from, N to, slope): 1 is linear.
    pub slopes: Vec<(usize, usize, f64)>,
}

/// "tcg" or "kvm" from vm-run's "vm-run: tcg, 2 CPUs, 2G, module none".
pub fn accel_of(vm_run_log: &str) -> (String, String) {
    for line in vm_run_log.lines() {
        if let Some(rest) = line.strip_prefix("vm-run: ") {
            let accel = rest.split(',').next().unwrap_or("").trim();
            if accel == "kvm" || accel == "tcg" {
                return (accel.to_string(), line.trim().to_string());
            }
        }
    }
    ("unknown".to_string(), String::new())
}

fn side(run: Option<&ModuleRun>, name: &str, pages: usize) -> Side {
    let Some(w) = run.and_then(|r| r.workloads.iter().find(|w| w.name == name)) else {
        return Side::Missing;
    };
    match &w.outcome {
        Outcome::Ok { samples } => match Measured::of(samples, pages) {
            Some(m) => Side::Ok(m),
            None => Side::Failed {
                error: "no samples".into(),
            },
        },
        Outcome::Skipped { note } => Side::Skipped { note: note.clone() },
        Outcome::Failed { error } => Side::Failed {
            error: error.clone(),
        },
    }
}

/// Pair the runs; either may be missing (its module failed to load).
pub fn compare(c: Option<&ModuleRun>, rust: Option<&ModuleRun>, vm_run_log: &str) -> Results {
    compare_on(c, rust, vm_run_log, ("", ""))
}

/// [`compare`], with the host's load before and after the run.
pub fn compare_on(
    c: Option<&ModuleRun>,
    rust: Option<&ModuleRun>,
    vm_run_log: &str,
    host_load: (&str, &str),
) -> Results {
    // Workload order and identity come from whichever run there is.
    let order = c.or(rust).map(|r| r.workloads.as_slice()).unwrap_or(&[]);
    let workloads: Vec<Row> = order
        .iter()
        .map(|w| {
            let c_side = side(c, &w.name, w.pages);
            let rust_side = side(rust, &w.name, w.pages);
            let rust_over_c = match (c_side.measured(), rust_side.measured()) {
                (Some(c), Some(rust)) => Some(c.time_ns.median / rust.time_ns.median),
                _ => None,
            };
            Row {
                name: w.name.clone(),
                op: w.op,
                memory: w.memory,
                pages: w.pages,
                c: c_side,
                rust: rust_side,
                rust_over_c,
            }
        })
        .collect();
    let (accel, vm_run_line) = accel_of(vm_run_log);
    let guest = c.or(rust).map(|r| r.guest.clone()).unwrap_or_default();
    let unlockable_growth = growth(&workloads);
    Results {
        vm: VmInfo {
            accel,
            vm_run_line,
            guest,
            host_load_before: host_load.0.trim().to_string(),
            host_load_after: host_load.1.trim().to_string(),
            rounds: 1,
        },
        ratio: RATIO_MEANING.to_string(),
        workloads,
        unlockable_growth,
    }
}

/// The median time of each READ_UNLOCKABLE N, per module and handler.
pub fn unlockable_series<'a>(
    rows: &'a [Row],
    module: &str,
    resolve: Resolve,
) -> Vec<(usize, &'a Measured)> {
    let mut v: Vec<(usize, &Measured)> = rows
        .iter()
        .filter(|r| r.op == Op::ReadUnlockable && r.memory == Memory::Userfault(resolve))
        .filter_map(|r| {
            let s = if module == "c" { &r.c } else { &r.rust };
            s.measured().map(|m| (r.pages, m))
        })
        .collect();
    v.sort_by_key(|(n, _)| *n);
    v
}

fn growth(rows: &[Row]) -> Vec<Growth> {
    let mut out = Vec::new();
    for resolve in [Resolve::Page, Resolve::Block] {
        for module in ["c", "rust"] {
            let s = unlockable_series(rows, module, resolve);
            let slopes: Vec<_> = s
                .windows(2)
                .filter_map(|p| {
                    let (na, a) = p[0];
                    let (nb, b) = p[1];
                    loglog_slope(na as f64, a.time_ns.median, nb as f64, b.time_ns.median)
                        .map(|k| (na, nb, k))
                })
                .collect();
            if !slopes.is_empty() {
                out.push(Growth {
                    module: module.to_string(),
                    resolve,
                    slopes,
                });
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::WorkloadRun;
    use crate::workload::Backing;

    fn sample(ns: u64, pages: u64) -> Sample {
        Sample {
            ns,
            cpages: pages,
            faults: 1,
            ..Default::default()
        }
    }

    pub(crate) fn run(module: &str, scale: u64) -> ModuleRun {
        let ok = |name: &str, op, memory, pages: usize, ns: &[u64]| WorkloadRun {
            name: name.into(),
            op,
            memory,
            pages,
            outcome: Outcome::Ok {
                samples: ns
                    .iter()
                    .map(|&t| sample(t * scale, pages as u64))
                    .collect(),
            },
        };
        let uffd = Memory::Userfault(Resolve::Page);
        let mut workloads = vec![
            ok(
                "READ mirrored 2 MiB",
                Op::Read,
                Memory::Mirrored,
                512,
                &[100, 90, 110],
            ),
            ok(
                "READ_UNLOCKABLE a N=16",
                Op::ReadUnlockable,
                uffd,
                16,
                &[16],
            ),
            ok(
                "READ_UNLOCKABLE a N=256",
                Op::ReadUnlockable,
                uffd,
                256,
                &[256],
            ),
        ];
        workloads.push(WorkloadRun {
            name: "MIGRATE_TO_DEV touched 4K 2 MiB".into(),
            op: Op::MigrateToDev,
            memory: Memory::Touched(Backing::Small),
            pages: 512,
            outcome: if module == "c" {
                Outcome::Ok {
                    samples: vec![sample(1000, 512)],
                }
            } else {
                Outcome::Skipped {
                    note: "MIGRATE_TO_DEV returns EOPNOTSUPP".into(),
                }
            },
        });
        ModuleRun {
            module: module.into(),
            guest: GuestInfo::default(),
            workloads,
        }
    }

    #[test]
    fn compares_medians() {
        let (c, r) = (run("c", 1), run("rust", 2));
        let res = compare(
            Some(&c),
            Some(&r),
            "noise\nvm-run: tcg, 2 CPUs, 2G, module none\n",
        );
        assert_eq!(res.vm.accel, "tcg");
        let read = &res.workloads[0];
        assert_eq!(read.rust_over_c, Some(0.5));
        let m = read.c.measured().unwrap();
        assert_eq!(m.time_ns.median, 100.0);
        assert!((m.pages_per_s - 512.0 * 1e7).abs() < 1e-3);
        let mig = &res.workloads[3];
        assert!(matches!(mig.rust, Side::Skipped { .. }));
        assert_eq!(mig.rust_over_c, None);
    }

    #[test]
    fn growth_is_linear_for_proportional_times() {
        let (c, r) = (run("c", 1), run("rust", 3));
        let res = compare(Some(&c), Some(&r), "");
        assert_eq!(res.vm.accel, "unknown");
        assert_eq!(res.unlockable_growth.len(), 2);
        for g in &res.unlockable_growth {
            assert_eq!(g.slopes.len(), 1);
            assert!((g.slopes[0].2 - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn a_missing_module_leaves_gaps() {
        let c = run("c", 1);
        let res = compare(Some(&c), None, "");
        assert!(matches!(res.workloads[0].rust, Side::Missing));
        assert_eq!(res.workloads[0].rust_over_c, None);
    }

    #[test]
    fn accel_line() {
        assert_eq!(accel_of("vm-run: kvm, 2 CPUs, 4G, module none").0, "kvm");
        assert_eq!(accel_of("vm-run: the VM did not finish").0, "unknown");
    }
}
