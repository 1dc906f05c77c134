// SPDX-License-Identifier: GPL-2.0

//! What the guest writes per module (`raw-c.json`, `raw-rust.json`) and
//! the host reads back to compare.

use crate::workload::{Memory, Op};
use serde::{Deserialize, Serialize};

/// One module's run of every workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleRun {
    /// "c" or "rust".
    pub module: String,
    pub guest: GuestInfo,
    pub workloads: Vec<WorkloadRun>,
}

impl ModuleRun {
    /// One run from several rounds of the same module: each workload's
    /// samples together, in round order. A workload that failed (or was
    /// skipped) in any round is failed (or skipped).
    pub fn merge(runs: Vec<ModuleRun>) -> Option<ModuleRun> {
        let mut runs = runs.into_iter();
        let mut merged = runs.next()?;
        for run in runs {
            for w in run.workloads {
                match merged.workloads.iter_mut().find(|m| m.name == w.name) {
                    Some(m) => m.outcome.absorb(w.outcome),
                    None => merged.workloads.push(w),
                }
            }
        }
        Some(merged)
    }
}

impl Outcome {
    /// Adds another round's outcome to this one, in place: samples
    /// append; a failure, then a skip, wins over samples.
    fn absorb(&mut self, other: Outcome) {
        match (&mut *self, other) {
            (Outcome::Ok { samples }, Outcome::Ok { samples: more }) => samples.extend(more),
            (Outcome::Failed { .. }, _) => {}
            (_, failed @ Outcome::Failed { .. }) => *self = failed,
            (Outcome::Skipped { .. }, _) => {}
            (_, skipped) => *self = skipped,
        }
    }
}

/// The guest the numbers come from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GuestInfo {
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    /// The CPUs the benchmark may run on (its affinity: bench-guest pins it).
    #[serde(default)]
    pub bench_cpus: usize,
    pub page_size: usize,
    /// /sys/kernel/mm/transparent_hugepage/enabled, e.g. `[always] madvise never`.
    pub thp: String,
    /// The `hypervisor` flag of /proc/cpuinfo: set under KVM, and by
    /// QEMU's TCG too, so it does not tell them apart (vm-run's line does).
    pub hypervisor_flag: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadRun {
    pub name: String,
    pub op: Op,
    pub memory: Memory,
    pub pages: usize,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Ok {
        samples: Vec<Sample>,
    },
    /// The module does not implement an ioctl the workload needs.
    Skipped {
        note: String,
    },
    Failed {
        error: String,
    },
}

/// One timed repetition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Wall time of the ioctl alone.
    pub ns: u64,
    /// The command's `cpages` and `faults` outputs.
    pub cpages: u64,
    pub faults: u64,
    /// Userfaultfd workloads: events the handler read, and how many of
    /// them it resolved with UFFDIO_COPY (the rest were already there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uffd_events: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uffd_copies: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Resolve;

    #[test]
    fn round_trips_through_json() {
        let run = WorkloadRun {
            name: "x".into(),
            op: Op::ReadUnlockable,
            memory: Memory::Userfault(Resolve::Block),
            pages: 16,
            outcome: Outcome::Ok {
                samples: vec![Sample {
                    ns: 5,
                    cpages: 16,
                    faults: 1,
                    uffd_events: Some(1),
                    uffd_copies: Some(1),
                }],
            },
        };
        let text = serde_json::to_string(&run).unwrap();
        assert!(text.contains(r#""status":"ok""#), "{text}");
        let back: WorkloadRun = serde_json::from_str(&text).unwrap();
        assert_eq!(back.outcome, run.outcome);
        assert_eq!(back.memory, run.memory);
        let skipped = serde_json::to_string(&Outcome::Skipped { note: "n".into() }).unwrap();
        assert_eq!(skipped, r#"{"status":"skipped","note":"n"}"#);
    }

    fn run_of(outcomes: &[(&str, Outcome)]) -> ModuleRun {
        ModuleRun {
            module: "c".into(),
            guest: GuestInfo::default(),
            workloads: outcomes
                .iter()
                .map(|(name, outcome)| WorkloadRun {
                    name: name.to_string(),
                    op: Op::Read,
                    memory: Memory::Mirrored,
                    pages: 1,
                    outcome: outcome.clone(),
                })
                .collect(),
        }
    }

    fn ok(ns: &[u64]) -> Outcome {
        Outcome::Ok {
            samples: ns
                .iter()
                .map(|&ns| Sample {
                    ns,
                    ..Sample::default()
                })
                .collect(),
        }
    }

    #[test]
    fn merges_rounds() {
        let failed = Outcome::Failed { error: "e".into() };
        let first = run_of(&[("a", ok(&[1, 2])), ("b", ok(&[5])), ("c", ok(&[7]))]);
        let second = run_of(&[("a", ok(&[3])), ("b", failed.clone()), ("d", ok(&[9]))]);
        let merged = ModuleRun::merge(vec![first, second]).unwrap();
        let outcomes: Vec<_> = merged
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), &w.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("a", &ok(&[1, 2, 3])),
                ("b", &failed),
                ("c", &ok(&[7])),
                ("d", &ok(&[9]))
            ]
        );
        assert!(ModuleRun::merge(Vec::new()).is_none());
    }
}
