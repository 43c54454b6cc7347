//! Phase `admission`: may this identity's request go upstream now? The place
//! for rate limits and the fairness queue; until those exist every
//! authenticated request is admitted at once, and nothing waits here.

use super::admit::InferenceRequest;
use super::authenticate::Identity;
use crate::error::ApiError;

/// Admits the request now, or says why not.
pub async fn admission(_identity: &Identity, _request: &InferenceRequest) -> Result<(), ApiError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::inference_request;

    #[tokio::test(start_paused = true)]
    async fn admits_at_once_without_limits() {
        let request = inference_request("/v1/completions", r#"{"model":"m","prompt":"hi"}"#);
        let started = tokio::time::Instant::now();
        assert_eq!(admission(&Identity::Anonymous, &request).await, Ok(()));
        assert_eq!(
            started.elapsed(),
            std::time::Duration::ZERO,
            "nothing waits"
        );
    }
}
