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

/// The guest the numbers come from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GuestInfo {
    pub kernel: String,
    pub cpus: usize,
    pub page_size: usize,
    /// /sys/kernel/mm/transparent_hugepage/enabled, e.g. "[always] madvise never".
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
}
