// SPDX-License-Identifier: GPL-2.0

//! What is measured: one timed ioctl over memory prepared a given way.
//!
//! A workload is one line of [`all`]. New operations (migration, once the
//! Rust module has device memory) are one more line each; a module that
//! answers an ioctl with EOPNOTSUPP gets the workload skipped, not failed.

use hmm_dmirror_uapi::*;
use serde::{Deserialize, Serialize};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Sizes are given in bytes of 4 KiB pages; the runner checks the guest's
/// page size is that.
pub const PAGE: usize = 4 * KIB;

/// The timed ioctl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Read,
    Write,
    Snapshot,
    ReadUnlockable,
    MigrateToDev,
    MigrateToSys,
}

impl Op {
    pub fn request(self) -> u32 {
        match self {
            Op::Read => HMM_DMIRROR_READ,
            Op::Write => HMM_DMIRROR_WRITE,
            Op::Snapshot => HMM_DMIRROR_SNAPSHOT,
            Op::ReadUnlockable => HMM_DMIRROR_READ_UNLOCKABLE,
            Op::MigrateToDev => HMM_DMIRROR_MIGRATE_TO_DEV,
            Op::MigrateToSys => HMM_DMIRROR_MIGRATE_TO_SYS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::Write => "WRITE",
            Op::Snapshot => "SNAPSHOT",
            Op::ReadUnlockable => "READ_UNLOCKABLE",
            Op::MigrateToDev => "MIGRATE_TO_DEV",
            Op::MigrateToSys => "MIGRATE_TO_SYS",
        }
    }
}

/// How a userfaultfd handler resolves a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolve {
    /// UFFDIO_COPY of the faulting page only: one event per page.
    Page,
    /// UFFDIO_COPY of the 2 MiB-aligned block around the fault (the whole
    /// region if smaller): one event per block.
    Block,
}

/// The pages under a migration workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// 4 KiB pages (`MADV_NOHUGEPAGE`).
    Small,
    /// 2 MiB-aligned transparent huge pages (`MADV_HUGEPAGE`).
    Thp,
}

/// The memory under the timed ioctl, and what is redone per repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Memory {
    /// Touched by the CPU and mirrored by one READ, untimed, before each
    /// repetition: the timed ioctl hits the device page table.
    Mirrored,
    /// A fresh mapping per repetition, never touched: the fault path.
    Untouched,
    /// A fresh 2 MiB-aligned mapping per repetition, touched by the CPU,
    /// not mirrored.
    Touched(Backing),
    /// Like `Touched`, then migrated to the device (untimed).
    OnDevice(Backing),
    /// A fresh userfaultfd-MISSING region per repetition, answered by a
    /// handler thread.
    Userfault(Resolve),
}

impl Memory {
    pub fn name(self) -> &'static str {
        match self {
            Memory::Mirrored => "mirrored",
            Memory::Untouched => "untouched",
            Memory::Touched(Backing::Small) => "touched 4K",
            Memory::Touched(Backing::Thp) => "touched THP",
            Memory::OnDevice(Backing::Small) => "on device 4K",
            Memory::OnDevice(Backing::Thp) => "on device THP",
            Memory::Userfault(Resolve::Page) => "uffd page/fault",
            Memory::Userfault(Resolve::Block) => "uffd block/fault",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub op: Op,
    pub memory: Memory,
    pub pages: usize,
    /// Timed repetitions, at most: see [`TIME_BUDGET`].
    pub reps: usize,
    /// Untimed repetitions first: 1, or 0 where one repetition already
    /// runs the same path thousands of times.
    pub warmups: usize,
    /// Time after which it stops at [`MIN_REPS`] repetitions.
    pub budget: std::time::Duration,
}

/// Once a workload has spent this long, it stops after its
/// [`MIN_REPS`]th repetition: a loaded host slows TCG down a lot, and the
/// whole run should stay within about ten minutes.
pub const TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);
pub const MIN_REPS: usize = 3;

impl Workload {
    const fn new(op: Op, memory: Memory, bytes: usize, reps: usize) -> Self {
        Workload {
            op,
            memory,
            pages: bytes / PAGE,
            reps,
            warmups: 1,
            budget: TIME_BUDGET,
        }
    }

    const fn without_warmup(self) -> Self {
        Workload { warmups: 0, ..self }
    }

    /// This workload as one of `rounds` runs whose samples are merged:
    /// its share of the repetitions (at least [`MIN_REPS`]) and of the
    /// time budget.
    pub fn share(self, rounds: usize) -> Self {
        let rounds = rounds.max(1);
        Workload {
            reps: self.reps.div_ceil(rounds).max(MIN_REPS.min(self.reps)),
            budget: self.budget / rounds as u32,
            ..self
        }
    }

    pub fn bytes(&self) -> usize {
        self.pages * PAGE
    }

    /// A unique, readable name: "READ mirrored 2 MiB".
    pub fn name(&self) -> String {
        let size = match self.memory {
            // The lock-drop series is about page counts.
            Memory::Userfault(_) => format!("N={}", self.pages),
            _ => size_name(self.bytes()),
        };
        format!("{} {} {}", self.op.name(), self.memory.name(), size)
    }
}

/// "4 KiB", "64 KiB", "2 MiB".
pub fn size_name(bytes: usize) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// Whether `--only` `filter` selects the workload `name`: it contains
/// `filter`, or one of its `|`-separated parts.
pub fn matches(name: &str, filter: &str) -> bool {
    filter.split('|').any(|part| name.contains(part))
}

/// Every workload, in table order. Under TCG small workloads are noisy
/// and cheap, so they get many repetitions; the 64 MiB ones and the
/// 4096-event userfaultfd read take a second or more each (set-up
/// included), so they get few. Both modules together, in four rounds,
/// take about five minutes on an idle 2-core host.
pub fn all() -> Vec<Workload> {
    use Memory::*;
    use Op::*;
    let mut w = Vec::new();
    for op in [Read, Write] {
        w.push(Workload::new(op, Mirrored, PAGE, 51));
        w.push(Workload::new(op, Mirrored, 64 * KIB, 51));
        w.push(Workload::new(op, Mirrored, 2 * MIB, 21));
        w.push(Workload::new(op, Mirrored, 64 * MIB, 7));
    }
    w.push(Workload::new(Read, Untouched, 2 * MIB, 21));
    w.push(Workload::new(Read, Untouched, 64 * MIB, 7));
    w.push(Workload::new(Snapshot, Mirrored, 2 * MIB, 21));
    w.push(Workload::new(Snapshot, Mirrored, 64 * MIB, 9));
    let uffd = |resolve, pages, reps| {
        Workload::new(ReadUnlockable, Userfault(resolve), pages * PAGE, reps)
    };
    w.push(uffd(Resolve::Page, 1, 51));
    w.push(uffd(Resolve::Page, 16, 31));
    w.push(uffd(Resolve::Page, 256, 11));
    // 4096 lock drops and handler round trips: seconds per repetition.
    w.push(uffd(Resolve::Page, 4096, 5).without_warmup());
    w.push(uffd(Resolve::Block, 1, 51));
    w.push(uffd(Resolve::Block, 16, 31));
    w.push(uffd(Resolve::Block, 256, 21));
    w.push(uffd(Resolve::Block, 4096, 11));
    for backing in [Backing::Small, Backing::Thp] {
        w.push(Workload::new(MigrateToDev, Touched(backing), 2 * MIB, 11));
        w.push(Workload::new(MigrateToDev, Touched(backing), 64 * MIB, 5));
        w.push(Workload::new(MigrateToSys, OnDevice(backing), 2 * MIB, 11));
        w.push(Workload::new(MigrateToSys, OnDevice(backing), 64 * MIB, 5));
    }
    w
}

/// Workloads a module may not serve yet (it answers EOPNOTSUPP): run with
/// `--pending`; move a line to [`all`] once both modules serve it. None
/// at the moment: device-coherent memory (devices 2 and 3) would be next.
pub fn pending() -> Vec<Workload> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn only_takes_alternatives() {
        assert!(matches("READ mirrored 4 KiB", "mirrored 4"));
        assert!(matches(
            "READ_UNLOCKABLE uffd page/fault N=256",
            "SNAPSHOT|N=256"
        ));
        assert!(!matches("READ mirrored 4 KiB", "SNAPSHOT|N=256"));
    }

    #[test]
    fn names_are_unique() {
        let list: Vec<_> = all().into_iter().chain(pending()).collect();
        let names: HashSet<_> = list.iter().map(Workload::name).collect();
        assert_eq!(names.len(), list.len());
    }

    #[test]
    fn every_workload_repeats() {
        for w in all().into_iter().chain(pending()) {
            assert!(w.reps >= 3, "{}", w.name());
            assert!(w.pages >= 1, "{}", w.name());
        }
    }

    #[test]
    fn rounds_share_reps_and_budget() {
        let w = Workload::new(Op::Read, Memory::Mirrored, PAGE, 51);
        let half = w.share(2);
        assert_eq!((half.reps, half.budget), (26, TIME_BUDGET / 2));
        assert_eq!(
            Workload::new(Op::Read, Memory::Mirrored, PAGE, 5)
                .share(2)
                .reps,
            MIN_REPS
        );
        assert_eq!(w.share(1).reps, 51);
    }

    #[test]
    fn names_read_well() {
        let w = Workload::new(Op::Read, Memory::Mirrored, 2 * MIB, 1);
        assert_eq!(w.name(), "READ mirrored 2 MiB");
        assert_eq!(w.pages, 512);
        let u = Workload::new(
            Op::ReadUnlockable,
            Memory::Userfault(Resolve::Block),
            16 * PAGE,
            1,
        );
        assert_eq!(u.name(), "READ_UNLOCKABLE uffd block/fault N=16");
        assert_eq!(size_name(4096), "4 KiB");
        assert_eq!(size_name(64 << 20), "64 MiB");
    }

    #[test]
    fn requests_are_the_abi() {
        assert_eq!(Op::ReadUnlockable.request() & 0xff, 9);
        assert_eq!(Op::Snapshot.request(), HMM_DMIRROR_SNAPSHOT);
    }
}
