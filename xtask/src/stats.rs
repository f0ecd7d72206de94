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
}
