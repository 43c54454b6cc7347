//! Phase `schedule`: ranks the chosen ModelServer's pods (or, when it
//! disaggregates prefill and decode, its pairs) for this request with the
//! snapshot's [`Scheduler`] (filter and score plugins, top-N), and names the
//! request (the id the engine, the client and the logs share).

use http::HeaderValue;

use super::admit::InferenceRequest;
use super::log::RequestRecord;
use super::route::Routed;
use crate::error::{ApiError, ErrorKind};
use crate::pod::PodState;
use crate::request_id::ClientRequestId;
use crate::routing::PrefillDecode;
use crate::scheduling::{PairRanking, Ranking, ScheduleError, ScheduleRequest, Scheduler};

/// The candidates of one request, best first: pods, or prefill/decode pairs.
#[derive(Debug)]
pub struct Scheduled<R = Ranking> {
    pub ranking: R,
    /// The prompt's block hashes, when a plugin uses them (else empty).
    pub prompt_hashes: Vec<u64>,
    /// The client's `x-request-id`, or one generated for it.
    pub request_id: HeaderValue,
}

/// Ranks the pods of `routed`'s ModelServer for `request`.
pub fn schedule(
    scheduler: &Scheduler,
    request: &InferenceRequest,
    routed: &Routed,
    record: &mut RequestRecord,
) -> Result<Scheduled, ApiError> {
    scheduled(scheduler, request, routed, record, |schedule_request| {
        scheduler.schedule(&routed.decision.server, schedule_request)
    })
}

/// Ranks the prefill/decode pairs of `routed`'s ModelServer (`pd`) for `request`.
pub fn schedule_pairs(
    scheduler: &Scheduler,
    request: &InferenceRequest,
    routed: &Routed,
    pd: &PrefillDecode,
    record: &mut RequestRecord,
) -> Result<Scheduled<PairRanking>, ApiError> {
    scheduled(scheduler, request, routed, record, |schedule_request| {
        scheduler.schedule_pairs(&routed.decision.server, pd, schedule_request)
    })
}

fn scheduled<R>(
    scheduler: &Scheduler,
    request: &InferenceRequest,
    routed: &Routed,
    record: &mut RequestRecord,
    rank: impl FnOnce(&ScheduleRequest<'_>) -> Result<R, ScheduleError>,
) -> Result<Scheduled<R>, ApiError> {
    let model = &request.parsed.model;
    // From the body as the client sent it: the prompt span's offsets are its.
    let prompt_hashes =
        scheduler.prompt_hashes(model, &request.body, request.parsed.prompt_span.as_ref());
    // Named here, as the request is committed to an engine: the log of a
    // request refused earlier carries only the client's own id.
    let request_id = ClientRequestId::of(&request.head.headers).or_generate();
    record.set_request_id(&request_id);
    let ranking = rank(&ScheduleRequest {
        model,
        served_model: routed.served_model(model),
        headers: &request.head.headers,
        prompt_hashes: &prompt_hashes,
        request_id: request_id.to_str().unwrap_or_default(),
    })
    .map_err(|error| ApiError::new(ErrorKind::NoReadyPod, error.to_string()))?;
    Ok(Scheduled {
        ranking,
        prompt_hashes,
        request_id,
    })
}

/// `pod` accepted the request (for a pair: its prefill pod, where the
/// prompt's KV is computed): plugins that learn from placements (the prefix
/// index) remember it.
pub fn dispatched<R>(scheduler: &Scheduler, scheduled: &Scheduled<R>, pod: &PodState) {
    scheduler.on_dispatched(pod.id, &scheduled.prompt_hashes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::route::route;
    use crate::proxy::testing::{inference_request, one_route_store, test_record};
    use crate::request_id::REQUEST_ID_HEADER;

    fn scheduled(request: &InferenceRequest, pods: usize) -> Result<Scheduled, ApiError> {
        let store = one_route_store("m", &[], None, pods);
        let table = store.table().expect("a snapshot");
        let mut record = test_record();
        let routed = route(&table, request, 0, &mut record).expect("routed");
        schedule(&table.scheduler, request, &routed, &mut record)
    }

    #[test]
    fn ranks_the_servers_pods_and_keeps_the_clients_request_id() {
        let prompt = "a long shared system prompt ".repeat(100);
        let mut request = inference_request(
            "/v1/completions",
            &format!(r#"{{"model":"m","prompt":"{prompt}"}}"#),
        );
        request
            .head
            .headers
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("client-7"));
        let scheduled = scheduled(&request, 3).expect("scheduled");
        assert_eq!(scheduled.ranking.len(), 3);
        assert_eq!(scheduled.request_id, "client-7");
        assert!(
            !scheduled.prompt_hashes.is_empty(),
            "the default plugins include prefix-cache"
        );
    }

    #[test]
    fn generates_a_request_id_when_the_client_sent_none_or_an_empty_one() {
        let mut request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        let generated = scheduled(&request, 1).expect("scheduled").request_id;
        assert_eq!(generated.len(), 36, "UUID-shaped: {generated:?}");
        request
            .head
            .headers
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static(""));
        assert_eq!(
            scheduled(&request, 1).expect("scheduled").request_id.len(),
            36
        );
        let long = "r".repeat(200_000);
        request.head.headers.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_str(&long).expect("header value"),
        );
        assert_eq!(
            scheduled(&request, 1).expect("scheduled").request_id.len(),
            36,
            "an overlong id is replaced"
        );
    }

    #[test]
    fn a_server_without_pods_is_no_ready_pod() {
        let request = inference_request("/v1/completions", r#"{"model":"m"}"#);
        let error = scheduled(&request, 0).expect_err("no pods");
        assert_eq!(error.kind, ErrorKind::NoReadyPod);
    }
}
