// SPDX-License-Identifier: GPL-2.0

//! Benchmark of the dmirror driver: the same workloads against the C
//! `test_hmm.ko` and the Rust `rust_hmm_dmirror.ko`, in one VM boot.
//! See README.md.

pub mod cli;
pub mod mem;
pub mod model;
pub mod plot;
pub mod report;
pub mod run;
pub mod stats;
pub mod table;
pub mod workload;
