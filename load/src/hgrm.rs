//! `--hgrm FILE`: a latency histogram written in HdrHistogram's
//! percentile-distribution text format (the `.hgrm` files of
//! `HistogramLogProcessor` and wrk2, read by the usual HdrHistogram
//! plotter), values in milliseconds.

use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::path::Path;

/// Percentile steps per halving of the distance to 100%, as in
/// HdrHistogram's own `outputPercentileDistribution`.
const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// The histograms hold nanoseconds; the file shows milliseconds.
const NS_PER_MS: f64 = 1e6;

/// Writes `h` (nanoseconds) to `path`.
pub fn write(path: &Path, h: &Histogram<u64>) -> std::io::Result<()> {
    std::fs::write(path, render(h))
}

/// The text of the percentile distribution of `h` (nanoseconds).
pub fn render(h: &Histogram<u64>) -> String {
    let ms = |ns: f64| ns / NS_PER_MS;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = ms(v.value_iterated_to() as f64);
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (ms(h.mean()), ms(h.stdev()), ms(h.max() as f64))
    };
    // Sub-buckets per bucket: the power of two that holds 2 * 10^sigfig.
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(s, "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]");
    let _ = writeln!(
        s,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {sub_buckets:12}]",
        h.buckets()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tally::{new_histogram, record};
    use std::time::Duration;

    #[test]
    fn distribution_rises_to_the_max() {
        let mut h = new_histogram();
        for us in 1..=1000 {
            record(&mut h, Duration::from_micros(us));
        }
        let text = render(&h);
        let rows: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|f| f.parse().unwrap()).collect())
            .collect();
        assert!(rows.len() > 20, "{text}");
        assert!(
            rows.windows(2)
                .all(|w| w[0][0] <= w[1][0] && w[0][1] <= w[1][1])
        );
        let last = rows.last().unwrap();
        assert_eq!((last[1], last[2]), (1.0, 1000.0));
        assert!((last[0] - 1.0).abs() < 0.01, "max {} ms", last[0]);
        assert!(text.contains("Total count    =         1000]"), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
    }
}
