// SPDX-License-Identifier: GPL-2.0

//! Malformed commands: what the ioctl dispatcher must refuse, and how.

use crate::check::{check_each, expect_errno};
use crate::dmirror::{page_size, Dmirror};
use crate::ensure_eq;
use crate::harness::{Test, TestResult};
use crate::mem::Mapping;
use hmm_dmirror_uapi::*;
use std::io;

pub const TESTS: &[Test] = &[
    Test::new("badinput.unaligned_addr", unaligned_addr),
    Test::new("badinput.zero_pages", zero_pages),
    Test::new("badinput.overflow", overflow),
    Test::new("badinput.unknown_command", unknown_command),
    Test::new("badinput.bad_buffer_ptr", bad_buffer_ptr),
    Test::new("badinput.bad_cmd_ptr", bad_cmd_ptr),
    Test::new("badinput.unmapped_addr", unmapped_addr),
    Test::new("badinput.error_leaves_cmd", error_leaves_cmd),
];

/// The data commands every check below is tried on.
const DATA_CMDS: &[(u32, &str)] = &[
    (HMM_DMIRROR_READ, "READ"),
    (HMM_DMIRROR_WRITE, "WRITE"),
    (HMM_DMIRROR_SNAPSHOT, "SNAPSHOT"),
    (HMM_DMIRROR_READ_UNLOCKABLE, "READ_UNLOCKABLE"),
];

fn each_cmd(mut f: impl FnMut(u32, &str) -> TestResult) -> TestResult {
    DATA_CMDS.iter().try_for_each(|&(req, name)| f(req, name))
}

fn unaligned_addr() -> TestResult {
    let d = Dmirror::open(0)?;
    let (buf, out) = (Mapping::rw(2 * page_size())?, Mapping::rw(2 * page_size())?);
    each_cmd(|req, name| {
        for off in [1, 8, page_size() / 2, page_size() - 1] {
            let r = d.cmd(req, buf.addr() + off, out.addr(), 1);
            expect_errno(r, libc::EINVAL, &format!("{name} at page+{off}"))?;
        }
        Ok(())
    })
}

fn zero_pages() -> TestResult {
    let d = Dmirror::open(0)?;
    let (buf, out) = (Mapping::rw(page_size())?, Mapping::rw(page_size())?);
    each_cmd(|req, name| expect_errno(d.cmd(req, buf.addr(), out.addr(), 0), libc::EINVAL, name))
}

/// addr + npages * PAGE_SIZE wraps around.
fn overflow() -> TestResult {
    let d = Dmirror::open(0)?;
    let ps = page_size();
    let out = Mapping::rw(ps)?;
    let top = usize::MAX & !(ps - 1);
    each_cmd(|req, name| {
        for (addr, npages) in [
            (top, 1),
            (top, 2),
            (ps, usize::MAX / ps),
            (0x10000, 1 << 52),
        ] {
            let r = d.cmd(req, addr, out.addr(), npages);
            expect_errno(
                r,
                libc::EINVAL,
                &format!("{name} addr={addr:#x} npages={npages:#x}"),
            )?;
        }
        Ok(())
    })
}

fn unknown_command() -> TestResult {
    let d = Dmirror::open(0)?;
    let (buf, out) = (Mapping::rw(page_size())?, Mapping::rw(page_size())?);
    // Unused numbers with the right size, and READ with the wrong size.
    let wrong_size = HMM_DMIRROR_READ & !(0x3fff << 16) | (32 << 16);
    for req in [
        dmirror_iowr(0x0a),
        dmirror_iowr(0x3f),
        dmirror_iowr(0xff),
        wrong_size,
    ] {
        expect_errno(
            d.cmd(req, buf.addr(), out.addr(), 1),
            libc::EINVAL,
            &format!("ioctl {req:#x}"),
        )?;
    }
    Ok(())
}

/// A buffer pointer the kernel cannot copy to or from.
fn bad_buffer_ptr() -> TestResult {
    let d = Dmirror::open(0)?;
    let mut buf = Mapping::rw(page_size())?;
    buf.bytes_mut().fill(7);
    for (req, name) in [
        (HMM_DMIRROR_READ, "READ"),
        (HMM_DMIRROR_WRITE, "WRITE"),
        (HMM_DMIRROR_SNAPSHOT, "SNAPSHOT"),
    ] {
        for ptr in [0usize, 8, usize::MAX & !0xfff] {
            expect_errno(
                d.cmd(req, buf.addr(), ptr, 1),
                libc::EFAULT,
                &format!("{name} ptr={ptr:#x}"),
            )?;
        }
    }
    check_each("memory behind failed commands", buf.bytes(), |_| 7)
}

/// The ioctl argument itself is not readable.
fn bad_cmd_ptr() -> TestResult {
    let d = Dmirror::open(0)?;
    for ptr in [0usize, 16, usize::MAX & !0xfff] {
        // SAFETY: the kernel validates the pointer; we pass garbage on purpose.
        let r = unsafe { libc::ioctl(d.raw_fd(), HMM_DMIRROR_READ as _, ptr) };
        let r = if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        expect_errno(r, libc::EFAULT, &format!("cmd at {ptr:#x}"))?;
    }
    Ok(())
}

/// READ and WRITE of an address with no VMA fail with EFAULT.
fn unmapped_addr() -> TestResult {
    let d = Dmirror::open(0)?;
    let ps = page_size();
    let out = Mapping::rw(4 * ps)?;
    let hole = {
        let m = Mapping::rw(4 * ps)?;
        m.addr()
    };
    for (req, name) in [
        (HMM_DMIRROR_READ, "READ"),
        (HMM_DMIRROR_WRITE, "WRITE"),
        (HMM_DMIRROR_READ_UNLOCKABLE, "READ_UNLOCKABLE"),
    ] {
        expect_errno(d.cmd(req, hole, out.addr(), 4), libc::EFAULT, name)?;
    }
    // SNAPSHOT does not fault: a hole is reported, not an error.
    let c = d.snapshot(hole, out.addr(), 4)?;
    ensure_eq!(c.cpages, 4);
    check_each("snapshot of a hole", &out.bytes()[..4], |_| {
        HMM_DMIRROR_PROT_ERROR
    })
}

/// A failed command leaves the caller's struct alone (no partial copy back).
fn error_leaves_cmd() -> TestResult {
    let d = Dmirror::open(0)?;
    let buf = Mapping::anon(4 * page_size(), libc::PROT_NONE)?;
    let out = Mapping::rw(4 * page_size())?;
    let before = HmmDmirrorCmd {
        addr: buf.addr() as u64,
        ptr: out.addr() as u64,
        npages: 4,
        cpages: 0xdead,
        faults: 0xbeef,
    };
    let mut cmd = before;
    expect_errno(
        d.ioctl(HMM_DMIRROR_READ, &mut cmd).map(|_| cmd),
        libc::EFAULT,
        "READ of PROT_NONE",
    )?;
    ensure_eq!(cmd, before);
    Ok(())
}
