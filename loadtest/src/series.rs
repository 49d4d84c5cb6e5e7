//! Per-second time series for the HTML report: for every second of a run, how many events
//! happened (answers, deliveries) and their latency distribution, kept in a compact
//! log-scale histogram (bins 4 % wide, allocated only for seconds that saw an event) so
//! that every worker can own one and merge it at the end without locks.

use serde::Serialize;

/// Width of one latency bin: each bin's upper bound is 4 % above its lower bound.
const BIN_RATIO: f64 = 1.04;
/// Bins cover 1 µs ..= ~1.4e8 µs (far past any timeout); slower goes in the last one.
const BINS: usize = 480;

fn bin_of(us: u64) -> usize {
    let v = us.max(1) as f64;
    ((v.ln() / BIN_RATIO.ln()) as usize).min(BINS - 1)
}

fn bin_value_us(bin: usize) -> f64 {
    // The bin's geometric middle.
    BIN_RATIO.powf(bin as f64 + 0.5)
}

#[derive(Clone, Default)]
struct Bucket {
    count: u64,
    bins: Option<Box<[u32]>>,
}

impl Bucket {
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let bins = self.bins.as_ref()?;
        let total: u64 = bins.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (i, &n) in bins.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(bin_value_us(i) / 1000.0);
            }
        }
        None
    }
}

/// One named series of per-second buckets; second 0 starts at the run's reference instant.
#[derive(Clone)]
pub struct Series {
    name: String,
    /// What one event is, for the chart's axis ("answers", "deliveries", …).
    unit: String,
    buckets: Vec<Bucket>,
}

/// One second of a series, as the report draws it.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub second: u64,
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Series {
    /// An empty series named `name`, counting `unit`s.
    pub fn new(name: &str, unit: &str) -> Self {
        Self {
            name: name.to_string(),
            unit: unit.to_string(),
            buckets: Vec::new(),
        }
    }

    /// The series' name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What one event is.
    pub fn unit(&self) -> &str {
        &self.unit
    }

    fn bucket(&mut self, at_us: u64) -> &mut Bucket {
        // Bounded: runs are at most minutes long, so at most a few thousand seconds.
        let second = ((at_us / 1_000_000) as usize).min(86_400);
        if self.buckets.len() <= second {
            self.buckets.resize(second + 1, Bucket::default());
        }
        &mut self.buckets[second]
    }

    /// An event at `at_us` (µs since the reference instant) with no latency.
    pub fn count(&mut self, at_us: u64) {
        self.bucket(at_us).count += 1;
    }

    /// An event at `at_us` that took `latency_us`.
    pub fn record(&mut self, at_us: u64, latency_us: u64) {
        let b = self.bucket(at_us);
        b.count += 1;
        let bins = b
            .bins
            .get_or_insert_with(|| vec![0u32; BINS].into_boxed_slice());
        let slot = &mut bins[bin_of(latency_us)];
        *slot = slot.saturating_add(1);
    }

    /// Adds another series' events (same name or not) into this one.
    pub fn merge(&mut self, other: &Series) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), Bucket::default());
        }
        for (into, from) in self.buckets.iter_mut().zip(&other.buckets) {
            into.count += from.count;
            if let Some(fb) = &from.bins {
                let ib = into
                    .bins
                    .get_or_insert_with(|| vec![0u32; BINS].into_boxed_slice());
                for (a, b) in ib.iter_mut().zip(fb.iter()) {
                    *a = a.saturating_add(*b);
                }
            }
        }
    }

    /// Every second from 0 to the last one with an event.
    pub fn points(&self) -> Vec<Point> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(s, b)| Point {
                second: s as u64,
                count: b.count,
                p50_ms: b.quantile_ms(0.50),
                p99_ms: b.quantile_ms(0.99),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_by_second_with_percentiles() {
        let mut a = Series::new("x", "answers");
        for i in 0..100u64 {
            a.record(10_000 * i, (i + 1) * 1000); // second 0, 1..=100 ms
        }
        a.count(2_500_000); // second 2, no latency
        let mut b = Series::new("x", "answers");
        b.record(1_200_000, 5_000);
        a.merge(&b);
        let p = a.points();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].count, 100);
        let p50 = p[0].p50_ms.unwrap_or(0.0);
        let p99 = p[0].p99_ms.unwrap_or(0.0);
        assert!((p50 - 50.0).abs() < 2.5, "{p50}");
        assert!((p99 - 99.0).abs() < 4.5, "{p99}");
        assert_eq!(p[1].count, 1);
        assert!((p[1].p50_ms.unwrap_or(0.0) - 5.0).abs() < 0.25);
        assert_eq!(p[2].count, 1);
        assert_eq!(p[2].p50_ms, None);
    }
}
