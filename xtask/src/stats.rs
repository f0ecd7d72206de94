//! The statistics the benchmarks report: medians, percentiles, maxima.

/// Value at quantile `q` (0..=1) of `v`, nearest rank; 0 for no values.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// A distribution-free confidence interval (`conf`, e.g. 0.9) for the
/// median of `v`: the order statistics the sign test gives (each sample
/// falls below the true median with probability 1/2, so the count below is
/// Binomial(n, 1/2)). No assumption about the noise's shape, which on this
/// host is skewed (interruptions only add time). None with too few samples
/// for that confidence.
pub fn median_ci(v: &[f64], conf: f64) -> Option<(f64, f64)> {
    let n = v.len();
    let tail = (1.0 - conf.clamp(0.0, 1.0)) / 2.0;
    // P(X <= j) for X ~ Binomial(n, 1/2), summed term by term; each term
    // in logs, since 2^-n underflows past ~1,000 samples (the first terms
    // are then 0, which they are to any precision that matters).
    let mut ln_term = -(n as f64) * std::f64::consts::LN_2;
    let mut cdf = 0.0;
    let mut k = None;
    for j in 0..n {
        cdf += ln_term.exp();
        if cdf > tail {
            break;
        }
        // P(X < j + 1) <= tail: the (j+1)-th smallest is a lower bound.
        k = Some(j);
        ln_term += ((n - j) as f64 / (j + 1) as f64).ln();
    }
    let k = k?;
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some((s[k], s[n - 1 - k]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&v), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 5.0);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(max(&v), 5.0);
    }

    #[test]
    fn median_ci_by_sign_test() {
        // n = 41 at 90%: P(X <= 14) = 0.0298 <= 0.05 < P(X <= 15) = 0.0600,
        // so the 15th smallest and the 15th largest.
        let v: Vec<f64> = (1..=41).rev().map(f64::from).collect();
        assert_eq!(median_ci(&v, 0.9), Some((15.0, 27.0)));
        // n = 5 at 90%: P(X <= 0) = 1/32 <= 0.05: the extremes.
        assert_eq!(median_ci(&[3.0, 1.0, 2.0, 5.0, 4.0], 0.9), Some((1.0, 5.0)));
        // n = 4: P(X <= 0) = 1/16 > 0.05: no interval at 90%.
        assert_eq!(median_ci(&[1.0, 2.0, 3.0, 4.0], 0.9), None);
        assert_eq!(median_ci(&[], 0.9), None);
        // n = 2,000 (2^-n underflows): the interval still brackets the
        // median, at the ranks the normal approximation gives
        // (n/2 -+ 1.645 sqrt(n)/2: ~963 and ~1,037).
        let v: Vec<f64> = (1..=2000).map(f64::from).collect();
        let (lo, hi) = median_ci(&v, 0.9).expect("an interval");
        assert!((960.0..=966.0).contains(&lo) && (1035.0..=1041.0).contains(&hi), "{lo} {hi}");
    }
}
