// SPDX-License-Identifier: GPL-2.0

//! Our userfaultfd numbers against the system's <linux/userfaultfd.h>:
//! compile a probe with the C compiler and compare.

use hmm_dmirror_selftests::uffd::*;
use std::mem::size_of;
use std::path::Path;
use std::process::Command;

const NAMES: &[(&str, u64)] = &[
    ("UFFD_API", UFFD_API),
    ("UFFDIO_API", UFFDIO_API as u64),
    ("UFFDIO_REGISTER", UFFDIO_REGISTER as u64),
    ("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER as u64),
    ("UFFDIO_WAKE", UFFDIO_WAKE as u64),
    ("UFFDIO_COPY", UFFDIO_COPY as u64),
    ("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE as u64),
    ("UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT as u64),
    ("UFFD_PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE),
    ("UFFDIO_REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING),
    ("sizeof(struct uffd_msg)", size_of::<UffdMsg>() as u64),
    ("offsetof(struct uffd_msg, arg.pagefault.address)", 16),
    ("sizeof(struct uffdio_copy)", size_of::<UffdioCopy>() as u64),
    (
        "sizeof(struct uffdio_zeropage)",
        size_of::<UffdioZeropage>() as u64,
    ),
    (
        "sizeof(struct uffdio_register)",
        size_of::<UffdioRegister>() as u64,
    ),
    ("sizeof(struct uffdio_api)", size_of::<UffdioApi>() as u64),
];

#[test]
fn rust_matches_c_header() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("uffd_probe.c");
    let bin = dir.join("uffd_probe");
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\nint main(void) {\n");
    for (expr, _) in NAMES {
        c += &format!("\tprintf(\"%llu\\n\", (unsigned long long)({expr}));\n");
    }
    c += "\treturn 0;\n}\n";
    std::fs::write(&src, c).unwrap();
    let status = Command::new("cc")
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
