// SPDX-License-Identifier: GPL-2.0

//! KTAP output as the kselftest harness prints it. Pure functions only, so
//! the format is tested on the host.

/// How one test ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

/// Running totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
}

impl Counts {
    pub fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Pass => self.pass += 1,
            Outcome::Fail(_) => self.fail += 1,
            Outcome::Skip(_) => self.skip += 1,
        }
    }
}

/// kselftest exit codes (`KSFT_PASS`, `KSFT_FAIL`, `KSFT_SKIP`).
pub const KSFT_PASS: i32 = 0;
pub const KSFT_FAIL: i32 = 1;
pub const KSFT_SKIP: i32 = 4;

pub fn header() -> &'static str {
    "TAP version 13"
}

pub fn plan(n: usize) -> String {
    format!("1..{n}")
}

/// One `# ` line per line of `text`.
pub fn diag(text: &str) -> String {
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str("# ");
        out.push_str(line);
    }
    if out.is_empty() {
        out.push('#');
    }
    out
}

/// A directive or reason must stay on the result line: no newlines, no `#`
/// that a parser could take for a second directive.
fn one_line(reason: &str) -> String {
    reason
        .replace('#', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `ok`/`not ok` line. A failure's reason goes to diagnostics, not here.
pub fn result_line(n: usize, name: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Pass | Outcome::Fail(_) => {
            let ok = if matches!(outcome, Outcome::Pass) {
                "ok"
            } else {
                "not ok"
            };
            format!("{ok} {n} {name}")
        }
        Outcome::Skip(reason) => {
            let reason = one_line(reason);
            if reason.is_empty() {
                format!("ok {n} {name} # SKIP")
            } else {
                format!("ok {n} {name} # SKIP {reason}")
            }
        }
    }
}

pub fn totals_line(c: &Counts) -> String {
    format!(
        "# Totals: pass:{} fail:{} xfail:0 xpass:0 skip:{} error:0",
        c.pass, c.fail, c.skip
    )
}

/// The plain closing line that CI reads; it must be the last line.
pub fn summary_line(c: &Counts) -> String {
    format!("{} passed, {} failed, {} skipped", c.pass, c.fail, c.skip)
}

/// As kselftest: any failure fails the run; a run of only skips skips.
pub fn exit_code(c: &Counts) -> i32 {
    if c.fail > 0 {
        KSFT_FAIL
    } else if c.pass == 0 && c.skip > 0 {
        KSFT_SKIP
    } else {
        KSFT_PASS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        assert_eq!(result_line(1, "a.b", &Outcome::Pass), "ok 1 a.b");
        assert_eq!(
            result_line(2, "a.c", &Outcome::Fail("x".into())),
            "not ok 2 a.c"
        );
        assert_eq!(
            result_line(3, "a.d", &Outcome::Skip("no huge pages".into())),
            "ok 3 a.d # SKIP no huge pages"
        );
        assert_eq!(
            result_line(4, "a.e", &Outcome::Skip(String::new())),
            "ok 4 a.e # SKIP"
        );
    }

    #[test]
    fn skip_reason_stays_on_one_line() {
        let line = result_line(1, "t", &Outcome::Skip("two\nlines # and hash".into()));
        assert_eq!(line, "ok 1 t # SKIP two lines and hash");
    }

    #[test]
    fn diag_prefixes_every_line() {
        assert_eq!(diag("one"), "# one");
        assert_eq!(diag("one\ntwo"), "# one\n# two");
        assert_eq!(diag(""), "#");
    }

    #[test]
    fn totals_and_summary() {
        let mut c = Counts::default();
        for o in [
            Outcome::Pass,
            Outcome::Pass,
            Outcome::Fail("f".into()),
            Outcome::Skip("s".into()),
        ] {
            c.add(&o);
        }
        assert_eq!(
            c,
            Counts {
                pass: 2,
                fail: 1,
                skip: 1
            }
        );
        assert_eq!(
            totals_line(&c),
            "# Totals: pass:2 fail:1 xfail:0 xpass:0 skip:1 error:0"
        );
        assert_eq!(summary_line(&c), "2 passed, 1 failed, 1 skipped");
        assert_eq!(header(), "TAP version 13");
        assert_eq!(plan(31), "1..31");
    }

    #[test]
    fn exit_codes() {
        let c = |pass, fail, skip| Counts { pass, fail, skip };
        assert_eq!(exit_code(&c(3, 0, 0)), KSFT_PASS);
        assert_eq!(exit_code(&c(3, 0, 2)), KSFT_PASS);
        assert_eq!(exit_code(&c(3, 1, 2)), KSFT_FAIL);
        assert_eq!(exit_code(&c(0, 1, 2)), KSFT_FAIL);
        assert_eq!(exit_code(&c(0, 0, 2)), KSFT_SKIP);
    }
}
