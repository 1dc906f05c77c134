// SPDX-License-Identifier: GPL-2.0

//! The Rust ABI against the C header: compile a probe against
//! `hmm_dmirror_uapi.h` with the system C compiler and compare every number.

use hmm_dmirror_uapi::*;
use std::path::Path;
use std::process::Command;

const NAMES: &[(&str, u64)] = &[
    (
        "sizeof(struct hmm_dmirror_cmd)",
        HMM_DMIRROR_CMD_SIZE as u64,
    ),
    ("HMM_DMIRROR_READ", HMM_DMIRROR_READ as u64),
    ("HMM_DMIRROR_WRITE", HMM_DMIRROR_WRITE as u64),
    (
        "HMM_DMIRROR_MIGRATE_TO_DEV",
        HMM_DMIRROR_MIGRATE_TO_DEV as u64,
    ),
    (
        "HMM_DMIRROR_MIGRATE_TO_SYS",
        HMM_DMIRROR_MIGRATE_TO_SYS as u64,
    ),
    ("HMM_DMIRROR_SNAPSHOT", HMM_DMIRROR_SNAPSHOT as u64),
    ("HMM_DMIRROR_EXCLUSIVE", HMM_DMIRROR_EXCLUSIVE as u64),
    (
        "HMM_DMIRROR_CHECK_EXCLUSIVE",
        HMM_DMIRROR_CHECK_EXCLUSIVE as u64,
    ),
    ("HMM_DMIRROR_RELEASE", HMM_DMIRROR_RELEASE as u64),
    ("HMM_DMIRROR_FLAGS", HMM_DMIRROR_FLAGS as u64),
    (
        "HMM_DMIRROR_READ_UNLOCKED",
        HMM_DMIRROR_READ_UNLOCKED as u64,
    ),
    (
        "HMM_DMIRROR_READ_UNLOCKABLE",
        HMM_DMIRROR_READ_UNLOCKABLE as u64,
    ),
    ("HMM_DMIRROR_FLAG_FAIL_ALLOC", HMM_DMIRROR_FLAG_FAIL_ALLOC),
    (
        "HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH",
        HMM_DMIRROR_FLAG_FAIL_ALLOC_NTH,
    ),
    (
        "HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT",
        HMM_DMIRROR_FAIL_ALLOC_NTH_SHIFT as u64,
    ),
    (
        "HMM_DMIRROR_FAIL_ALLOC_NTH(0x12345678abcdULL)",
        hmm_dmirror_fail_alloc_nth_of(0x1234_5678_abcd),
    ),
    ("HMM_DMIRROR_PROT_ERROR", HMM_DMIRROR_PROT_ERROR as u64),
    ("HMM_DMIRROR_PROT_NONE", HMM_DMIRROR_PROT_NONE as u64),
    ("HMM_DMIRROR_PROT_READ", HMM_DMIRROR_PROT_READ as u64),
    ("HMM_DMIRROR_PROT_WRITE", HMM_DMIRROR_PROT_WRITE as u64),
    ("HMM_DMIRROR_PROT_PMD", HMM_DMIRROR_PROT_PMD as u64),
    ("HMM_DMIRROR_PROT_PUD", HMM_DMIRROR_PROT_PUD as u64),
    ("HMM_DMIRROR_PROT_ZERO", HMM_DMIRROR_PROT_ZERO as u64),
    (
        "HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL",
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL as u64,
    ),
    (
        "HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE",
        HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE as u64,
    ),
    (
        "HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL",
        HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL as u64,
    ),
    (
        "HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE",
        HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE as u64,
    ),
    (
        "HMM_DMIRROR_MEMORY_DEVICE_PRIVATE",
        HMM_DMIRROR_MEMORY_DEVICE_PRIVATE as u64,
    ),
    (
        "HMM_DMIRROR_MEMORY_DEVICE_COHERENT",
        HMM_DMIRROR_MEMORY_DEVICE_COHERENT as u64,
    ),
    ("offsetof(struct hmm_dmirror_cmd, faults)", 32),
];

#[test]
fn rust_matches_c_header() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("uapi_probe.c");
    let bin = dir.join("uapi_probe");
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"hmm_dmirror_uapi.h\"\nint main(void) {\n");
    for (expr, _) in NAMES {
        c += &format!("\tprintf(\"%llu\\n\", (unsigned long long)({expr}));\n");
    }
    c += "\treturn 0;\n}\n";
    std::fs::write(&src, c).unwrap();

    let status = Command::new("cc")
        .arg("-I")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("cannot run cc");
    assert!(status.success(), "the C probe did not compile");
    let out = Command::new(&bin).output().unwrap();
    let values: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(values.len(), NAMES.len());
    for ((name, rust), c) in NAMES.iter().zip(values) {
        assert_eq!(*rust, c, "{name}: Rust {rust:#x}, C {c:#x}");
    }
}

#[test]
fn upstream_number_nine_is_the_unlockable_read() {
    assert_eq!(ioc_nr(HMM_DMIRROR_READ_UNLOCKABLE), 9);
    assert_eq!(HMM_DMIRROR_READ_UNLOCKABLE, HMM_DMIRROR_READ_UNLOCKED);
}
