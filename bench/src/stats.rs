// SPDX-License-Identifier: GPL-2.0

//! Order statistics of repeated timings: median and spread.
//!
//! The median, not the mean: one preempted repetition (a VM under TCG
//! has plenty) must not move the result.

use serde::{Deserialize, Serialize};

/// Median, quartiles and extremes of a set of samples (nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartile; q3 - q1 is the IQR.
    pub q1: f64,
    pub q3: f64,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut s: Vec<f64> = samples.iter().map(|&x| x as f64).collect();
        s.sort_by(f64::total_cmp);
        Some(Summary {
            n: s.len(),
            median: quantile(&s, 0.5),
            min: s[0],
            max: s[s.len() - 1],
            q1: quantile(&s, 0.25),
            q3: quantile(&s, 0.75),
        })
    }

    /// Every statistic divided by `d` (per page, for instance).
    pub fn scaled(&self, d: f64) -> Self {
        Summary {
            n: self.n,
            median: self.median / d,
            min: self.min / d,
            max: self.max / d,
            q1: self.q1 / d,
            q3: self.q3 / d,
        }
    }

    /// The interquartile range relative to the median.
    pub fn rel_iqr(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.q3 - self.q1) / self.median
        }
    }
}

/// The `p` quantile of sorted, non-empty `s`, linearly interpolated
/// between closest ranks (R's type 7, numpy's default).
pub fn quantile(s: &[f64], p: f64) -> f64 {
    let h = (s.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    s[lo] + (h - lo as f64) * (s[hi] - s[lo])
}

/// Growth exponent between two sizes: the slope of log(time) over
/// log(size). 1 means time grows linearly with size, 2 quadratically.
pub fn loglog_slope(size_a: f64, time_a: f64, size_b: f64, time_b: f64) -> Option<f64> {
    if size_a <= 0.0 || size_b <= 0.0 || time_a <= 0.0 || time_b <= 0.0 || size_a == size_b {
        return None;
    }
    Some((time_b / time_a).ln() / (size_b / size_a).ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count() {
        let s = Summary::of(&[5, 1, 9, 3, 7]).unwrap();
        assert_eq!(s.n, 5);
        assert_eq!(s.median, 5.0);
        assert_eq!((s.min, s.max), (1.0, 9.0));
        assert_eq!((s.q1, s.q3), (3.0, 7.0));
        assert!((s.rel_iqr() - 0.8).abs() < 1e-12);
    }

    #[test]
    fn even_count_interpolates() {
        let s = Summary::of(&[4, 1, 3, 2]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.q1, 1.75);
        assert_eq!(s.q3, 3.25);
    }

    #[test]
    fn single_and_empty() {
        let s = Summary::of(&[42]).unwrap();
        assert_eq!(
            (s.median, s.min, s.max, s.q1, s.q3),
            (42.0, 42.0, 42.0, 42.0, 42.0)
        );
        assert_eq!(s.rel_iqr(), 0.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn outlier_does_not_move_median() {
        let s = Summary::of(&[10, 11, 10, 1_000_000, 12]).unwrap();
        assert_eq!(s.median, 11.0);
        assert_eq!(s.max, 1_000_000.0);
    }

    #[test]
    fn scaled_divides_everything() {
        let s = Summary::of(&[100, 200, 300]).unwrap().scaled(100.0);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(s.n, 3);
    }

    #[test]
    fn slope() {
        let lin = loglog_slope(256.0, 1.0, 4096.0, 16.0).unwrap();
        assert!((lin - 1.0).abs() < 1e-12);
        let quad = loglog_slope(10.0, 1.0, 100.0, 100.0).unwrap();
        assert!((quad - 2.0).abs() < 1e-12);
        assert!(loglog_slope(1.0, 0.0, 2.0, 1.0).is_none());
        assert!(loglog_slope(2.0, 1.0, 2.0, 1.0).is_none());
    }
}
