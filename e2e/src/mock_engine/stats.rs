//! Cumulative request statistics (the counters and histograms of `/metrics`), recorded from what
//! clients actually received, so they are right whatever [`Backend`](super::backend::Backend)
//! produced the tokens.

use std::time::Duration;

use parking_lot::Mutex;

/// Why a request ended, as vLLM's `finished_reason` label spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished on its own before `max_tokens`.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The client went away before the last token.
    Abort,
}

impl FinishReason {
    pub const ALL: [FinishReason; 3] = [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Abort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }

    fn slot(self) -> usize {
        match self {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        }
    }
}

/// Whether the response was streamed (SGLang's `is_streaming` label); index into per-mode arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Unary,
    Streamed,
}

impl Delivery {
    pub const ALL: [Delivery; 2] = [Delivery::Unary, Delivery::Streamed];

    pub fn from_streaming(streaming: bool) -> Self {
        if streaming {
            Delivery::Streamed
        } else {
            Delivery::Unary
        }
    }

    pub fn slot(self) -> usize {
        match self {
            Delivery::Unary => 0,
            Delivery::Streamed => 1,
        }
    }
}

/// A Prometheus histogram: fixed upper bounds plus the implicit `+Inf` bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative: `counts[i]` holds observations in `(bounds[i-1], bounds[i]]`; the last
    /// element holds those above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// `(upper bound, cumulative count)` per bucket, ending with `(+Inf, count)`.
    pub fn cumulative_buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let bounds = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY));
        bounds.zip(self.counts.iter().scan(0, |running, count| {
            *running += count;
            Some(*running)
        }))
    }

    /// Adds `other`'s observations; both must share the bucket layout.
    pub fn merge(&mut self, other: &Histogram) {
        debug_assert_eq!(self.bounds, other.bounds);
        for (count, other_count) in self.counts.iter_mut().zip(&other.counts) {
            *count += other_count;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Bucket layouts of the latency histograms; they differ per engine.
#[derive(Clone, Copy, Debug)]
pub struct HistogramLayout {
    pub time_to_first_token: &'static [f64],
    pub inter_token_latency: &'static [f64],
    pub time_per_output_token: &'static [f64],
    pub e2e_request_latency: &'static [f64],
}

/// Everything counted so far, per [`Delivery`] where SGLang splits by `is_streaming`.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsSnapshot {
    pub prompt_tokens: [u64; 2],
    pub generation_tokens: [u64; 2],
    /// `finished[reason.slot()][delivery.slot()]`.
    finished: [[u64; 2]; 3],
    pub time_to_first_token: [Histogram; 2],
    pub inter_token_latency: Histogram,
    pub time_per_output_token: [Histogram; 2],
    pub e2e_request_latency: [Histogram; 2],
}

impl StatsSnapshot {
    fn new(layout: HistogramLayout) -> Self {
        let per_delivery = |bounds| [Histogram::new(bounds), Histogram::new(bounds)];
        Self {
            prompt_tokens: [0; 2],
            generation_tokens: [0; 2],
            finished: [[0; 2]; 3],
            time_to_first_token: per_delivery(layout.time_to_first_token),
            inter_token_latency: Histogram::new(layout.inter_token_latency),
            time_per_output_token: per_delivery(layout.time_per_output_token),
            e2e_request_latency: per_delivery(layout.e2e_request_latency),
        }
    }

    pub fn finished(&self, reason: FinishReason, delivery: Delivery) -> u64 {
        self.finished[reason.slot()][delivery.slot()]
    }
}

/// Shared, thread-safe statistics of one engine.
pub struct EngineStats {
    inner: Mutex<StatsSnapshot>,
}

impl EngineStats {
    pub fn new(layout: HistogramLayout) -> Self {
        Self {
            inner: Mutex::new(StatsSnapshot::new(layout)),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.inner.lock().clone()
    }

    /// The first token is out: prefill of the prompt is done.
    pub fn record_first_token(
        &self,
        delivery: Delivery,
        prompt_tokens: u32,
        time_to_first_token: Duration,
    ) {
        let mut stats = self.inner.lock();
        stats.prompt_tokens[delivery.slot()] += u64::from(prompt_tokens);
        stats.generation_tokens[delivery.slot()] += 1;
        stats.time_to_first_token[delivery.slot()].observe(time_to_first_token.as_secs_f64());
    }

    pub fn record_next_token(&self, delivery: Delivery, since_previous_token: Duration) {
        let mut stats = self.inner.lock();
        stats.generation_tokens[delivery.slot()] += 1;
        stats
            .inter_token_latency
            .observe(since_previous_token.as_secs_f64());
    }

    /// A request ended. `decode` is (time from first to last token, tokens generated); the time
    /// per output token is only defined for requests with at least two tokens, as in vLLM.
    pub fn record_finished(
        &self,
        reason: FinishReason,
        delivery: Delivery,
        e2e_latency: Duration,
        decode: Option<(Duration, u32)>,
    ) {
        let mut stats = self.inner.lock();
        stats.finished[reason.slot()][delivery.slot()] += 1;
        if reason == FinishReason::Abort {
            return;
        }
        stats.e2e_request_latency[delivery.slot()].observe(e2e_latency.as_secs_f64());
        if let Some((decode_time, generated_tokens)) = decode
            && generated_tokens > 1
        {
            let per_token = decode_time.as_secs_f64() / f64::from(generated_tokens - 1);
            stats.time_per_output_token[delivery.slot()].observe(per_token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.1, 0.5, 1.0];

    #[test]
    fn histogram_buckets_are_cumulative_and_upper_inclusive() {
        let mut histogram = Histogram::new(BOUNDS);
        for value in [0.05, 0.1, 0.3, 2.0] {
            histogram.observe(value);
        }
        let buckets: Vec<_> = histogram.cumulative_buckets().collect();
        assert_eq!(
            buckets,
            vec![(0.1, 2), (0.5, 3), (1.0, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(histogram.count(), 4);
        assert!((histogram.sum() - 2.45).abs() < 1e-9);
    }

    #[test]
    fn aborted_requests_count_but_leave_latency_histograms_alone() {
        let layout = HistogramLayout {
            time_to_first_token: BOUNDS,
            inter_token_latency: BOUNDS,
            time_per_output_token: BOUNDS,
            e2e_request_latency: BOUNDS,
        };
        let stats = EngineStats::new(layout);
        stats.record_first_token(Delivery::Streamed, 7, Duration::from_millis(20));
        stats.record_next_token(Delivery::Streamed, Duration::from_millis(10));
        stats.record_finished(
            FinishReason::Abort,
            Delivery::Streamed,
            Duration::from_millis(30),
            Some((Duration::from_millis(10), 2)),
        );
        stats.record_finished(
            FinishReason::Length,
            Delivery::Unary,
            Duration::from_millis(300),
            Some((Duration::from_millis(200), 3)),
        );
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.prompt_tokens, [0, 7]);
        assert_eq!(snapshot.generation_tokens, [0, 2]);
        assert_eq!(
            snapshot.finished(FinishReason::Abort, Delivery::Streamed),
            1
        );
        assert_eq!(snapshot.finished(FinishReason::Length, Delivery::Unary), 1);
        assert_eq!(
            snapshot.e2e_request_latency[Delivery::Streamed.slot()].count(),
            0
        );
        assert_eq!(
            snapshot.e2e_request_latency[Delivery::Unary.slot()].count(),
            1
        );
        let tpot = &snapshot.time_per_output_token[Delivery::Unary.slot()];
        assert_eq!(tpot.count(), 1);
        assert!((tpot.sum() - 0.1).abs() < 1e-9);
    }
}
