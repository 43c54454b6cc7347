//! One request's output: the text the mock "generates", paced by the backend's token stream, and
//! the statistics that follow from when each token actually came out.

use std::sync::Arc;

use futures::StreamExt;
use tokio::time::Instant;

use super::backend::{Backend, GenerationRequest, TokenStream};
use super::stats::{Delivery, EngineStats, FinishReason};

/// Text pieces of a completion: the sentence naming model and pod, repeated or cut to exactly
/// `tokens` pieces (one word = one token). Every piece after the first carries its leading space,
/// as real tokenizers emit them, so concatenating the pieces gives the completion text.
pub fn completion_pieces(model: &str, pod: &str, tokens: u32) -> Vec<String> {
    let sentence = format!("This is simulated message from {model} on {pod}!");
    let words: Vec<&str> = sentence.split_whitespace().collect();
    (0..tokens as usize)
        .map(|index| {
            let word = words[index % words.len()];
            if index == 0 {
                word.to_string()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

/// Prompt length in tokens: whitespace-separated words, at least 1 (a real tokenizer always
/// yields at least a BOS token).
pub fn count_prompt_tokens<'a>(texts: impl IntoIterator<Item = &'a str>) -> u32 {
    let words: usize = texts
        .into_iter()
        .map(|text| text.split_whitespace().count())
        .sum();
    u32::try_from(words).unwrap_or(u32::MAX).max(1)
}

/// How long the output is and why it ends, from the engine's natural length and the request's
/// `max_tokens`: hitting the cap is `length`, ending before it is `stop`.
pub fn output_length(natural_tokens: u32, max_tokens: Option<u32>) -> (u32, FinishReason) {
    match max_tokens {
        Some(cap) if cap <= natural_tokens => (cap, FinishReason::Length),
        _ => (natural_tokens, FinishReason::Stop),
    }
}

/// Everything decided about a request before its first token.
#[derive(Clone, Debug)]
pub struct GenerationPlan {
    pub model: String,
    pub prompt_tokens: u32,
    /// One entry per output token.
    pub pieces: Vec<String>,
    pub finish_reason: FinishReason,
    pub delivery: Delivery,
}

/// One produced token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedToken {
    pub text: String,
    /// Set on the last token only.
    pub finish_reason: Option<FinishReason>,
}

/// A request in flight. Dropping it before the last token aborts the request: the backend
/// releases its load and the abort is counted.
pub struct Generation {
    /// `None` once the last token is out, so the backend counts the request as finished before
    /// the response's closing chunks are written.
    tokens: Option<TokenStream>,
    plan: GenerationPlan,
    produced: usize,
    stats: Arc<EngineStats>,
    arrived_at: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    finished: bool,
}

impl Generation {
    pub fn start(
        backend: &dyn Backend,
        stats: Arc<EngineStats>,
        plan: GenerationPlan,
        arrived_at: Instant,
    ) -> Self {
        let tokens = backend.admit(GenerationRequest {
            model: plan.model.clone(),
            prompt_tokens: plan.prompt_tokens,
            output_tokens: u32::try_from(plan.pieces.len()).unwrap_or(u32::MAX),
        });
        Self {
            tokens: Some(tokens),
            plan,
            produced: 0,
            stats,
            arrived_at,
            first_token_at: None,
            last_token_at: None,
            finished: false,
        }
    }

    /// The next token once the backend produced it; `None` after the last one.
    pub async fn next_token(&mut self) -> Option<GeneratedToken> {
        let tokens = self.tokens.as_mut()?;
        if tokens.next().await.is_none() {
            // The backend gave up early: report what was produced as an aborted request.
            self.tokens = None;
            self.finish(FinishReason::Abort);
            return None;
        }
        let now = Instant::now();
        match self.last_token_at {
            None => {
                self.first_token_at = Some(now);
                self.stats.record_first_token(
                    self.plan.delivery,
                    self.plan.prompt_tokens,
                    now - self.arrived_at,
                );
            }
            Some(previous) => self
                .stats
                .record_next_token(self.plan.delivery, now - previous),
        }
        self.last_token_at = Some(now);
        let text = self
            .plan
            .pieces
            .get(self.produced)
            .cloned()
            .unwrap_or_default();
        self.produced += 1;
        let is_last = self.produced >= self.plan.pieces.len();
        if is_last {
            self.tokens = None;
            self.finish(self.plan.finish_reason);
        }
        Some(GeneratedToken {
            text,
            finish_reason: is_last.then_some(self.plan.finish_reason),
        })
    }

    /// Waits for every token and returns the whole text.
    pub async fn collect_text(&mut self) -> String {
        let mut text = String::new();
        while let Some(token) = self.next_token().await {
            text.push_str(&token.text);
        }
        text
    }

    pub fn prompt_tokens(&self) -> u32 {
        self.plan.prompt_tokens
    }

    pub fn completion_tokens(&self) -> u32 {
        u32::try_from(self.produced).unwrap_or(u32::MAX)
    }

    pub fn finish_reason(&self) -> FinishReason {
        self.plan.finish_reason
    }

    fn finish(&mut self, reason: FinishReason) {
        if self.finished {
            return;
        }
        self.finished = true;
        let end = self.last_token_at.unwrap_or_else(Instant::now);
        let decode = self
            .first_token_at
            .map(|first| (end - first, self.completion_tokens()));
        self.stats
            .record_finished(reason, self.plan.delivery, end - self.arrived_at, decode);
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.finish(FinishReason::Abort);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mock_engine::backend::PacedBackend;
    use crate::mock_engine::metrics::VLLM_HISTOGRAMS;

    #[test]
    fn pieces_name_model_and_pod_and_concatenate_to_the_sentence() {
        let pieces = completion_pieces("llama", "pod-a", 7);
        assert_eq!(pieces.concat(), "This is simulated message from llama on");
        let pieces = completion_pieces("llama", "pod-a", 10);
        assert_eq!(
            pieces.concat(),
            "This is simulated message from llama on pod-a! This is"
        );
        assert_eq!(pieces[1], " is");
        assert_eq!(completion_pieces("m", "p", 1), vec!["This".to_string()]);
    }

    #[test]
    fn prompt_tokens_count_words_and_never_zero() {
        assert_eq!(count_prompt_tokens(["Say hello.", "You are  terse."]), 5);
        assert_eq!(count_prompt_tokens([""]), 1);
        assert_eq!(count_prompt_tokens([]), 1);
    }

    #[test]
    fn max_tokens_caps_the_output_and_sets_the_finish_reason() {
        assert_eq!(output_length(16, None), (16, FinishReason::Stop));
        assert_eq!(output_length(16, Some(40)), (16, FinishReason::Stop));
        assert_eq!(output_length(16, Some(16)), (16, FinishReason::Length));
        assert_eq!(output_length(16, Some(4)), (4, FinishReason::Length));
    }

    fn plan(tokens: u32) -> GenerationPlan {
        GenerationPlan {
            model: "m".into(),
            prompt_tokens: 3,
            pieces: completion_pieces("m", "p", tokens),
            finish_reason: FinishReason::Length,
            delivery: Delivery::Streamed,
        }
    }

    #[tokio::test]
    async fn finished_generation_counts_tokens_and_success() {
        let backend = PacedBackend::new(Duration::ZERO, Duration::ZERO, 100);
        let stats = Arc::new(EngineStats::new(VLLM_HISTOGRAMS));
        let mut generation = Generation::start(&backend, stats.clone(), plan(3), Instant::now());
        assert_eq!(backend.load().running, 1);
        let first = generation.next_token().await;
        assert_eq!(
            first,
            Some(GeneratedToken {
                text: "This".into(),
                finish_reason: None
            })
        );
        generation.next_token().await;
        let last = generation.next_token().await;
        assert_eq!(
            last.and_then(|token| token.finish_reason),
            Some(FinishReason::Length)
        );
        // The request is over for the engine as soon as its last token is out.
        assert_eq!(backend.load().running, 0);
        assert_eq!(generation.next_token().await, None);
        drop(generation);

        let snapshot = stats.snapshot();
        assert_eq!(snapshot.prompt_tokens[Delivery::Streamed.slot()], 3);
        assert_eq!(snapshot.generation_tokens[Delivery::Streamed.slot()], 3);
        assert_eq!(
            snapshot.finished(FinishReason::Length, Delivery::Streamed),
            1
        );
        assert_eq!(
            snapshot.finished(FinishReason::Abort, Delivery::Streamed),
            0
        );
        assert_eq!(snapshot.inter_token_latency.count(), 2);
    }

    #[tokio::test]
    async fn dropped_generation_counts_as_aborted_and_frees_the_engine() {
        let backend = PacedBackend::new(Duration::ZERO, Duration::ZERO, 100);
        let stats = Arc::new(EngineStats::new(VLLM_HISTOGRAMS));
        let mut generation = Generation::start(&backend, stats.clone(), plan(3), Instant::now());
        generation.next_token().await;
        drop(generation);
        assert_eq!(backend.load().running, 0);
        let snapshot = stats.snapshot();
        assert_eq!(
            snapshot.finished(FinishReason::Abort, Delivery::Streamed),
            1
        );
        assert_eq!(
            snapshot.finished(FinishReason::Length, Delivery::Streamed),
            0
        );
    }
}
