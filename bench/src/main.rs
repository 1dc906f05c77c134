// SPDX-License-Identifier: GPL-2.0

//! Entry point: `run` in the guest, `report` on the host.

use hmm_dmirror_bench::cli::{self, Command};
use hmm_dmirror_bench::model::ModuleRun;
use hmm_dmirror_bench::report::{compare_on, Side};
use hmm_dmirror_bench::{plot, run, table, workload};
use std::path::Path;
use std::process::exit;

fn main() {
    let cmd = cli::parse(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("hmm-dmirror-bench: {e}\n\n{}", cli::USAGE);
        exit(2);
    });
    let r = match cmd {
        Command::Help => {
            print!("{}", cli::USAGE);
            Ok(true)
        }
        Command::List { pending } => {
            for w in workloads(pending) {
                println!("{} ({} reps)", w.name(), w.reps);
            }
            Ok(true)
        }
        Command::Run {
            module,
            out,
            reps,
            rounds,
            only,
            pending,
        } => run_cmd(
            &module,
            Path::new(&out),
            reps,
            rounds,
            only.as_deref(),
            pending,
        ),
        Command::Report { dir } => report_cmd(Path::new(&dir)),
    };
    match r {
        Ok(true) => {}
        Ok(false) => exit(1),
        Err(e) => {
            eprintln!("hmm-dmirror-bench: {e}");
            exit(1);
        }
    }
}

fn workloads(pending: bool) -> Vec<workload::Workload> {
    let mut list = workload::all();
    if pending {
        list.extend(workload::pending());
    }
    list
}

/// Guest side. Failed workloads are recorded, not fatal: `report`
/// decides the exit status once both modules have run.
fn run_cmd(
    module: &str,
    out: &Path,
    reps: Option<usize>,
    rounds: usize,
    only: Option<&str>,
    pending: bool,
) -> Result<bool, String> {
    let list: Vec<_> = workloads(pending)
        .into_iter()
        .filter(|w| only.is_none_or(|t| workload::matches(&w.name(), t)))
        .map(|mut w| {
            w.reps = reps.unwrap_or(w.reps);
            w.share(rounds)
        })
        .collect();
    if list.is_empty() {
        return Err("no workload selected".into());
    }
    let result = run::run_all(module, &list);
    let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
    std::fs::write(out, text).map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(true)
}

/// A module's samples: `raw-<module>.json`, or its rounds
/// `raw-<module>-<n>.json` merged.
fn read_module(dir: &Path, module: &str) -> Option<(ModuleRun, usize)> {
    let single = dir.join(format!("raw-{module}.json"));
    if single.exists() {
        return read_run(&single).map(|run| (run, 1));
    }
    let prefix = format!("raw-{module}-");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .collect();
    paths.sort();
    let runs: Vec<_> = paths.iter().filter_map(|p| read_run(p)).collect();
    let rounds = runs.len();
    ModuleRun::merge(runs).map(|run| (run, rounds))
}

fn read_run(path: &Path) -> Option<ModuleRun> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("hmm-dmirror-bench: {}: {e}", path.display());
            None
        }
    }
}

/// Host side: compare, print, write results.json, table.txt, results.png.
fn report_cmd(dir: &Path) -> Result<bool, String> {
    let (c, c_rounds) = read_module(dir, "c").unzip();
    let (rust, rust_rounds) = read_module(dir, "rust").unzip();
    if c.is_none() && rust.is_none() {
        return Err(format!(
            "no raw-c.json or raw-rust.json in {}",
            dir.display()
        ));
    }
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let mut res = compare_on(
        c.as_ref(),
        rust.as_ref(),
        &read("vm-run.log"),
        (&read("host-load.before"), &read("host-load.after")),
    );
    res.vm.rounds = c_rounds.max(rust_rounds).unwrap_or(1);

    let text = table::report(&res);
    print!("{text}");
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).map_err(|e| format!("writing {}: {e}", p.display()))
    };
    write("table.txt", text.as_bytes())?;
    let json = serde_json::to_string_pretty(&res).map_err(|e| e.to_string())?;
    write("results.json", json.as_bytes())?;
    let png = dir.join("results.png");
    plot::draw(&res, &png).map_err(|e| format!("plotting {}: {e}", png.display()))?;
    println!(
        "\nwrote {0}/results.json, {0}/table.txt, {0}/results.png",
        dir.display()
    );

    // Slowness never fails the benchmark, nor does a skipped workload;
    // errors and missing runs do.
    let failed = res.workloads.iter().any(|r| {
        [&r.c, &r.rust]
            .iter()
            .any(|s| matches!(s, Side::Failed { .. } | Side::Missing))
    });
    Ok(!failed)
}
