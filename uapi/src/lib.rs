// SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note

//! The dmirror ioctl ABI for Rust userspace.
//!
//! The definitions live in `abi.rs`, which the kernel module includes too.

#![no_std]

mod abi;
pub use abi::*;
