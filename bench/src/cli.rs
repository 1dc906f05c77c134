// SPDX-License-Identifier: GPL-2.0

//! Command line.

pub const USAGE: &str = "\
usage: hmm-dmirror-bench run --module c|rust --out FILE [--reps N] [--rounds N] [--only TEXT]
                             [--pending]
       hmm-dmirror-bench report --dir DIR
       hmm-dmirror-bench list [--pending]

run      (in the VM, a dmirror module loaded) time every workload against
         /dev/hmm_dmirror0 and write the samples as JSON to FILE.
         --reps N    override every workload's repetition count
         --rounds N  this run is one of N whose samples are merged: run
                     1/N of the repetitions and of the time budget
         --only TEXT run only the workloads whose name contains TEXT, or
                     one of TEXT's '|'-separated parts, in list order
         --pending   add the workloads the Rust module cannot serve yet
report   (on the host) read DIR/raw-c.json and DIR/raw-rust.json, or
         the rounds DIR/raw-c-*.json and DIR/raw-rust-*.json, and
         DIR/vm-run.log; write DIR/results.json, DIR/table.txt and
         DIR/results.png; print the table. Exit status 1 if a workload
         failed or a module did not run.
list     print the workload names
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run {
        module: String,
        out: String,
        reps: Option<usize>,
        rounds: usize,
        only: Option<String>,
        pending: bool,
    },
    Report {
        dir: String,
    },
    List {
        pending: bool,
    },
    Help,
}

/// The value `v` of the option `flag`: a count of at least 1.
fn count(flag: &str, v: &str) -> Result<usize, String> {
    match v.parse() {
        Ok(0) => Err(format!("{flag} must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("bad {flag} {v}")),
    }
}

pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut args = args.into_iter();
    let sub = args.next().ok_or("no command given")?;
    let (mut module, mut out, mut reps, mut only, mut pending, mut dir) =
        (None, None, None, None, false, None);
    let mut rounds = 1;
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--module" => module = Some(value()?),
            "--out" => out = Some(value()?),
            "--reps" => reps = Some(count(&a, &value()?)?),
            "--rounds" => rounds = count(&a, &value()?)?,
            "--only" => only = Some(value()?),
            "--pending" => pending = true,
            "--dir" => dir = Some(value()?),
            "-h" | "--help" => return Ok(Command::Help),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    match sub.as_str() {
        "run" => {
            let module = module.ok_or("run needs --module c|rust")?;
            if module != "c" && module != "rust" {
                return Err(format!("--module must be c or rust, not {module}"));
            }
            Ok(Command::Run {
                module,
                out: out.ok_or("run needs --out FILE")?,
                reps,
                rounds,
                only,
                pending,
            })
        }
        "report" => Ok(Command::Report {
            dir: dir.ok_or("report needs --dir DIR")?,
        }),
        "list" => Ok(Command::List { pending }),
        "-h" | "--help" | "help" => Ok(Command::Help),
        _ => Err(format!("unknown command {sub}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn run_options() {
        assert_eq!(
            p("run --module rust --out x.json --reps 2 --rounds 3 --only READ --pending"),
            Ok(Command::Run {
                module: "rust".into(),
                out: "x.json".into(),
                reps: Some(2),
                rounds: 3,
                only: Some("READ".into()),
                pending: true,
            })
        );
        assert!(p("run --module go --out x").is_err());
        assert!(p("run --module c").is_err());
        assert!(p("run --module c --out x --reps 0").is_err());
        assert!(p("run --module c --out x --rounds 0").is_err());
    }

    #[test]
    fn others() {
        assert_eq!(p("report --dir d"), Ok(Command::Report { dir: "d".into() }));
        assert_eq!(p("list"), Ok(Command::List { pending: false }));
        assert_eq!(p("--help"), Ok(Command::Help));
        assert!(p("").is_err());
        assert!(p("bogus").is_err());
    }
}
