// SPDX-License-Identifier: GPL-2.0

//! The plain-text report: the comparison table, the READ_UNLOCKABLE
//! details and the notes, as printed and saved in `table.txt`.

use crate::report::{unlockable_series, Measured, Results, Row, Side};
use crate::workload::{Op, Resolve};
use std::fmt::Write;

/// "812 ns", "12.3 us", "4.56 ms", "1.23 s": three significant digits.
pub fn fmt_ns(ns: f64) -> String {
    let (v, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "us")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    format!("{} {unit}", sig3(v))
}

/// "1.74-2.35 us", or "812 ns-1.20 us" across units.
pub fn fmt_ns_range(lo: f64, hi: f64) -> String {
    let (a, b) = (fmt_ns(lo), fmt_ns(hi));
    match (a.split_once(' '), b.split_once(' ')) {
        (Some((x, ua)), Some((y, ub))) if ua == ub => format!("{x}-{y} {ub}"),
        _ => format!("{a}-{b}"),
    }
}

/// "812", "12.3k", "4.56M".
pub fn fmt_rate(per_s: f64) -> String {
    if per_s < 1e3 {
        sig3(per_s)
    } else if per_s < 1e6 {
        format!("{}k", sig3(per_s / 1e3))
    } else if per_s < 1e9 {
        format!("{}M", sig3(per_s / 1e6))
    } else {
        format!("{}G", sig3(per_s / 1e9))
    }
}

/// Three significant digits, no exponent, for 0 <= v < 1000.
fn sig3(v: f64) -> String {
    if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Left-aligned first column, the others right-aligned; columns two
/// spaces apart, a dashed rule under the header.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate().take(cols) {
            if i == 0 {
                let _ = write!(s, "{cell:<w$}", w = width[0]);
            } else {
                let _ = write!(s, "  {cell:>w$}", w = width[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    let total: usize = width.iter().sum::<usize>() + 2 * (cols - 1);
    out += &"-".repeat(total);
    out += "\n";
    for r in rows {
        out += &line(&mut r.iter().map(String::as_str));
    }
    out
}

/// The three cells of one module: pages/s, ns/page, min-max.
fn side_cells(s: &Side) -> [String; 3] {
    match s {
        Side::Ok(m) => [
            fmt_rate(m.pages_per_s),
            fmt_ns(m.ns_per_page.median),
            fmt_ns_range(m.ns_per_page.min, m.ns_per_page.max),
        ],
        Side::Skipped { .. } => ["skipped".into(), "-".into(), "-".into()],
        Side::Failed { .. } => ["FAILED".into(), "-".into(), "-".into()],
        Side::Missing => ["-".into(), "-".into(), "-".into()],
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

/// The main table: every workload, C against Rust.
pub fn main_table(rows: &[Row]) -> String {
    let header = [
        "workload",
        "pages",
        "reps",
        "C pages/s",
        "C ns/page",
        "C min-max /page",
        "Rust pages/s",
        "Rust ns/page",
        "Rust min-max /page",
        "Rust/C",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let reps = |s: &Side| s.measured().map_or("-".into(), |m| m.time_ns.n.to_string());
            let mut v = vec![
                r.name.clone(),
                r.pages.to_string(),
                format!("{}/{}", reps(&r.c), reps(&r.rust)),
            ];
            v.extend(side_cells(&r.c));
            v.extend(side_cells(&r.rust));
            v.push(ratio_cell(r.rust_over_c));
            v
        })
        .collect();
    render(&header, &body)
}

fn counters(m: Option<&Measured>) -> [String; 5] {
    let Some(m) = m else {
        return ["-".into(), "-".into(), "-".into(), "-".into(), "-".into()];
    };
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    [
        fmt_ns(m.time_ns.median),
        m.cpages.to_string(),
        m.faults.to_string(),
        opt(m.uffd_events),
        opt(m.uffd_copies),
    ]
}

fn resolve_name(r: Resolve) -> &'static str {
    match r {
        Resolve::Page => "page/fault",
        Resolve::Block => "block/fault",
    }
}

/// READ_UNLOCKABLE: whole-ioctl time, cpages/faults and what the handler
/// saw, per N and handler.
pub fn unlockable_table(rows: &[Row]) -> String {
    let header = [
        "handler",
        "N",
        "C time",
        "cpages",
        "faults",
        "events",
        "copies",
        "Rust time",
        "cpages",
        "faults",
        "events",
        "copies",
        "Rust/C",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .filter(|r| r.op == Op::ReadUnlockable)
        .filter_map(|r| {
            let crate::workload::Memory::Userfault(resolve) = r.memory else {
                return None;
            };
            let mut v = vec![resolve_name(resolve).to_string(), r.pages.to_string()];
            v.extend(counters(r.c.measured()));
            v.extend(counters(r.rust.measured()));
            v.push(ratio_cell(r.rust_over_c));
            Some(v)
        })
        .collect();
    if body.is_empty() {
        return String::new();
    }
    render(&header, &body)
}

/// The growth exponents, one line per handler.
fn growth_lines(res: &Results) -> String {
    let mut out = String::new();
    for resolve in [Resolve::Page, Resolve::Block] {
        let mut parts = Vec::new();
        for module in ["c", "rust"] {
            if let Some(g) = res
                .unlockable_growth
                .iter()
                .find(|g| g.module == module && g.resolve == resolve)
            {
                let s: Vec<String> = g
                    .slopes
                    .iter()
                    .map(|(a, b, k)| format!("{a}->{b} {k:.2}"))
                    .collect();
                let label = if module == "c" { "C" } else { "Rust" };
                parts.push(format!("{label}: {}", s.join(", ")));
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "  {:<15} {}", resolve_name(resolve), parts.join("   "));
        }
    }
    out
}

/// Time per page across N for one module and handler: flat means linear.
fn per_page_line(res: &Results, module: &str, resolve: Resolve) -> Option<String> {
    let s = unlockable_series(&res.workloads, module, resolve);
    if s.is_empty() {
        return None;
    }
    let cells: Vec<String> = s
        .iter()
        .map(|(n, m)| format!("N={n} {}", fmt_ns(m.ns_per_page.median)))
        .collect();
    Some(cells.join(", "))
}

/// The whole report.
pub fn report(res: &Results) -> String {
    let mut out = String::new();
    let vm = &res.vm;
    let _ = writeln!(
        out,
        "dmirror benchmark: C test_hmm.ko vs Rust rust_hmm_dmirror.ko, one VM boot"
    );
    let _ = writeln!(
        out,
        "VM: {} ({}); guest kernel {}, {} CPUs{}, THP {}",
        vm.accel.to_uppercase(),
        if vm.vm_run_line.is_empty() {
            "no vm-run line"
        } else {
            &vm.vm_run_line
        },
        vm.guest.kernel,
        vm.guest.cpus,
        match vm.guest.bench_cpus {
            n if n > 0 && n < vm.guest.cpus => format!(" (the benchmark pinned to {n})"),
            _ => String::new(),
        },
        vm.guest.thp
    );
    if !vm.host_load_before.is_empty() {
        let _ = writeln!(
            out,
            "Host load average (1/5/15 min, CPUs) before: {}, after: {}. The VM adds about \
             2; more means other work ran, which slows TCG and the userfaultfd round trips most.",
            vm.host_load_before, vm.host_load_after
        );
    }
    if vm.rounds > 1 {
        let _ = writeln!(
            out,
            "Each module ran in {} rounds, C, Rust, Rust, C, ...; their samples are merged.",
            vm.rounds
        );
    }
    if vm.accel == "tcg" {
        let _ = writeln!(
            out,
            "TCG and a debug kernel: absolute numbers are slow, compare ratios only."
        );
    }
    let _ = writeln!(
        out,
        "Medians over the repetitions (reps = C/Rust, after an untimed warm-up); \
         spread = min-max; Rust/C = Rust pages/s / C pages/s (>= 1: Rust as fast or faster)."
    );
    out += "\n";
    out += &main_table(&res.workloads);

    let unl = unlockable_table(&res.workloads);
    if !unl.is_empty() {
        out += "\nREAD_UNLOCKABLE over userfaultfd-MISSING memory. Handler: page/fault \
                copies the faulting page, block/fault the 2 MiB-aligned block around it \
                (the whole region if smaller).\nMedians; faults = the command's device \
                faults, events = uffd events the handler read, copies = its UFFDIO_COPYs.\n";
        out += &unl;
        out += "\nTime per page by N (flat = linear in N):\n";
        for resolve in [Resolve::Page, Resolve::Block] {
            for (module, label) in [("c", "C"), ("rust", "Rust")] {
                if let Some(l) = per_page_line(res, module, resolve) {
                    let _ = writeln!(out, "  {:<15} {:<5} {l}", resolve_name(resolve), label);
                }
            }
        }
        out += "Growth exponent d log(time) / d log(N) (1 = linear):\n";
        out += &growth_lines(res);
    }

    let notes: Vec<String> = res
        .workloads
        .iter()
        .flat_map(|r| {
            [("C", &r.c), ("Rust", &r.rust)]
                .into_iter()
                .filter_map(move |(label, s)| match s {
                    Side::Skipped { note } => Some(format!("{label} {}: skipped, {note}", r.name)),
                    Side::Failed { error } => Some(format!("{label} {}: FAILED: {error}", r.name)),
                    Side::Missing => Some(format!("{label} {}: not run", r.name)),
                    Side::Ok(_) => None,
                })
        })
        .collect();
    if !notes.is_empty() {
        out += "\nNotes:\n";
        for n in notes {
            let _ = writeln!(out, "  {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{compare_on, tests::run};

    #[test]
    fn numbers() {
        assert_eq!(fmt_ns(812.0), "812 ns");
        assert_eq!(fmt_ns(12_345.0), "12.3 us");
        assert_eq!(fmt_ns(4_561_000.0), "4.56 ms");
        assert_eq!(fmt_ns(1.5e9), "1.50 s");
        assert_eq!(fmt_ns_range(1740.0, 2350.0), "1.74-2.35 us");
        assert_eq!(fmt_ns_range(812.0, 1200.0), "812 ns-1.20 us");
        assert_eq!(fmt_rate(999.0), "999");
        assert_eq!(fmt_rate(12_345.0), "12.3k");
        assert_eq!(fmt_rate(4_560_000.0), "4.56M");
        assert_eq!(fmt_rate(1.0), "1.00");
    }

    #[test]
    fn rendering_aligns_columns() {
        let t = render(
            &["name", "n"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "1000".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "name       n");
        assert_eq!(lines[1], "------------");
        assert_eq!(lines[2], "a          1");
        assert_eq!(lines[3], "longer  1000");
    }

    #[test]
    fn report_tells_the_pinning() {
        let mut res = compare_on(Some(&run("c", 1)), Some(&run("rust", 2)), "", ("", ""));
        res.vm.guest.cpus = 2;
        res.vm.guest.bench_cpus = 1;
        assert!(report(&res).contains(", 2 CPUs (the benchmark pinned to 1), THP"));
        res.vm.guest.bench_cpus = 2;
        assert!(report(&res).contains(", 2 CPUs, THP"));
    }

    #[test]
    fn report_has_every_part() {
        let res = compare_on(
            Some(&run("c", 1)),
            Some(&run("rust", 2)),
            "vm-run: tcg, 2 CPUs, 2G, module none",
            ("0.10 0.20 0.30 2\n", "2.00 1.00 0.50 2\n"),
        );
        let t = report(&res);
        assert!(
            t.contains("before: 0.10 0.20 0.30 2, after: 2.00 1.00 0.50 2."),
            "{t}"
        );
        assert!(
            t.contains("VM: TCG (vm-run: tcg, 2 CPUs, 2G, module none)"),
            "{t}"
        );
        let read = t
            .lines()
            .find(|l| l.starts_with("READ mirrored 2 MiB"))
            .unwrap();
        assert!(read.ends_with("0.50"), "{read}");
        // 100 ns over 512 pages is 0.195 ns/page; spread 90-110 ns.
        assert!(read.contains("0.20 ns"), "{read}");
        assert!(read.contains("0.18-0.21 ns"), "{read}");
        let unl = t.lines().find(|l| l.starts_with("page/fault")).unwrap();
        assert_eq!(unl.split_whitespace().nth(1), Some("16"), "{unl}");
        assert!(t.contains("16->256 1.00"), "{t}");
        assert!(
            t.contains("Rust MIGRATE_TO_DEV touched 4K 2 MiB: skipped"),
            "{t}"
        );
        let mig = t.lines().find(|l| l.starts_with("MIGRATE_TO_DEV")).unwrap();
        assert!(
            mig.contains("skipped") && mig.trim_end().ends_with('-'),
            "{mig}"
        );
    }
}
