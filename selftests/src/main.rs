// SPDX-License-Identifier: GPL-2.0

//! Entry point: parse the command line, select tests, run, exit as
//! kselftest does.

use hmm_dmirror_selftests::{cli, harness, ktap, tests};
use std::process::exit;

fn main() {
    let opts = match cli::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hmm-dmirror-selftests: {e}\n\n{}", cli::USAGE);
            exit(ktap::KSFT_FAIL);
        }
    };
    if opts.help {
        print!("{}", cli::USAGE);
        return;
    }
    let all = tests::all();
    let names: Vec<&str> = all.iter().map(|t| t.name).collect();
    let unmatched = cli::unmatched(&names, &opts.filters, opts.exact);
    if !unmatched.is_empty() {
        eprintln!(
            "hmm-dmirror-selftests: no test matches {}; try --list",
            unmatched.join(", ")
        );
        exit(ktap::KSFT_FAIL);
    }
    let selected: Vec<_> = all
        .into_iter()
        .filter(|t| cli::selected(t.name, &opts.filters, opts.exact))
        .collect();
    if opts.list {
        for t in &selected {
            println!("{}", t.name);
        }
        return;
    }
    let mut out = std::io::stdout().lock();
    match harness::run(&selected, opts.timeout, &mut out) {
        Ok(counts) => exit(ktap::exit_code(&counts)),
        Err(e) => {
            eprintln!("hmm-dmirror-selftests: writing output: {e}");
            exit(ktap::KSFT_FAIL);
        }
    }
}
