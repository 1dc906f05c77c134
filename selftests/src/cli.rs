// SPDX-License-Identifier: GPL-2.0

//! Command line: options and test-name filters.

use std::time::Duration;

pub const USAGE: &str = "\
usage: hmm-dmirror-selftests [options] [FILTER...]

Runs the dmirror selftests (needs /dev/hmm_dmirror0 and root) and prints
KTAP. Each test runs in its own process with a timeout.

A FILTER selects the tests whose name starts with it: `lockdrop` runs that
group, `hmm.anon_read` runs hmm.anon_read, hmm.anon_read_prot and
hmm.anon_read_multiple. No filter runs everything.

options:
  --list           print the selected test names and exit
  --exact          a FILTER must equal the whole name
  --timeout SECS   per-test timeout, overriding each test's own
  -h, --help       this text

environment:
  DMIRROR_TIMEOUT_SCALE=N   multiply each test's own timeout, and its
                            bounds on how promptly things end, by N (1-10;
                            scripts/vm-run sets 4 under TCG)
  DMIRROR_STRESS_SECS=N     seconds per stress case (default 3)

exit status: 0 all passed (or skipped), 1 a test failed or bad usage,
4 every test skipped.
";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub list: bool,
    pub exact: bool,
    pub help: bool,
    pub timeout: Option<Duration>,
    pub filters: Vec<String>,
}

pub fn parse<I, S>(args: I) -> Result<Options, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut opts = Options::default();
    let mut args = args.into_iter().map(Into::into);
    let mut only_filters = false;
    while let Some(arg) = args.next() {
        if only_filters {
            opts.filters.push(arg);
            continue;
        }
        match arg.as_str() {
            "--list" | "-l" => opts.list = true,
            "--exact" => opts.exact = true,
            "-h" | "--help" => opts.help = true,
            "--timeout" => {
                let v = args.next().ok_or("--timeout needs a value")?;
                opts.timeout = Some(parse_secs(&v)?);
            }
            "--" => only_filters = true,
            s if s.starts_with("--timeout=") => {
                opts.timeout = Some(parse_secs(&s["--timeout=".len()..])?);
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => opts.filters.push(arg),
        }
    }
    Ok(opts)
}

fn parse_secs(v: &str) -> Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(s) if s > 0 => Ok(Duration::from_secs(s)),
        _ => Err(format!("bad --timeout value {v:?}: want whole seconds > 0")),
    }
}

/// Whether `name` is selected by `filters` (no filter selects everything).
pub fn selected(name: &str, filters: &[String], exact: bool) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                name == f
            } else {
                name.starts_with(f.as_str())
            }
        })
}

/// Filters that select nothing, to report typos.
pub fn unmatched<'a>(names: &[&str], filters: &'a [String], exact: bool) -> Vec<&'a str> {
    filters
        .iter()
        .filter(|f| {
            !names
                .iter()
                .any(|n| selected(n, std::slice::from_ref(f), exact))
        })
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options_and_filters() {
        let o = parse(["--list", "lockdrop", "--timeout", "5", "hmm.open_close"]).unwrap();
        assert!(o.list);
        assert_eq!(o.timeout, Some(Duration::from_secs(5)));
        assert_eq!(o.filters, ["lockdrop", "hmm.open_close"]);
        let o = parse(["--timeout=7", "--exact", "--", "--list"]).unwrap();
        assert_eq!(o.timeout, Some(Duration::from_secs(7)));
        assert!(o.exact && !o.list);
        assert_eq!(o.filters, ["--list"]);
        assert!(parse(["-h"]).unwrap().help);
        assert_eq!(parse(Vec::<String>::new()).unwrap(), Options::default());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse(["--bogus"]).is_err());
        assert!(parse(["--timeout"]).is_err());
        assert!(parse(["--timeout", "0"]).is_err());
        assert!(parse(["--timeout", "x"]).is_err());
    }

    #[test]
    fn filters_are_prefixes() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selected("hmm.anon_read", &[], false));
        assert!(selected(
            "hmm.anon_read_prot",
            &f(&["hmm.anon_read"]),
            false
        ));
        assert!(!selected("hmm.anon_write", &f(&["hmm.anon_read"]), false));
        assert!(selected(
            "lockdrop.one_page",
            &f(&["hmm", "lockdrop"]),
            false
        ));
        assert!(!selected(
            "hmm.anon_read_prot",
            &f(&["hmm.anon_read"]),
            true
        ));
        assert!(selected("hmm.anon_read", &f(&["hmm.anon_read"]), true));
    }

    #[test]
    fn reports_unmatched_filters() {
        let names = ["hmm.open_close", "lockdrop.one_page"];
        let filters = vec!["hmm".to_string(), "nope".to_string()];
        assert_eq!(unmatched(&names, &filters, false), ["nope"]);
        assert_eq!(unmatched(&names, &filters, true), ["hmm", "nope"]);
    }
}
