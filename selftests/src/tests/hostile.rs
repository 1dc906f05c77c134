// SPDX-License-Identifier: GPL-2.0

//! `hostile.*`: every ioctl, and mmap of the device, fed hostile input.
//!
//! Each case expects exactly what the C module (`lib/test_hmm.c`) returns,
//! as measured in the VM; the comments say where in C the value comes
//! from. A test runs all its cases, prints one `# op case: got ... want ...`
//! line each, and fails at the end if any differed, listing them.
//!
//! C's dispatcher first copies the whole struct in (EFAULT), then checks
//! `addr` alignment and `addr < addr + (npages << PAGE_SHIFT)` (EINVAL),
//! both for every command word, known or not; only then does it switch on
//! the full word (unknown: EINVAL). A command that succeeds copies the
//! struct back (EFAULT if that fails, after the work is done).

use super::ops::{Op, OPS};
use super::reap;
use crate::dmirror::{errno_name, ioctl_raw, page_size, Dmirror};
use crate::harness::{Failure, Test, TestResult};
use crate::ioc;
use crate::mem::{self, Guarded, Mapping};
use crate::{diag, ensure, ensure_eq};
use hmm_dmirror_uapi::*;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const TESTS: &[Test] = &[
    Test::new("hostile.read", || run_op(Op::Read)),
    Test::new("hostile.write", || run_op(Op::Write)),
    Test::new("hostile.migrate_to_dev", || run_op(Op::MigrateToDev)),
    Test::new("hostile.migrate_to_sys", || run_op(Op::MigrateToSys)),
    Test::new("hostile.snapshot", || run_op(Op::Snapshot)),
    Test::new("hostile.exclusive", || run_op(Op::Exclusive)),
    Test::new("hostile.check_exclusive", || run_op(Op::CheckExclusive)),
    Test::new("hostile.release", || run_op(Op::Release)),
    Test::new("hostile.flags", || run_op(Op::Flags)),
    Test::new("hostile.read_unlockable", || run_op(Op::ReadUnlockable)),
    Test::new("hostile.unknown_cmd", unknown_cmd),
    Test::new("hostile.mmap", mmap),
    Test::new("hostile.foreign_mm", foreign_mm),
    Test::new("hostile.dead_mm", dead_mm),
];

/// Pages of each test region.
const NB: usize = 4;
/// A kernel address (the x86-64 direct map with 4-level paging).
const KERNEL_ADDR: u64 = 0xffff_8880_0000_0000;
/// The first non-canonical address with 4-level paging (unmapped user
/// space with 5-level paging).
const NONCANONICAL: u64 = 0x0000_8000_0000_0000;
/// The legacy vsyscall page: a "gate" area, not a VMA.
const VSYSCALL: u64 = 0xffff_ffff_ff60_0000;

/// What a command should end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Success; cpages not checked.
    Ok,
    /// Success with this cpages.
    Pages(u64),
    Err(i32),
    /// No defined expectation here (the reason is in `skip_reason`).
    Skip,
}

/// What it ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Got {
    /// A command succeeded and copied back this cpages.
    Ok(u64),
    /// Something else (mmap) succeeded.
    Done,
    Err(i32),
}

impl Want {
    fn matches(self, got: Got) -> bool {
        match (self, got) {
            (Want::Ok, Got::Ok(_) | Got::Done) => true,
            (Want::Pages(n), Got::Ok(c)) => n == c,
            (Want::Err(e), Got::Err(g)) => e == g,
            _ => false,
        }
    }
}

fn show_errno(e: i32) -> String {
    match errno_name(e) {
        "?" => format!("errno {e}"),
        n => n.to_string(),
    }
}

impl std::fmt::Display for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Want::Ok => write!(f, "success"),
            Want::Pages(n) => write!(f, "success cpages={n}"),
            Want::Err(e) => write!(f, "{}", show_errno(*e)),
            Want::Skip => write!(f, "-"),
        }
    }
}

impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Got::Ok(n) => write!(f, "success cpages={n}"),
            Got::Done => write!(f, "success"),
            Got::Err(e) => write!(f, "{}", show_errno(*e)),
        }
    }
}

fn got_of<T>(r: &io::Result<T>, cpages: impl FnOnce(&T) -> u64) -> Got {
    match r {
        Ok(v) => Got::Ok(cpages(v)),
        Err(e) => Got::Err(e.raw_os_error().unwrap_or(0)),
    }
}

fn done_or_errno<T>(r: &io::Result<T>) -> Got {
    match got_of(r, |_| 0) {
        Got::Ok(_) => Got::Done,
        g => g,
    }
}

/// Collects the results of a test's cases and fails with the mismatches.
#[derive(Default)]
struct Table {
    rows: usize,
    mismatches: Vec<String>,
}

impl Table {
    fn check(&mut self, what: &str, got: Got, want: Want) {
        self.rows += 1;
        let verdict = if want.matches(got) { "" } else { "  MISMATCH" };
        diag!("{what}: got {got}, want {want}{verdict}");
        if !verdict.is_empty() {
            self.mismatches
                .push(format!("{what}: got {got}, want {want}"));
        }
    }

    fn skip(&mut self, what: &str, why: &str) {
        diag!("{what}: not run ({why})");
    }

    fn finish(self) -> TestResult {
        if self.mismatches.is_empty() {
            diag!("{} cases as in C", self.rows);
            return Ok(());
        }
        Err(Failure::Fail(format!(
            "{} of {} cases differ from C: {}",
            self.mismatches.len(),
            self.rows,
            self.mismatches.join("; ")
        )))
    }
}

/// Where the command struct lives for a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmdAt {
    /// At the start of a read/write page.
    Page,
    /// One byte into that page: misaligned, but readable and writable.
    Misaligned,
    /// In that page, made read-only for the call.
    ReadOnly,
    /// The last 20 bytes before a guard page: half of it is readable.
    Straddle,
    /// At this address (NULL, unmapped, kernel).
    Raw(usize),
}

#[derive(Clone, Copy, Debug)]
struct Input {
    addr: u64,
    ptr: u64,
    npages: u64,
    at: CmdAt,
}

/// The memory every case draws from.
struct Env {
    d: Dmirror,
    /// NB pages, read/write, populated, between guards.
    buf: Guarded,
    /// NB pages for results, between guards.
    out: Guarded,
    /// NB read-only pages (not populated).
    ro: Guarded,
    /// NB PROT_NONE pages.
    none: Guarded,
    /// NB unmapped pages between guards.
    hole: Guarded,
    /// One page for the command struct.
    cmdpage: Guarded,
}

impl Env {
    fn new() -> Result<Self, Failure> {
        let mut buf = Guarded::rw(NB)?;
        for (i, b) in buf.bytes_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        Ok(Env {
            d: Dmirror::open(0)?,
            buf,
            out: Guarded::rw(NB)?,
            ro: Guarded::new(NB, libc::PROT_READ)?,
            none: Guarded::new(NB, libc::PROT_NONE)?,
            hole: Guarded::hole(NB)?,
            cmdpage: Guarded::rw(1)?,
        })
    }

    /// Issue `request` with the struct placed as `inp.at` says; on success
    /// the cpages the driver copied back.
    fn issue(&self, request: libc::c_ulong, inp: &Input) -> Got {
        let cmd = HmmDmirrorCmd {
            addr: inp.addr,
            ptr: inp.ptr,
            npages: inp.npages,
            cpages: 0xdead,
            faults: 0xbeef,
        }
        .to_ne_bytes();
        let page = self.cmdpage.addr();
        let at = match inp.at {
            CmdAt::Page | CmdAt::ReadOnly => page,
            CmdAt::Misaligned => page + 1,
            CmdAt::Straddle => self.cmdpage.end() - 20,
            CmdAt::Raw(p) => p,
        };
        if !matches!(inp.at, CmdAt::Raw(_)) {
            let n = cmd.len().min(self.cmdpage.end() - at);
            // SAFETY: [at, at + n) lies in cmdpage, which is read/write.
            unsafe { std::ptr::copy_nonoverlapping(cmd.as_ptr(), at as *mut u8, n) };
        }
        if inp.at == CmdAt::ReadOnly {
            mem::protect(page, page_size(), libc::PROT_READ).expect("mprotect cmd page");
        }
        let r = ioctl_raw(self.d.raw_fd(), request, at);
        if inp.at == CmdAt::ReadOnly {
            mem::protect(page, page_size(), libc::PROT_READ | libc::PROT_WRITE)
                .expect("mprotect cmd page back");
        }
        got_of(&r, |_| {
            let mut back = [0u8; HMM_DMIRROR_CMD_SIZE];
            // SAFETY: the struct was readable and writable for the call.
            unsafe {
                std::ptr::copy_nonoverlapping(at as *const u8, back.as_mut_ptr(), back.len())
            };
            HmmDmirrorCmd::from_ne_bytes(back).cpages
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Valid,
    Unaligned1,
    UnalignedLast,
    ZeroPages,
    ZeroPagesAtNull,
    WrapTop,
    WrapTop2,
    WrapMax,
    ShiftToZero,
    ShiftWraps,
    ShiftWrapsHigh,
    HugeNpages,
    ManyNpages,
    BeyondEnd,
    KernelAddr,
    NonCanonical,
    Vsyscall,
    AddrNull,
    Unmapped,
    ProtNone,
    ReadOnly,
    PtrNull,
    PtrUnmapped,
    PtrKernel,
    PtrReadOnly,
    PtrProtNone,
    PtrShort,
    CmdNull,
    CmdUnmapped,
    CmdKernel,
    CmdStraddle,
    CmdMisaligned,
    CmdReadOnly,
    CmdReadOnlyInvalid,
}

const CASES: &[Case] = &[
    Case::Valid,
    Case::Unaligned1,
    Case::UnalignedLast,
    Case::ZeroPages,
    Case::ZeroPagesAtNull,
    Case::WrapTop,
    Case::WrapTop2,
    Case::WrapMax,
    Case::ShiftToZero,
    Case::ShiftWraps,
    Case::ShiftWrapsHigh,
    Case::HugeNpages,
    Case::ManyNpages,
    Case::BeyondEnd,
    Case::KernelAddr,
    Case::NonCanonical,
    Case::Vsyscall,
    Case::AddrNull,
    Case::Unmapped,
    Case::ProtNone,
    Case::ReadOnly,
    Case::PtrNull,
    Case::PtrUnmapped,
    Case::PtrKernel,
    Case::PtrReadOnly,
    Case::PtrProtNone,
    Case::PtrShort,
    Case::CmdNull,
    Case::CmdUnmapped,
    Case::CmdKernel,
    Case::CmdStraddle,
    Case::CmdMisaligned,
    Case::CmdReadOnly,
    Case::CmdReadOnlyInvalid,
];

/// 2^40 pages: 4 PiB, far more than any memory.
const HUGE: u64 = 1 << 40;
/// 2^20 pages: 4 GiB.
const MANY: u64 = 1 << 20;

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Valid => "valid",
            Case::Unaligned1 => "addr_unaligned_+1",
            Case::UnalignedLast => "addr_unaligned_+4095",
            Case::ZeroPages => "npages_0",
            Case::ZeroPagesAtNull => "npages_0_addr_0",
            Case::WrapTop => "wrap_top_page",
            Case::WrapTop2 => "wrap_top_page_2",
            Case::WrapMax => "wrap_npages_2^52-1",
            Case::ShiftToZero => "npages_2^52_shifts_to_0",
            Case::ShiftWraps => "npages_2^52+1_shifts_to_1",
            Case::ShiftWrapsHigh => "npages_2^63+1_shifts_to_1",
            Case::HugeNpages => "npages_2^40",
            Case::ManyNpages => "npages_2^20",
            Case::BeyondEnd => "into_guard_page",
            Case::KernelAddr => "addr_kernel",
            Case::NonCanonical => "addr_noncanonical",
            Case::Vsyscall => "addr_vsyscall",
            Case::AddrNull => "addr_0",
            Case::Unmapped => "addr_unmapped",
            Case::ProtNone => "addr_prot_none",
            Case::ReadOnly => "addr_read_only",
            Case::PtrNull => "ptr_null",
            Case::PtrUnmapped => "ptr_unmapped",
            Case::PtrKernel => "ptr_kernel",
            Case::PtrReadOnly => "ptr_read_only",
            Case::PtrProtNone => "ptr_prot_none",
            Case::PtrShort => "ptr_runs_into_guard",
            Case::CmdNull => "cmd_null",
            Case::CmdUnmapped => "cmd_unmapped",
            Case::CmdKernel => "cmd_kernel",
            Case::CmdStraddle => "cmd_half_mapped",
            Case::CmdMisaligned => "cmd_misaligned",
            Case::CmdReadOnly => "cmd_read_only",
            Case::CmdReadOnlyInvalid => "cmd_read_only_bad_addr",
        }
    }

    fn input(self, env: &Env) -> Input {
        let ps = page_size() as u64;
        let buf = env.buf.addr() as u64;
        let out = env.out.addr() as u64;
        let top = !(ps - 1);
        let mut inp = Input {
            addr: buf,
            ptr: out,
            npages: 1,
            at: CmdAt::Page,
        };
        match self {
            Case::Valid => {}
            Case::Unaligned1 => inp.addr = buf + 1,
            Case::UnalignedLast => inp.addr = buf + ps - 1,
            Case::ZeroPages => inp.npages = 0,
            Case::ZeroPagesAtNull => (inp.addr, inp.npages) = (0, 0),
            Case::WrapTop => inp.addr = top,
            Case::WrapTop2 => (inp.addr, inp.npages) = (top, 2),
            Case::WrapMax => inp.npages = u64::MAX / ps,
            Case::ShiftToZero => inp.npages = 1 << 52,
            Case::ShiftWraps => inp.npages = (1 << 52) + 1,
            Case::ShiftWrapsHigh => inp.npages = (1 << 63) + 1,
            // The result buffer is the last page of `out`: a SNAPSHOT
            // of 2^40 pages runs out of it after 4096.
            Case::HugeNpages => (inp.npages, inp.ptr) = (HUGE, env.out.end() as u64 - ps),
            Case::ManyNpages => (inp.npages, inp.ptr) = (MANY, env.out.end() as u64 - ps),
            Case::BeyondEnd => inp.npages = NB as u64 + 1,
            Case::KernelAddr => inp.addr = KERNEL_ADDR,
            Case::NonCanonical => inp.addr = NONCANONICAL,
            Case::Vsyscall => inp.addr = VSYSCALL,
            Case::AddrNull => inp.addr = 0,
            Case::Unmapped => (inp.addr, inp.npages) = (env.hole.addr() as u64, NB as u64),
            Case::ProtNone => (inp.addr, inp.npages) = (env.none.addr() as u64, NB as u64),
            Case::ReadOnly => (inp.addr, inp.npages) = (env.ro.addr() as u64, NB as u64),
            Case::PtrNull => inp.ptr = 0,
            Case::PtrUnmapped => inp.ptr = env.hole.addr() as u64,
            Case::PtrKernel => inp.ptr = KERNEL_ADDR,
            Case::PtrReadOnly => inp.ptr = env.ro.addr() as u64,
            Case::PtrProtNone => inp.ptr = env.none.addr() as u64,
            Case::PtrShort => (inp.ptr, inp.npages) = (env.out.end() as u64 - 1, 2),
            Case::CmdNull => inp.at = CmdAt::Raw(0),
            Case::CmdUnmapped => inp.at = CmdAt::Raw(env.hole.addr()),
            Case::CmdKernel => inp.at = CmdAt::Raw(KERNEL_ADDR as usize),
            Case::CmdStraddle => inp.at = CmdAt::Straddle,
            Case::CmdMisaligned => inp.at = CmdAt::Misaligned,
            Case::CmdReadOnly => inp.at = CmdAt::ReadOnly,
            Case::CmdReadOnlyInvalid => (inp.addr, inp.at) = (buf + 1, CmdAt::ReadOnly),
        }
        inp
    }

    /// What C returns for `op` (see the module comment for the order of
    /// its checks).
    fn want(self, op: Op) -> Want {
        use Op::*;
        let (efault, einval) = (Want::Err(libc::EFAULT), Want::Err(libc::EINVAL));
        let nb = NB as u64;
        match self {
            // The dispatcher's checks, before the switch.
            Case::Unaligned1
            | Case::UnalignedLast
            | Case::ZeroPages
            | Case::ZeroPagesAtNull
            | Case::WrapTop
            | Case::WrapTop2
            | Case::WrapMax
            | Case::ShiftToZero
            | Case::CmdReadOnlyInvalid => einval,
            // copy_from_user() of the struct.
            Case::CmdNull | Case::CmdUnmapped | Case::CmdKernel | Case::CmdStraddle => efault,
            // The command succeeds; copy_to_user() of the struct fails.
            Case::CmdReadOnly => efault,
            // npages << PAGE_SHIFT drops the high bits: one page.
            Case::Valid | Case::CmdMisaligned | Case::ShiftWraps | Case::ShiftWrapsHigh => match op
            {
                Read | ReadUnlockable | Write | Snapshot | MigrateToDev | Exclusive => {
                    Want::Pages(1)
                }
                MigrateToSys | CheckExclusive | Release | Flags => Want::Pages(0),
            },
            Case::HugeNpages | Case::ManyNpages => match op {
                // The bounce buffer: vmalloc(npages * PAGE_SIZE). 4 GiB
                // could succeed in a big VM, so only 2^40 pages is tried.
                Read | ReadUnlockable | Write if self == Case::HugeNpages => {
                    Want::Err(libc::ENOMEM)
                }
                Read | ReadUnlockable | Write => Want::Skip,
                // One byte per page to a one-page buffer.
                Snapshot => efault,
                // The guard page after `buf` is a VMA without VM_READ.
                MigrateToDev | MigrateToSys => einval,
                // make_device_exclusive() on the guard page.
                Exclusive => efault,
                // C's loop takes one xa_load() per page: 2^40 would not end.
                CheckExclusive if self == Case::HugeNpages => Want::Skip,
                CheckExclusive | Release | Flags => Want::Pages(0),
            },
            Case::BeyondEnd => match op {
                Read | ReadUnlockable | Write => efault,
                Snapshot => Want::Pages(nb + 1),
                MigrateToDev | MigrateToSys => einval,
                Exclusive => efault,
                CheckExclusive | Release | Flags => Want::Pages(0),
            },
            Case::KernelAddr | Case::NonCanonical | Case::Vsyscall | Case::AddrNull => match op {
                Read | ReadUnlockable | Write => efault,
                Snapshot => Want::Pages(1),
                MigrateToDev | MigrateToSys => einval,
                Exclusive => efault,
                CheckExclusive | Release | Flags => Want::Pages(0),
            },
            Case::Unmapped | Case::ProtNone => match op {
                Read | ReadUnlockable | Write => efault,
                Snapshot => Want::Pages(nb),
                MigrateToDev | MigrateToSys => einval,
                Exclusive => efault,
                CheckExclusive | Release | Flags => Want::Pages(0),
            },
            Case::ReadOnly => match op {
                Read | ReadUnlockable | Snapshot | MigrateToDev => Want::Pages(nb),
                Write => Want::Err(libc::EPERM),
                Exclusive => efault,
                MigrateToSys | CheckExclusive | Release | Flags => Want::Pages(0),
            },
            Case::PtrNull
            | Case::PtrUnmapped
            | Case::PtrKernel
            | Case::PtrProtNone
            | Case::PtrShort => match op {
                Read | ReadUnlockable | Write | Snapshot | MigrateToDev | Exclusive => efault,
                MigrateToSys | CheckExclusive | Release | Flags => Want::Pages(0),
            },
            // WRITE only reads from ptr.
            Case::PtrReadOnly => match op {
                Read | ReadUnlockable | Snapshot | MigrateToDev | Exclusive => efault,
                Write => Want::Pages(1),
                MigrateToSys | CheckExclusive | Release | Flags => Want::Pages(0),
            },
        }
    }
}

fn skip_reason(case: Case, op: Op) -> &'static str {
    match (case, op) {
        (Case::HugeNpages, Op::CheckExclusive) => {
            "C checks each of the 2^40 pages: it would run for hours"
        }
        (Case::ManyNpages, _) => "a 4 GiB bounce buffer may or may not fit, depending on the VM",
        _ => "no defined result",
    }
}

/// Every case for one command. A module that does not implement the
/// command answers EOPNOTSUPP, which no case wants: it fails.
fn run_op(op: Op) -> TestResult {
    let env = Env::new()?;
    let mut t = Table::default();
    for &case in CASES {
        let what = format!("{} {}", op.name(), case.name());
        let want = case.want(op);
        if want == Want::Skip {
            t.skip(&what, skip_reason(case, op));
            continue;
        }
        let got = env.issue(op.request() as libc::c_ulong, &case.input(&env));
        t.check(&what, got, want);
    }
    t.finish()
}

/// Command words the driver does not implement. C copies the struct in
/// and checks it before it looks at the word: with a good struct every
/// one is EINVAL, with a NULL struct EFAULT.
fn unknown_cmd() -> TestResult {
    let env = Env::new()?;
    let mut t = Table::default();
    let groups: Vec<(&str, Vec<ioc::Variant>)> = vec![
        (
            "_IOWR('H', 10..=255, 40)",
            (10..=255u8)
                .map(|nr| ioc::Variant {
                    label: format!("_IOWR('H', {nr}, 40)"),
                    cmd: ioc::dmirror(nr),
                })
                .collect(),
        ),
        (
            "nr 0..=9 under other type bytes",
            (0..=9).flat_map(ioc::other_types).collect(),
        ),
        (
            "nr 0..=9 with a wrong size or direction",
            (0..=9).flat_map(ioc::wrong_encodings).collect(),
        ),
    ];
    let good = Case::Valid.input(&env);
    let null = Case::CmdNull.input(&env);
    for (group, variants) in &groups {
        for (arg, inp, want) in [
            ("good struct", &good, Want::Err(libc::EINVAL)),
            ("NULL struct", &null, Want::Err(libc::EFAULT)),
        ] {
            let mut bad = Vec::new();
            for v in variants {
                let got = env.issue(v.cmd as libc::c_ulong, inp);
                if !want.matches(got) {
                    bad.push(format!("{} ({:#x}): {got}", v.label, v.cmd));
                }
            }
            let what = format!("{group}, {arg}: {} words", variants.len());
            if bad.is_empty() {
                diag!("{what}: all {want}");
                t.rows += 1;
            } else {
                let msg = format!(
                    "{} want {want}, {} differ: {}{}",
                    what,
                    bad.len(),
                    bad[..bad.len().min(4)].join(", "),
                    if bad.len() > 4 { ", ..." } else { "" }
                );
                diag!("{msg}  MISMATCH");
                t.rows += 1;
                t.mismatches.push(msg);
            }
        }
    }
    // The syscall takes an unsigned int: high bits of the word vanish
    // before any driver sees it.
    let high = (0xdead_beef_u64 << 32) | HMM_DMIRROR_READ as u64;
    let got = env.issue(high as libc::c_ulong, &good);
    t.check(
        &format!("READ with high bits set ({high:#x})"),
        got,
        Want::Pages(1),
    );
    t.finish()
}

/// A mapping of the device, however it came out.
fn try_mmap(fd: RawFd, len: usize, prot: i32, flags: i32, off: i64) -> io::Result<usize> {
    // SAFETY: a new mapping chosen by the kernel (no MAP_FIXED).
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as usize)
}

fn dev_noexec() -> bool {
    let path = std::ffi::CString::new(Dmirror::path(0)).unwrap();
    // SAFETY: statvfs fills a zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    r == 0 && st.f_flag & libc::ST_NOEXEC != 0
}

/// mmap() of the device: C's handler inserts a zeroed page per page and
/// looks at nothing else, so what fails is refused by the core mm, with
/// the same errno whichever module is loaded.
fn mmap() -> TestResult {
    let ps = page_size();
    let d = Dmirror::open(0)?;
    let fd = d.raw_fd();
    let path = std::ffi::CString::new(Dmirror::path(0)).unwrap();
    // SAFETY: valid path.
    let rofd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    ensure!(rofd >= 0, "open O_RDONLY: {}", io::Error::last_os_error());
    // SAFETY: rofd was just opened.
    let rofd = unsafe { OwnedFd::from_raw_fd(rofd) };
    let (r, rw) = (libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE);
    let (shared, private) = (libc::MAP_SHARED, libc::MAP_PRIVATE);
    let exec_want = if dev_noexec() {
        Want::Err(libc::EPERM)
    } else {
        Want::Ok
    };
    diag!(
        "/dev is {}mounted noexec: PROT_EXEC wants {exec_want}",
        if dev_noexec() { "" } else { "not " }
    );
    struct M {
        name: &'static str,
        fd: RawFd,
        len: usize,
        prot: i32,
        flags: i32,
        off: i64,
        want: Want,
    }
    let m = |name, fd, len, prot, flags, off, want| M {
        name,
        fd,
        len,
        prot,
        flags,
        off,
        want,
    };
    let cases = [
        m("shared_rw", fd, 4 * ps, rw, shared, 0, Want::Ok),
        m("private_rw", fd, 4 * ps, rw, private, 0, Want::Ok),
        m("shared_ro", fd, ps, r, shared, 0, Want::Ok),
        m("prot_none", fd, ps, libc::PROT_NONE, shared, 0, Want::Ok),
        m(
            "prot_exec",
            fd,
            ps,
            r | libc::PROT_EXEC,
            shared,
            0,
            exec_want,
        ),
        m("len_1_byte", fd, 1, rw, shared, 0, Want::Ok),
        m("len_0", fd, 0, rw, shared, 0, Want::Err(libc::EINVAL)),
        // Larger than the address space: refused before the driver.
        m(
            "len_2^47",
            fd,
            1 << 47,
            rw,
            shared,
            0,
            Want::Err(libc::ENOMEM),
        ),
        m(
            "len_max",
            fd,
            usize::MAX,
            rw,
            shared,
            0,
            Want::Err(libc::ENOMEM),
        ),
        m(
            "len_max_page",
            fd,
            usize::MAX & !(ps - 1),
            rw,
            shared,
            0,
            Want::Err(libc::ENOMEM),
        ),
        m("pgoff_1", fd, ps, rw, shared, ps as i64, Want::Ok),
        m("pgoff_2^40", fd, ps, rw, shared, 1 << 40, Want::Ok),
        m(
            "offset_unaligned",
            fd,
            ps,
            rw,
            shared,
            1,
            Want::Err(libc::EINVAL),
        ),
        m(
            "offset_-4096",
            fd,
            ps,
            rw,
            shared,
            -(ps as i64),
            Want::Err(libc::EOVERFLOW),
        ),
        m("flags_0", fd, ps, rw, 0, 0, Want::Err(libc::EINVAL)),
        m(
            "shared_validate",
            fd,
            ps,
            rw,
            libc::MAP_SHARED_VALIDATE,
            0,
            Want::Ok,
        ),
        m(
            "shared_validate_sync",
            fd,
            ps,
            rw,
            libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
            0,
            Want::Err(libc::EOPNOTSUPP),
        ),
        m(
            "populate",
            fd,
            4 * ps,
            rw,
            shared | libc::MAP_POPULATE,
            0,
            Want::Ok,
        ),
        m(
            "rdonly_fd_shared_write",
            rofd.as_raw_fd(),
            ps,
            rw,
            shared,
            0,
            Want::Err(libc::EACCES),
        ),
        m(
            "rdonly_fd_shared_read",
            rofd.as_raw_fd(),
            ps,
            r,
            shared,
            0,
            Want::Ok,
        ),
        m(
            "rdonly_fd_private_write",
            rofd.as_raw_fd(),
            ps,
            rw,
            private,
            0,
            Want::Ok,
        ),
    ];
    let mut t = Table::default();
    for c in &cases {
        let r = try_mmap(c.fd, c.len, c.prot, c.flags, c.off);
        let got = done_or_errno(&r);
        t.check(&format!("mmap {}", c.name), got, c.want);
        let Ok(addr) = r else { continue };
        let len = mem::align_up(c.len, ps);
        if c.prot & libc::PROT_WRITE != 0 {
            // Every page reads zero and takes a write (COW for private).
            for p in (addr..addr + len).step_by(ps) {
                // SAFETY: p is in the new readable, writable mapping.
                let v = unsafe { std::ptr::read_volatile(p as *const u8) };
                ensure_eq!(v, 0, "{}: first byte of page {:#x}", c.name, p);
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(p as *mut u8, 0x5a) };
                // SAFETY: as above.
                ensure_eq!(unsafe { std::ptr::read_volatile(p as *const u8) }, 0x5a);
            }
        }
        mem::unmap(addr, len)?;
    }

    // The device's view of a device mapping, and of one grown by mremap():
    // the new page has no page and no fault handler.
    let addr = try_mmap(fd, ps, rw, shared, 0)?;
    // SAFETY: addr is a fresh read/write mapping of one page.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 0x77) };
    let out = Mapping::rw(2 * ps)?;
    let got = got_of(&d.read(addr, out.addr(), 1), |c| c.cpages);
    t.check("READ of a device mapping", got, Want::Pages(1));
    if got == Got::Ok(1) {
        ensure_eq!(out.bytes()[0], 0x77, "READ of a device mapping: first byte");
    }
    // SAFETY: grows our own mapping, moving it if needed.
    let grown = unsafe { libc::mremap(addr as *mut _, ps, 2 * ps, libc::MREMAP_MAYMOVE) };
    if grown == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        mem::unmap(addr, ps)?;
        return Err(format!("mremap of a device mapping: {e}").into());
    }
    let grown = grown as usize;
    let got = got_of(&d.read(grown, out.addr(), 2), |c| c.cpages);
    t.check(
        "READ of a device mapping grown by mremap",
        got,
        Want::Err(libc::EFAULT),
    );
    let got = got_of(&d.snapshot(grown, out.addr(), 2), |c| c.cpages);
    t.check(
        "SNAPSHOT of a device mapping grown by mremap",
        got,
        Want::Pages(2),
    );
    mem::unmap(grown, 2 * ps)?;
    t.finish()
}

/// Send `fd` over a unix socket (SCM_RIGHTS).
fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: zeroed msghdr, then filled with pointers that live across
    // the call; the control buffer is 8-byte aligned and big enough.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, 0) != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receive a descriptor sent by `send_fd`.
fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in send_fd; the kernel fills the control buffer.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        if libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) != 1 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::other("no descriptor in the message"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// A dmirror file opened by a forked child, which mirrors the child's
/// address space (a copy of ours) and passes the file to us over a unix
/// socket. The child waits until we close our end of the socket
/// (`end_child` or drop), or exits at once if `stay` is false.
struct Foreign {
    pid: libc::pid_t,
    file: OwnedFd,
    /// Our end of the socket; closing it lets the child go.
    sock: Option<OwnedFd>,
}

impl Foreign {
    fn new(stay: bool) -> Result<Self, Failure> {
        let mut sv = [0; 2];
        // SAFETY: sv has room for two descriptors.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        ensure!(r == 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both were just created and are ours.
        let (mine, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        // SAFETY: the child only opens, sends, waits and _exit()s.
        let pid = unsafe { libc::fork() };
        ensure!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            drop(mine);
            let code = match Dmirror::open(0).and_then(|d| send_fd(theirs.as_raw_fd(), d.raw_fd()))
            {
                Ok(()) => {
                    if stay {
                        let mut b = [0u8];
                        // SAFETY: blocks until the parent closes its end.
                        unsafe { libc::read(theirs.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
                    }
                    0
                }
                Err(_) => 1,
            };
            // SAFETY: leaves the child.
            unsafe { libc::_exit(code) };
        }
        drop(theirs);
        let file = match recv_fd(mine.as_raw_fd()) {
            Ok(f) => f,
            Err(e) => {
                reap(pid);
                return Err(format!("receiving the child's dmirror file: {e}").into());
            }
        };
        Ok(Foreign {
            pid,
            file,
            sock: Some(mine),
        })
    }

    /// Let the child exit and reap it: its address space is gone after.
    fn end_child(&mut self) -> TestResult {
        self.sock = None;
        let st = reap(self.pid);
        self.pid = 0;
        ensure!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "the child {}",
            crate::harness::describe(st)
        );
        Ok(())
    }

    fn cmd(&self, op: Op, addr: usize, ptr: usize, npages: u64) -> Got {
        let mut cmd = HmmDmirrorCmd {
            addr: addr as u64,
            ptr: ptr as u64,
            npages,
            ..Default::default()
        };
        let r = ioctl_raw(
            self.file.as_raw_fd(),
            op.request() as libc::c_ulong,
            &mut cmd as *mut HmmDmirrorCmd as usize,
        );
        got_of(&r, |_| cmd.cpages)
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        self.sock = None;
        if self.pid > 0 {
            reap(self.pid);
        }
    }
}

/// A dmirror file opened by another (live) process, used here: commands
/// act on the opener's address space, and copy to and from ours.
fn foreign_mm() -> TestResult {
    let ps = page_size();
    let mut buf = Guarded::rw(NB)?;
    buf.bytes_mut().fill(0x11);
    let f = Foreign::new(true)?;
    // Mapped after the fork: only in our address space.
    let ours = Guarded::rw(1)?;
    let mut src = Guarded::rw(1)?;
    src.bytes_mut().fill(0x22);
    let out = Guarded::rw(NB)?;
    let mut t = Table::default();
    t.check(
        "WRITE of buf through the child's mirror",
        f.cmd(Op::Write, buf.addr(), src.addr(), 1),
        Want::Pages(1),
    );
    t.check(
        "READ of buf through the child's mirror",
        f.cmd(Op::Read, buf.addr(), out.addr(), 1),
        Want::Pages(1),
    );
    crate::check::check_each("the child's buf, read back", &out.bytes()[..ps], |_| 0x22)?;
    crate::check::check_each(
        "our buf (the child's copy was written)",
        buf.bytes(),
        |_| 0x11,
    )?;
    t.check(
        "READ_UNLOCKABLE of buf through the child's mirror",
        f.cmd(Op::ReadUnlockable, buf.addr(), out.addr(), NB as u64),
        Want::Pages(NB as u64),
    );
    t.check(
        "SNAPSHOT of buf through the child's mirror",
        f.cmd(Op::Snapshot, buf.addr(), out.addr(), NB as u64),
        Want::Pages(NB as u64),
    );
    for op in [Op::Read, Op::Write, Op::ReadUnlockable] {
        t.check(
            &format!("{} of a page mapped only here", op.name()),
            f.cmd(op, ours.addr(), src.addr(), 1),
            Want::Err(libc::EFAULT),
        );
    }
    t.finish()
}

/// A dmirror file whose opener has exited: the mirrored address space is
/// gone (C: mmget_not_zero() fails), the file is still open here.
fn dead_mm() -> TestResult {
    let mut f = Foreign::new(false)?;
    f.end_child()?;
    let buf = Guarded::rw(NB)?;
    let out = Guarded::rw(NB)?;
    let mut t = Table::default();
    for &op in OPS {
        use Op::*;
        let want = match op {
            // dmirror_fault(): mmget_not_zero() fails, -EFAULT.
            Read | ReadUnlockable | Write => Want::Err(libc::EFAULT),
            // mmget_not_zero() fails, -EINVAL.
            Snapshot | MigrateToDev | MigrateToSys | Exclusive => Want::Err(libc::EINVAL),
            CheckExclusive | Release | Flags => Want::Pages(0),
        };
        t.check(
            &format!("{} after the opener exited", op.name()),
            f.cmd(op, buf.addr(), out.addr(), 1),
            want,
        );
    }
    // mmap() maps into the caller, whoever opened the file.
    let r = try_mmap(
        f.file.as_raw_fd(),
        page_size(),
        libc::PROT_READ,
        libc::MAP_SHARED,
        0,
    );
    t.check("mmap after the opener exited", done_or_errno(&r), Want::Ok);
    if let Ok(a) = r {
        mem::unmap(a, page_size())?;
    }
    t.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_match_gots() {
        assert!(Want::Ok.matches(Got::Ok(7)));
        assert!(Want::Pages(1).matches(Got::Ok(1)));
        assert!(!Want::Pages(1).matches(Got::Ok(2)));
        assert!(Want::Err(libc::EFAULT).matches(Got::Err(libc::EFAULT)));
        assert!(!Want::Err(libc::EFAULT).matches(Got::Err(libc::EINVAL)));
        assert!(!Want::Err(libc::EFAULT).matches(Got::Ok(0)));
        assert!(!Want::Skip.matches(Got::Ok(0)));
        assert!(Want::Ok.matches(Got::Done));
        assert!(!Want::Pages(0).matches(Got::Done));
        assert_eq!(Got::Done.to_string(), "success");
        assert_eq!(Got::Err(libc::EOPNOTSUPP).to_string(), "EOPNOTSUPP");
        assert_eq!(Got::Err(4095).to_string(), "errno 4095");
        assert_eq!(Want::Pages(3).to_string(), "success cpages=3");
    }

    #[test]
    fn every_case_has_a_want_for_every_op() {
        let mut names: Vec<_> = CASES.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CASES.len());
        for &c in CASES {
            for &op in OPS {
                let w = c.want(op);
                if w == Want::Skip {
                    assert_ne!(skip_reason(c, op), "no defined result", "{c:?} {op:?}");
                }
            }
        }
    }

    /// The wrap arithmetic the cases rely on, as C computes it.
    #[test]
    fn c_range_check() {
        let c_rejects = |addr: u64, npages: u64| addr >= addr.wrapping_add(npages << 12);
        let buf = 0x7f00_0000_0000u64;
        assert!(c_rejects(buf, 0));
        assert!(c_rejects(!0xfff, 1));
        assert!(c_rejects(buf, u64::MAX / 4096));
        assert!(c_rejects(buf, 1 << 52));
        assert!(!c_rejects(buf, (1 << 52) + 1));
        assert_eq!(((1u64 << 52) + 1) << 12, 4096);
        assert_eq!(((1u64 << 63) + 1) << 12, 4096);
        assert!(!c_rejects(buf, HUGE));
        assert!(!c_rejects(KERNEL_ADDR, 1));
        assert!(!c_rejects(VSYSCALL, 1));
    }

    #[test]
    fn fd_passing() {
        let mut sv = [0; 2];
        // SAFETY: sv has room for two.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) },
            0
        );
        let file = mem::temp_file(4096).unwrap();
        mem::pwrite_all(&file, b"hi", 0).unwrap();
        send_fd(sv[0], file.as_raw_fd()).unwrap();
        let got = recv_fd(sv[1]).unwrap();
        assert_ne!(got.as_raw_fd(), file.as_raw_fd());
        let mut b = [0u8; 2];
        mem::pread_all(&got, &mut b, 0).unwrap();
        assert_eq!(&b, b"hi");
        // SAFETY: closes the socket pair.
        unsafe {
            libc::close(sv[0]);
            libc::close(sv[1]);
        }
    }
}
