// SPDX-License-Identifier: GPL-2.0

//! The test cases, grouped by theme. Names are `group.case`.

use crate::harness::{scaled, Test};
use std::io;
use std::time::Duration;

mod badinput;
mod coherent;
mod devmem;
mod devmem_life;
mod fuzz;
mod hostile;
mod lockdrop;
mod lockdrop_race;
mod mirror;
mod ops;
mod snapshot;
mod stress;

/// Every test, in run order.
pub fn all() -> Vec<&'static Test> {
    [
        mirror::TESTS,
        snapshot::TESTS,
        devmem::TESTS,
        devmem_life::TESTS,
        coherent::TESTS,
        badinput::TESTS,
        lockdrop::TESTS,
        lockdrop_race::TESTS,
        hostile::TESTS,
        fuzz::TESTS,
        stress::TESTS,
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// How long a process or a read may take to end once nothing holds it any
/// more: ten seconds, scaled like the per-test timeouts.
fn prompt() -> Duration {
    scaled(Duration::from_secs(10))
}

/// waitpid() for a child of the test itself, retried on EINTR; the
/// status, or 0 if the child is gone.
fn reap(pid: libc::pid_t) -> i32 {
    let mut st = 0;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return st;
        }
    }
}

#[cfg(test)]
mod registry {
    #[test]
    fn names_are_unique_and_grouped() {
        let all = super::all();
        assert!(all.len() >= 30, "{} cases", all.len());
        let mut names: Vec<_> = all.iter().map(|t| t.name).collect();
        assert!(names.iter().all(|n| n
            .split_once('.')
            .is_some_and(|(g, c)| !g.is_empty() && !c.is_empty())));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "duplicate test names");
    }
}
