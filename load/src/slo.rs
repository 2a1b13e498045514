//! `--mode rate --slo p99=5ms`: the search for the highest rate at which a
//! latency bound holds. Each step is a whole rate run (open, warm up,
//! measure, close); a step passes when it has no error, the tool kept its
//! schedule, and the corrected latency at the percentile is within the
//! bound. The search doubles (or halves) from `--rate` until it has a
//! passing and a failing rate, then bisects between them, for at most
//! `MAX_STEPS` runs or until the two are within `RESOLUTION` of each other.

use serde::Serialize;
use std::time::Duration;

/// Runs a search may take at most.
pub const MAX_STEPS: usize = 8;
/// The search stops once failing / passing rate is below this ratio.
const RESOLUTION: f64 = 1.1;

/// A latency bound: `p99=5ms`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    /// The percentile's name as written: `p50`, `p90`, `p99`, `p999`.
    pub name: &'static str,
    pub quantile: f64,
    pub bound: Duration,
}

/// The percentiles a bound may name.
const PERCENTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)];

/// Parses `p99=5ms` (percentile `p50`, `p90`, `p99` or `p999`, then a
/// duration in humantime's syntax).
pub fn parse(s: &str) -> Result<Slo, String> {
    let (p, d) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: write PERCENTILE=DURATION, e.g. p99=5ms"))?;
    let (name, quantile) = PERCENTILES
        .iter()
        .find(|(n, _)| *n == p.trim())
        .copied()
        .ok_or_else(|| format!("`{p}`: the percentile must be one of p50, p90, p99, p999"))?;
    let bound = humantime::parse_duration(d.trim())
        .map_err(|e| format!("`{d}` is not a duration (e.g. 5ms, 250us): {e}"))?;
    if bound.is_zero() {
        return Err("the latency bound must be above 0".into());
    }
    Ok(Slo {
        name,
        quantile,
        bound,
    })
}

/// Where the search stands: the highest rate seen passing and the lowest
/// seen failing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Search {
    pub passing: Option<f64>,
    pub failing: Option<f64>,
}

impl Search {
    /// Records the outcome of a step at `rate` and returns the rate of the
    /// next step, or `None` when the search is over.
    pub fn step(&mut self, rate: f64, passed: bool) -> Option<f64> {
        if passed {
            self.passing = Some(self.passing.map_or(rate, |p| p.max(rate)));
        } else {
            self.failing = Some(self.failing.map_or(rate, |f| f.min(rate)));
        }
        match (self.passing, self.failing) {
            (Some(p), None) => Some(p * 2.0),
            (None, Some(f)) => Some(f / 2.0),
            (Some(p), Some(f)) if f / p > RESOLUTION => Some((p + f) / 2.0),
            _ => None,
        }
    }
}

/// One step in the report.
#[derive(Debug, Serialize)]
pub struct Step {
    pub rate: f64,
    /// The corrected latency at the bound's percentile, microseconds.
    pub latency_us: f64,
    pub errors: u64,
    /// The tool kept its schedule.
    pub valid: bool,
    pub passed: bool,
}

/// What the search found.
#[derive(Debug, Serialize)]
pub struct SloReport {
    /// The bound as given: `p99=5ms`.
    pub bound: String,
    pub steps: Vec<Step>,
    /// The highest rate that passed (the report's other figures are that
    /// step's); none if even the lowest rate tried failed.
    pub best_rate: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bounds() {
        let s = parse("p99=5ms").unwrap();
        assert_eq!(
            (s.name, s.quantile, s.bound),
            ("p99", 0.99, Duration::from_millis(5))
        );
        assert_eq!(
            parse("p999 = 250us").unwrap().bound,
            Duration::from_micros(250)
        );
        assert!(parse("p95=5ms").is_err());
        assert!(parse("p99").is_err());
        assert!(parse("p99=soon").is_err());
        assert!(parse("p99=0s").is_err());
    }

    #[test]
    fn search_doubles_then_bisects() {
        // The bound holds up to 1000 lines/s.
        let mut s = Search::default();
        let mut rate = 300.0;
        let mut tried = vec![];
        for _ in 0..MAX_STEPS {
            tried.push(rate);
            match s.step(rate, rate <= 1000.0) {
                Some(r) => rate = r,
                None => break,
            }
        }
        assert_eq!(&tried[..4], &[300.0, 600.0, 1200.0, 900.0]);
        let (p, f) = (s.passing.unwrap(), s.failing.unwrap());
        assert!(p <= 1000.0 && f > 1000.0 && f / p <= 1.1, "{s:?}");
    }

    #[test]
    fn search_halves_when_the_first_rate_fails() {
        let mut s = Search::default();
        assert_eq!(s.step(1000.0, false), Some(500.0));
        assert_eq!(s.step(500.0, false), Some(250.0));
        assert_eq!(s.step(250.0, true), Some(375.0));
    }
}
