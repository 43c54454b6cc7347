//! Fixtures shared by the hot-path benchmark and the allocation guard, so
//! both measure the same request bodies and snapshot shapes.
#![forbid(unsafe_code)]

use bytes::Bytes;
use switchyard_snapshot::pb;

/// A chat request for `bench-model` whose user message has `prompt_bytes` bytes.
pub fn chat_body(prompt_bytes: usize, stream: bool) -> Bytes {
    let prompt = "lorem ipsum dolor sit amet ".repeat(prompt_bytes / 27 + 1);
    Bytes::from(format!(
        r#"{{"model":"bench-model","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{}"}}],"temperature":0.7,"max_tokens":256{}}}"#,
        &prompt[..prompt_bytes],
        if stream { r#","stream":true"# } else { "" }
    ))
}

/// A ModelServer in namespace `bench` with `pods` endpoints from `first_ip` up.
pub fn server(name: &str, pods: usize, first_ip: u32) -> pb::ModelServer {
    pb::ModelServer {
        namespace: "bench".into(),
        name: name.into(),
        inference_engine: "vLLM".into(),
        port: 8000,
        endpoints: (0..pods)
            .map(|i| pb::Endpoint {
                name: format!("{name}-pod-{i}"),
                ip: std::net::Ipv4Addr::from(first_ip + i as u32).to_string(),
            })
            .collect(),
        ..Default::default()
    }
}
