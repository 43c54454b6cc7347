//! Fixtures shared by the hot-path benchmark and the allocation guard, so
//! both measure the same request bodies and snapshot shapes.
#![forbid(unsafe_code)]

pub mod route_churn;
pub mod scale;

use bytes::Bytes;
use switchyard_snapshot::pb;
use switchyard_snapshot::test_builders as builders;

/// A non-streamed chat answer an engine sends.
pub const CHAT_RESPONSE: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}"#;
/// One token of a streamed chat answer: one SSE event.
pub const STREAM_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},\"finish_reason\":null}]}\n\n";
/// The end of a streamed chat answer: the usage event and `[DONE]`.
pub const STREAM_TAIL: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":64,\"total_tokens\":314}}\n\ndata: [DONE]\n\n";

/// A chat request for `bench-model` whose user message has `prompt_bytes` bytes.
pub fn chat_body(prompt_bytes: usize, stream: bool) -> Bytes {
    let prompt = "lorem ipsum dolor sit amet ".repeat(prompt_bytes / 27 + 1);
    Bytes::from(format!(
        r#"{{"model":"bench-model","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{}"}}],"temperature":0.7,"max_tokens":256{}}}"#,
        &prompt[..prompt_bytes],
        if stream { r#","stream":true"# } else { "" }
    ))
}

/// Namespace of the benchmark snapshot's objects.
pub const NAMESPACE: &str = "bench";
/// ModelServers in the benchmark snapshot besides the candidates, and the pods of each: the
/// route lookup and the pod pick must not depend on them.
pub const OTHER_SERVERS: usize = 200;
pub const PODS_PER_OTHER_SERVER: usize = 20;

/// The benchmark snapshot: the route `chat` sends model `bench-model` to the ModelServer
/// `candidates` with `candidate_pods` pods; [`OTHER_SERVERS`] other routes and servers of
/// [`PODS_PER_OTHER_SERVER`] pods sit beside it. With `premium_rule`, `chat` first has a rule
/// for the header `user-type: premium` (to another server), which every lookup evaluates.
pub fn snapshot(candidate_pods: usize, premium_rule: bool) -> pb::RouteConfig {
    let mut chat = builders::route_in(NAMESPACE, "chat", "bench-model", "candidates");
    let mut servers = vec![server("candidates", candidate_pods, 0x0a00_0001)];
    let mut routes = Vec::new();
    for s in 0..OTHER_SERVERS {
        let name = format!("other-{s:03}");
        let first_ip = 0x0b00_0001 + (s * PODS_PER_OTHER_SERVER) as u32;
        servers.push(server(&name, PODS_PER_OTHER_SERVER, first_ip));
        routes.push(builders::route_in(
            NAMESPACE,
            &format!("r-{s}"),
            &format!("model-{s}"),
            &name,
        ));
    }
    if premium_rule {
        let premium = builders::rule(
            "premium",
            Some(builders::header_exact("user-type", "premium")),
            &[(&format!("{NAMESPACE}/{}", servers[1].name), 100)],
        );
        chat.rules.insert(0, premium);
    }
    routes.insert(0, chat);
    servers.sort_by(|a, b| a.name.cmp(&b.name));
    builders::route_config(routes, servers)
}

/// A ModelServer in [`NAMESPACE`] with `pods` pods from `first_ip` up.
pub fn server(name: &str, pods: usize, first_ip: u32) -> pb::ModelServer {
    let pods = (0..pods)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(first_ip + i as u32).to_string();
            builders::pod(&format!("{name}-pod-{i}"), &ip)
        })
        .collect();
    builders::server_in(NAMESPACE, name, pods)
}
