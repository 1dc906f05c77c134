// SPDX-License-Identifier: GPL-2.0

//! Userspace selftests for the dmirror (test_hmm) driver, C or Rust.
//! See `hmm-dmirror-selftests --help` and README.md.

pub mod check;
pub mod cli;
pub mod dmirror;
pub mod harness;
pub mod ioc;
pub mod ktap;
pub mod mem;
pub mod tests;
pub mod uffd;
pub mod watchdog;
