// SPDX-License-Identifier: GPL-2.0

//! Assertions the tests share: errno results and data compared element by
//! element, reporting the first mismatch and how many there were.

use crate::dmirror::{errno, errno_name};
use crate::harness::{Failure, TestResult};
use std::fmt::Debug;
use std::io;

/// `r` must have failed with `want`.
pub fn expect_errno<T: Debug>(r: io::Result<T>, want: i32, what: &str) -> TestResult {
    match r {
        Err(e) if errno(&e) == want => Ok(()),
        Err(e) => Err(Failure::Fail(format!(
            "{what}: want {}, got {} ({e})",
            errno_name(want),
            errno_name(errno(&e))
        ))),
        Ok(v) => Err(Failure::Fail(format!(
            "{what}: want {}, got success ({v:?})",
            errno_name(want)
        ))),
    }
}

/// Every element must equal `want(i)`.
pub fn check_each<T: PartialEq + Debug + Copy>(
    what: &str,
    data: &[T],
    want: impl Fn(usize) -> T,
) -> TestResult {
    let mut first = None;
    let mut bad = 0usize;
    for (i, &v) in data.iter().enumerate() {
        let w = want(i);
        if v != w {
            bad += 1;
            first.get_or_insert((i, v, w));
        }
    }
    match first {
        None => Ok(()),
        Some((i, v, w)) => Err(Failure::Fail(format!(
            "{what}: {bad} of {} elements differ; first at {i}: got {v:?}, want {w:?}",
            data.len()
        ))),
    }
}

/// The byte a handler or writer puts at `off` of page `page`. Varies with
/// both, so a page in the wrong place or a torn copy shows.
pub fn pattern(seed: u8, page: usize, off: usize) -> u8 {
    (page.wrapping_mul(131) ^ off.wrapping_mul(7) ^ (off >> 8)) as u8 ^ seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_each_reports_first_mismatch() {
        assert!(check_each("x", &[1u8, 2, 3], |i| i as u8 + 1).is_ok());
        match check_each("x", &[1u8, 9, 3, 9], |i| i as u8 + 1) {
            Err(Failure::Fail(m)) => {
                assert_eq!(m, "x: 2 of 4 elements differ; first at 1: got 9, want 2")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expect_errno_matches_only_that_errno() {
        let e = |n| Err::<(), _>(io::Error::from_raw_os_error(n));
        assert!(expect_errno(e(libc::EFAULT), libc::EFAULT, "r").is_ok());
        assert!(expect_errno(e(libc::EINVAL), libc::EFAULT, "r").is_err());
        assert!(expect_errno(Ok(()), libc::EFAULT, "r").is_err());
    }

    #[test]
    fn pattern_differs_between_pages_and_offsets() {
        assert_ne!(pattern(0, 0, 1), pattern(0, 1, 1));
        assert_ne!(pattern(0, 3, 0), pattern(0, 3, 1));
        assert_ne!(pattern(0, 3, 5), pattern(1, 3, 5));
    }
}
