//! Phase `route`: which ModelRoute, rule and ModelServer serve the request
//! (looked up in the snapshot's [`RouteIndex`](crate::routing::RouteIndex),
//! on the Gateway listener the request came through; else an HTTPRoute),
//! and how its body must change on the way: the ModelServer's model name
//! instead of the client's, and `include_usage` on streams so the router can
//! count tokens. The edits are applied once, when the upstream request is
//! built, so the scheduler still sees the body's original byte offsets.

use bytes::Bytes;

use super::admit::InferenceRequest;
use super::log::RequestRecord;
use crate::error::{ApiError, ErrorKind, quoted};
use crate::gateway::http_routes::HttpRequestFacts;
use crate::gateway::{Arrival, Gateways, request_host};
use crate::request::{Edit, apply_edits};
use crate::routing::{ArrivalFacts, ListenerId, RequestFacts, RouteDecision};
use crate::snapshot::RoutingTable;

/// Paths whose streams report usage only when asked (`include_usage`).
const USAGE_OPTION_PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// Where the request goes and what changes in its body.
#[derive(Debug)]
pub struct Routed {
    pub decision: RouteDecision,
    /// Splices into the client's body, applied by [`Routed::edited_body`].
    edits: Vec<Edit>,
    /// The router added `include_usage`, so the usage-only chunk the engine
    /// sends because of it must not reach the client.
    pub hide_usage_chunk: bool,
}

impl Routed {
    /// The model a pod must serve: the ModelServer's upstream name, or the
    /// request's own for a LoRA adapter (adapters are not renamed).
    pub fn served_model<'a>(&'a self, requested: &'a str) -> &'a str {
        match (&self.decision.server.model_rewrite, self.decision.is_lora) {
            (Some(upstream), false) => upstream,
            _ => requested,
        }
    }

    /// `body` with the edits applied (the same bytes, uncopied, when none).
    pub fn edited_body(&mut self, body: Bytes) -> Bytes {
        apply_edits(body, &mut self.edits)
    }

    /// The edits, for a forwarding shape that applies them to several bodies.
    pub fn take_edits(&mut self) -> Vec<Edit> {
        std::mem::take(&mut self.edits)
    }

    /// The ModelServer's model name as a JSON string, when it replaces the
    /// request's (never for a LoRA adapter).
    pub fn model_literal(&self) -> Option<&Bytes> {
        match (
            &self.decision.server.model_rewrite_literal,
            self.decision.is_lora,
        ) {
            (Some(literal), false) => Some(literal),
            _ => None,
        }
    }
}

/// Routes `request` with `table`: a ModelRoute serving its model on the
/// listener it came through, else an HTTPRoute of that listener. A request
/// the server marked with no [`Arrival`] came through the traffic port
/// `traffic_port` (the traffic workers mark none: an extension would be an
/// allocation per request).
pub fn route(
    table: &RoutingTable,
    request: &InferenceRequest,
    traffic_port: u16,
    record: &mut RequestRecord,
) -> Result<Routed, ApiError> {
    let model = &request.parsed.model;
    let arrival = request
        .head
        .extensions
        .get::<Arrival>()
        .copied()
        .unwrap_or(Arrival::TrafficPort(traffic_port));
    let gateways = &table.gateways;
    // Without Gateways, no host to read: the common case costs nothing.
    let host = if gateways.listeners.is_empty() {
        String::new()
    } else {
        request_host(&request.head)
    };
    let facts = ArrivalFacts {
        on_traffic_port: matches!(arrival, Arrival::TrafficPort(_)),
        listener: gateways.resolve(arrival, &host),
    };
    let by_model = table.index.lookup(&RequestFacts {
        model,
        path: request.head.uri.path(),
        headers: &request.head.headers,
        arrival: facts,
    });
    let decision = match by_model {
        Some(decision) => decision,
        None => http_route(gateways, request, &host, facts.listener)?.ok_or_else(|| {
            ApiError::new(
                ErrorKind::RouteNotFound,
                format!("route not found for model {}", quoted(model)),
            )
        })?,
    };
    record.set_route(model, &decision);
    let mut edits = Vec::new();
    // Only the OpenAI chat and completions APIs take `stream_options`; the
    // Responses and Messages APIs report usage in their streams unasked.
    let usage_edit = USAGE_OPTION_PATHS
        .contains(&request.head.uri.path())
        .then(|| request.parsed.include_usage_edit(&request.body))
        .flatten();
    let hide_usage_chunk = usage_edit.is_some();
    edits.extend(usage_edit);
    let mut routed = Routed {
        decision,
        edits,
        hide_usage_chunk,
    };
    if let Some(literal) = routed.model_literal().cloned() {
        routed.edits.push(Edit {
            range: request.parsed.model_span.clone(),
            replacement: literal,
        });
    }
    Ok(routed)
}

/// The HTTPRoute rule of `listener` that takes `request`, as a decision.
fn http_route(
    gateways: &Gateways,
    request: &InferenceRequest,
    host: &str,
    listener: Option<ListenerId>,
) -> Result<Option<RouteDecision>, ApiError> {
    if gateways.http_routes.is_empty() {
        return Ok(None);
    }
    let uri = &request.head.uri;
    let Some(decision) = gateways.http_routes.lookup(&HttpRequestFacts {
        listener,
        host,
        method: &request.head.method,
        path: uri.path(),
        query: uri.query().unwrap_or_default(),
        headers: &request.head.headers,
    }) else {
        return Ok(None);
    };
    let Some(pool) = decision.pool else {
        // The Gateway API's answer to a rule without a usable backend.
        return Err(ApiError::new(
            ErrorKind::NoBackend,
            format!(
                "HTTPRoute {} rule {} has no backend with a positive weight",
                decision.route.key, decision.rule_index
            ),
        ));
    };
    Ok(Some(RouteDecision {
        route: decision.route,
        rule_index: decision.rule_index,
        server: pool,
        failed_over_from: None,
        is_lora: false,
        rewrite: decision.rewrite,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{inference_request, one_route_store, test_record};

    fn route_one(
        body: &'static str,
        model_rewrite: Option<&str>,
    ) -> (Result<Routed, ApiError>, InferenceRequest) {
        let store = one_route_store("m", &["ad-1"], model_rewrite, 1);
        let table = store.table().expect("a snapshot");
        let request = inference_request("/v1/chat/completions", body);
        let mut record = test_record();
        (route(&table, &request, 0, &mut record), request)
    }

    #[test]
    fn rewrites_the_model_to_the_servers_name() {
        let (result, request) = route_one(r#"{"model":"m","messages":[]}"#, Some("org/big-m"));
        let mut routed = result.expect("routed");
        assert_eq!(routed.decision.route.key, "default/r");
        assert_eq!(routed.served_model("m"), "org/big-m");
        assert!(!routed.hide_usage_chunk);
        assert_eq!(
            routed.edited_body(request.body),
            r#"{"model":"org/big-m","messages":[]}"#
        );
    }

    #[test]
    fn lora_adapters_keep_their_name() {
        let (result, request) = route_one(r#"{"model":"ad-1"}"#, Some("org/big-m"));
        let mut routed = result.expect("routed");
        assert!(routed.decision.is_lora);
        assert_eq!(routed.served_model("ad-1"), "ad-1");
        let body = request.body.clone();
        let edited = routed.edited_body(request.body);
        assert_eq!(
            edited.as_ptr(),
            body.as_ptr(),
            "nothing to edit: not copied"
        );
    }

    #[test]
    fn streams_get_include_usage_and_hide_its_chunk() {
        let (result, request) = route_one(r#"{"model":"m","stream":true}"#, None);
        let mut routed = result.expect("routed");
        assert!(routed.hide_usage_chunk);
        assert_eq!(
            routed.edited_body(request.body),
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        let (result, _) = route_one(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            None,
        );
        assert!(
            !result.expect("routed").hide_usage_chunk,
            "the client asked for it"
        );
    }

    #[test]
    fn an_unknown_model_is_route_not_found() {
        let (result, _) = route_one(r#"{"model":"other"}"#, None);
        let error = result.expect_err("no route");
        assert_eq!(error.kind, ErrorKind::RouteNotFound);
        assert_eq!(error.message, r#"route not found for model "other""#);
    }
}
