// SPDX-License-Identifier: GPL-2.0

//! The ten dmirror commands, by number, for the suites that go through
//! all of them.

use hmm_dmirror_uapi::dmirror_iowr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    MigrateToDev = 2,
    MigrateToSys = 3,
    Snapshot = 4,
    Exclusive = 5,
    CheckExclusive = 6,
    Release = 7,
    Flags = 8,
    ReadUnlockable = 9,
}

pub const OPS: &[Op] = &[
    Op::Read,
    Op::Write,
    Op::MigrateToDev,
    Op::MigrateToSys,
    Op::Snapshot,
    Op::Exclusive,
    Op::CheckExclusive,
    Op::Release,
    Op::Flags,
    Op::ReadUnlockable,
];

impl Op {
    pub fn nr(self) -> usize {
        self as usize
    }

    pub fn request(self) -> u32 {
        dmirror_iowr(self as u32)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::Write => "WRITE",
            Op::MigrateToDev => "MIGRATE_TO_DEV",
            Op::MigrateToSys => "MIGRATE_TO_SYS",
            Op::Snapshot => "SNAPSHOT",
            Op::Exclusive => "EXCLUSIVE",
            Op::CheckExclusive => "CHECK_EXCLUSIVE",
            Op::Release => "RELEASE",
            Op::Flags => "FLAGS",
            Op::ReadUnlockable => "READ_UNLOCKABLE",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm_dmirror_uapi::*;

    #[test]
    fn numbers_match_the_uapi() {
        let want = [
            HMM_DMIRROR_READ,
            HMM_DMIRROR_WRITE,
            HMM_DMIRROR_MIGRATE_TO_DEV,
            HMM_DMIRROR_MIGRATE_TO_SYS,
            HMM_DMIRROR_SNAPSHOT,
            HMM_DMIRROR_EXCLUSIVE,
            HMM_DMIRROR_CHECK_EXCLUSIVE,
            HMM_DMIRROR_RELEASE,
            HMM_DMIRROR_FLAGS,
            HMM_DMIRROR_READ_UNLOCKABLE,
        ];
        assert_eq!(OPS.len(), want.len());
        for (i, (&op, w)) in OPS.iter().zip(want).enumerate() {
            assert_eq!(op.nr(), i);
            assert_eq!(op.request(), w, "{}", op.name());
        }
    }
}
