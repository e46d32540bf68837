//! Pure statistics over counts and samples: shares, Jain's fairness index, max/mean
//! load, deviation from a target, percentiles. The proxy's fairness gauge and the lab's
//! numbers both come from here.

/// Each count's part of the total; all zero when the total is zero.
pub(crate) fn shares(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        })
        .collect()
}

/// Jain's fairness index (Σx)² / (n·Σx²): 1 when every value is equal, 1/n when one
/// value takes everything. An empty or all-zero vector counts as fair.
pub(crate) fn jain(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().sum();
    let squares: f64 = values.iter().map(|x| x * x).sum();
    if values.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (values.len() as f64 * squares)
}

/// The busiest value over the mean: 1 when balanced, n when one takes everything.
pub(crate) fn max_mean_ratio(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let max = values.iter().copied().fold(0.0, f64::max);
    if mean == 0.0 {
        1.0
    } else {
        max / mean
    }
}

/// The largest distance between a share and its target.
pub(crate) fn max_deviation(shares: &[f64], targets: &[f64]) -> f64 {
    shares
        .iter()
        .zip(targets)
        .map(|(s, t)| (s - t).abs())
        .fold(0.0, f64::max)
}

/// The `q` quantile (0..=1) of `sorted` by the nearest-rank method; 0 when empty.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and p999 of `samples` (sorted here).
pub(crate) fn latency_percentiles(samples: &mut [f64]) -> [f64; 3] {
    samples.sort_by(f64::total_cmp);
    [0.5, 0.99, 0.999].map(|q| percentile(samples, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn jain_of_known_vectors() {
        assert!(close(jain(&[1.0, 1.0, 1.0, 1.0]), 1.0));
        assert!(close(jain(&[1.0, 0.0, 0.0, 0.0]), 0.25));
        // (1+2+3)² / (3·(1+4+9)) = 36/42
        assert!(close(jain(&[1.0, 2.0, 3.0]), 36.0 / 42.0));
        // (3+1)² / (2·(9+1)) = 0.8
        assert!(close(jain(&[3.0, 1.0]), 0.8));
        assert!(close(jain(&[]), 1.0));
        assert!(close(jain(&[0.0, 0.0]), 1.0));
    }

    #[test]
    fn a_canary_on_target_is_fair_by_weight() {
        let shares = [0.375, 0.375, 0.125, 0.125];
        assert!(jain(&shares) < 0.9);
        assert!(close(max_deviation(&shares, &[0.25; 4]), 0.125));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert!(close(percentile(&v, 0.5), 500.0));
        assert!(close(percentile(&v, 0.99), 990.0));
        assert!(close(percentile(&v, 0.999), 999.0));
        assert!(close(percentile(&v, 1.0), 1000.0));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&[7.0], 0.99), 7.0));
        assert!(close(percentile(&[], 0.5), 0.0));
        let mut shuffled = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(latency_percentiles(&mut shuffled), [3.0, 5.0, 5.0]);
    }

    #[test]
    fn shares_and_ratios() {
        assert_eq!(shares(&[1, 3]), vec![0.25, 0.75]);
        assert_eq!(shares(&[0, 0]), vec![0.0, 0.0]);
        assert!(close(max_mean_ratio(&[0.25, 0.75]), 1.5));
        assert!(close(max_mean_ratio(&[0.5, 0.5]), 1.0));
    }
}
