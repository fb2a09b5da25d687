//! Delivery accounting: per-(receiver, sender) sequence tracking and a
//! latency histogram.
//!
//! Kept free of any I/O so the numbers the benchmark reports can be proven
//! by unit tests on known inputs.

use serde::Serialize;

/// What one arrival of `(sender, seq)` at a receiver turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First arrival of this sequence number and it is the highest seen so
    /// far (gaps before it are not yet losses: they may still arrive late).
    New,
    /// First arrival, but a higher sequence number was already seen.
    Reordered,
    /// This sequence number was already seen.
    Duplicate,
    /// The sequence number is outside `0..expected`; the sender never sent it.
    OutOfRange,
}

impl Arrival {
    /// Whether this arrival is the first copy of a real message (and so
    /// counts as a delivery and may acknowledge the sender's window).
    pub fn is_first(self) -> bool {
        matches!(self, Arrival::New | Arrival::Reordered)
    }
}

/// Tracks the sequence numbers one receiver got from one sender.
///
/// Senders number their messages `0..expected` and send them in order over
/// one connection, so a correct server delivers them to each receiver in
/// exactly that order. A bitmap (one bit per sequence number) tells a
/// duplicate from a late arrival; whatever is still missing when the run
/// ends is lost.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    seen: Vec<u64>,
    expected: u64,
    highest: Option<u64>,
    distinct: u64,
    duplicated: u64,
    reordered: u64,
    out_of_range: u64,
}

impl SeqTracker {
    /// A tracker for a sender that will send sequence numbers `0..expected`.
    pub fn new(expected: u64) -> Self {
        let words = expected.div_ceil(64) as usize;
        SeqTracker {
            seen: vec![0; words],
            expected,
            highest: None,
            distinct: 0,
            duplicated: 0,
            reordered: 0,
            out_of_range: 0,
        }
    }

    /// Record one arrival and classify it.
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq >= self.expected {
            self.out_of_range += 1;
            return Arrival::OutOfRange;
        }
        let word = (seq / 64) as usize;
        let mask = 1u64 << (seq % 64);
        if self.seen[word] & mask != 0 {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= mask;
        self.distinct += 1;
        match self.highest {
            Some(h) if seq < h => {
                self.reordered += 1;
                Arrival::Reordered
            }
            _ => {
                self.highest = Some(seq);
                Arrival::New
            }
        }
    }

    /// Distinct sequence numbers received so far.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Whether every expected sequence number has arrived at least once.
    pub fn is_complete(&self) -> bool {
        self.distinct == self.expected
    }

    /// The tally for this (receiver, sender) pair as of now.
    pub fn counts(&self) -> SeqCounts {
        SeqCounts {
            expected: self.expected,
            delivered: self.distinct,
            lost: self.expected - self.distinct,
            duplicated: self.duplicated,
            reordered: self.reordered,
            out_of_range: self.out_of_range,
        }
    }
}

/// Summed delivery figures over any number of trackers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SeqCounts {
    /// Messages that should have arrived (one per receiver per message).
    pub expected: u64,
    /// Distinct messages that did arrive (late ones included).
    pub delivered: u64,
    /// `expected - delivered`.
    pub lost: u64,
    /// Extra copies of messages already delivered.
    pub duplicated: u64,
    /// Messages that arrived after a higher sequence number from the same sender.
    pub reordered: u64,
    /// Sequence numbers the sender never sent.
    pub out_of_range: u64,
}

impl SeqCounts {
    pub fn add(&mut self, other: &SeqCounts) {
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.out_of_range += other.out_of_range;
    }

    /// True when every expected message arrived exactly once and in order.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0 && self.out_of_range == 0
    }
}

/// Significant bits kept per value: values below `SUB` are exact, larger
/// ones fall in buckets no wider than 1/64 of their value (<= 1.6% error),
/// which is far below the run-to-run noise of a latency benchmark and keeps
/// the histogram a fixed 30 KiB whatever the number of samples.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
const HALF: u64 = SUB / 2;
const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * HALF) as usize;

/// Log-linear histogram of `u64` samples (nanoseconds in this crate).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros() as u64;
    let shift = msb - (SUB_BITS as u64 - 1);
    (SUB + (msb - SUB_BITS as u64) * HALF + ((v >> shift) - HALF)) as usize
}

fn bucket_bounds(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < SUB {
        return (idx, idx);
    }
    let k = idx - SUB;
    let msb = k / HALF + SUB_BITS as u64;
    let sub = k % HALF + HALF;
    let shift = msb - (SUB_BITS as u64 - 1);
    let low = sub << shift;
    (low, low.saturating_add((1u64 << shift) - 1))
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// Nearest-rank percentile (`q` in 0..=100): the smallest recorded value
    /// such that at least `q`% of samples are <= it, reported as the upper
    /// edge of its bucket (so it never understates) but never above the
    /// true maximum. 0 for an empty histogram.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 100.0) / 100.0) * self.total as f64).ceil() as u64;
        let rank = rank.clamp(1, self.total);
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_bounds(idx).1.min(self.max);
            }
        }
        self.max
    }

    /// The standard summary, converted from nanoseconds to milliseconds.
    pub fn summary_ms(&self) -> LatencySummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        LatencySummary {
            count: self.total,
            p50: ms(self.percentile(50.0)),
            p90: ms(self.percentile(90.0)),
            p99: ms(self.percentile(99.0)),
            p999: ms(self.percentile(99.9)),
            max: ms(self.max()),
            mean: self.mean() / 1e6,
        }
    }
}

/// Latency (or connect-time) percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Counts of `times_ns` per interval of `bucket_ns` from `start_ns` up to
/// the last one (times before the start count in the first interval).
pub fn timeline(times_ns: &[u64], start_ns: u64, bucket_ns: u64) -> Vec<u64> {
    let bucket_ns = bucket_ns.max(1);
    let mut counts = Vec::new();
    for &t in times_ns {
        let i = (t.saturating_sub(start_ns) / bucket_ns) as usize;
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        counts[i] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(expected: u64, seqs: &[u64]) -> (SeqCounts, Vec<Arrival>) {
        let mut t = SeqTracker::new(expected);
        let arrivals = seqs.iter().map(|&s| t.record(s)).collect();
        (t.counts(), arrivals)
    }

    #[test]
    fn timeline_counts_per_interval_including_empty_ones() {
        let ms = 1_000_000;
        let start = 50 * ms;
        // One early (before the start), two in [0, 10) ms, none in [10, 20),
        // one at exactly 20 ms, one at 39.9 ms.
        let times = [
            start - 1,
            start,
            start + 9 * ms,
            start + 20 * ms,
            start + 39 * ms + 900_000,
        ];
        assert_eq!(timeline(&times, start, 10 * ms), vec![3, 0, 1, 1]);
        assert!(timeline(&[], start, 10 * ms).is_empty());
        // A zero interval is taken as 1 ns rather than dividing by zero.
        assert_eq!(timeline(&[start + 2], start, 0), vec![0, 0, 1]);
    }

    #[test]
    fn in_order_stream_is_clean() {
        let seqs: Vec<u64> = (0..200).collect();
        let (c, _) = feed(200, &seqs);
        assert_eq!(
            c,
            SeqCounts {
                expected: 200,
                delivered: 200,
                ..Default::default()
            }
        );
        assert!(c.is_clean());
    }

    #[test]
    fn missing_messages_are_lost_not_reordered() {
        let (c, a) = feed(6, &[0, 1, 3, 5]);
        assert_eq!(c.delivered, 4);
        assert_eq!(c.lost, 2);
        assert_eq!(c.reordered, 0);
        assert_eq!(c.duplicated, 0);
        assert!(a.iter().all(|x| *x == Arrival::New));
        assert!(!c.is_clean());
    }

    #[test]
    fn late_arrivals_are_reordered_not_lost() {
        // 1 and 2 both arrive after 3 has been seen.
        let (c, a) = feed(5, &[0, 3, 1, 2, 4]);
        assert_eq!(c.delivered, 5);
        assert_eq!(c.lost, 0);
        assert_eq!(c.reordered, 2);
        assert_eq!(
            a,
            vec![
                Arrival::New,
                Arrival::New,
                Arrival::Reordered,
                Arrival::Reordered,
                Arrival::New
            ]
        );
    }

    #[test]
    fn duplicates_are_counted_once_each_extra_copy() {
        let (c, a) = feed(3, &[0, 1, 1, 2, 2, 2, 0]);
        assert_eq!(c.delivered, 3);
        assert_eq!(c.duplicated, 4);
        assert_eq!(c.reordered, 0);
        assert_eq!(c.lost, 0);
        assert_eq!(a[2], Arrival::Duplicate);
        assert!(!a[2].is_first());
        assert!(a[0].is_first());
    }

    #[test]
    fn duplicate_of_a_late_message_is_both() {
        let (c, _) = feed(3, &[0, 2, 1, 1]);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.duplicated, 1);
        assert_eq!(c.lost, 0);
    }

    #[test]
    fn out_of_range_sequence_is_flagged() {
        let (c, a) = feed(2, &[0, 1, 2, 99]);
        assert_eq!(c.out_of_range, 2);
        assert_eq!(c.delivered, 2);
        assert_eq!(a[3], Arrival::OutOfRange);
        assert!(!c.is_clean());
    }

    #[test]
    fn bitmap_spans_word_boundaries() {
        let mut t = SeqTracker::new(130);
        for s in (0..130).rev() {
            t.record(s);
        }
        assert!(t.is_complete());
        // everything after the first (129) arrived "late"
        assert_eq!(t.counts().reordered, 129);
        assert_eq!(t.record(64), Arrival::Duplicate);
        assert_eq!(t.record(63), Arrival::Duplicate);
    }

    #[test]
    fn counts_sum_across_trackers() {
        let (a, _) = feed(4, &[0, 1, 1, 3]);
        let (b, _) = feed(4, &[0, 2, 1, 3]);
        let mut total = SeqCounts::default();
        total.add(&a);
        total.add(&b);
        assert_eq!(
            total,
            SeqCounts {
                expected: 8,
                delivered: 7,
                lost: 1,
                duplicated: 1,
                reordered: 1,
                out_of_range: 0
            }
        );
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let h = Histogram::new();
        assert_eq!(h.percentile(50.0), 0);
        assert_eq!(h.summary_ms(), LatencySummary::default());
    }

    #[test]
    fn percentiles_are_exact_for_small_values() {
        let mut h = Histogram::new();
        // insertion order must not matter
        for v in (1..=100u64).rev() {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(50.0), 50);
        assert_eq!(h.percentile(90.0), 90);
        assert_eq!(h.percentile(99.0), 99);
        assert_eq!(h.percentile(99.9), 100);
        assert_eq!(h.percentile(100.0), 100);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 100);
        assert!((h.mean() - 50.5).abs() < 1e-9);
    }

    #[test]
    fn skewed_distribution_percentiles() {
        // 990 fast samples and 10 slow ones: p99 is still fast, p99.9 slow.
        let mut h = Histogram::new();
        for _ in 0..990 {
            h.record(10);
        }
        for _ in 0..10 {
            h.record(100);
        }
        assert_eq!(h.percentile(50.0), 10);
        assert_eq!(h.percentile(99.0), 10);
        assert_eq!(h.percentile(99.1), 100);
        assert_eq!(h.percentile(99.9), 100);
    }

    #[test]
    fn large_values_within_relative_error() {
        // 1 µs .. 10 ms in 1 µs steps, in nanoseconds.
        let mut h = Histogram::new();
        let vals: Vec<u64> = (1..=10_000u64).map(|i| i * 1_000).collect();
        for &v in &vals {
            h.record(v);
        }
        for (q, exact) in [
            (50.0, 5_000_000u64),
            (90.0, 9_000_000),
            (99.0, 9_900_000),
            (99.9, 9_990_000),
        ] {
            let got = h.percentile(q);
            assert!(got >= exact, "p{q}: {got} < {exact}");
            let err = (got - exact) as f64 / exact as f64;
            assert!(err <= 1.0 / 64.0, "p{q}: {got} vs {exact} err {err}");
        }
        assert_eq!(h.percentile(100.0), 10_000_000);
        let s = h.summary_ms();
        assert!((s.max - 10.0).abs() < 1e-9);
        assert!((s.mean - 5.0005).abs() < 1e-6);
    }

    #[test]
    fn buckets_contain_their_values() {
        let mut v = 1u64;
        while v < u64::MAX / 3 {
            for x in [v - 1, v, v + 1, v * 3 / 2] {
                let (lo, hi) = bucket_bounds(bucket_of(x));
                assert!(lo <= x && x <= hi, "{x} not in [{lo},{hi}]");
                assert!(hi - lo <= lo / 64, "bucket too wide at {x}");
            }
            v = v * 2 + 1;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_bounds(BUCKETS - 1).1, u64::MAX);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for v in 0..5_000u64 {
            let x = v * v;
            if v % 3 == 0 {
                a.record(x);
            } else {
                b.record(x);
            }
            all.record(x);
        }
        a.merge(&b);
        for q in [1.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            assert_eq!(a.percentile(q), all.percentile(q));
        }
        assert_eq!(a.count(), all.count());
        assert_eq!(a.min(), all.min());
        assert_eq!(a.max(), all.max());
    }
}
