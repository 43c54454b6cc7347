//! The properties: what must hold for any input, not only well-formed ones.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;
use serde_json::value::RawValue;
use switchyard_controller::compile::gateway_api::DEFAULT_CONTROLLER_NAME;
use switchyard_controller::compile::{CompileInput, GatewayApiConfig, ObjectSet, compile};
use switchyard_controller::local::parse_documents;
use switchyard_controller::outlier::ReportedEjections;
use switchyard_controller::router_config::RouterConfig;
use switchyard_controller::scrape::{prometheus_text, sglang, vllm};
use switchyard_dataplane::json_members::{Scan, top_level_members};
use switchyard_dataplane::request::{MAX_MODEL_BYTES, apply_edits, parse_body};
use switchyard_dataplane::response::ResponseObserver;
use switchyard_dataplane::snapshot::SnapshotStore;
use switchyard_snapshot::{pb, test_builders as builders};

use crate::Harness;

/// Every harness, in the order `make fuzz` runs them.
pub fn all() -> Vec<Harness> {
    vec![
        request_body(),
        json_members(),
        json_strings(),
        response_observer(),
        prometheus(),
        local_objects(),
        snapshot(),
    ]
}

/// The request-body parser: never panics; what it reads is what the body
/// says; the edits it makes keep the body valid JSON.
pub fn request_body() -> Harness {
    Harness {
        name: "request-body",
        seeds: vec![
            include_bytes!("../../testdata/vllm/chat_completion.request.json").to_vec(),
            include_bytes!("../../testdata/vllm/chat_completion_stream.request.json").to_vec(),
            br#"{"model":"m","prompt":"hi","stream":true,"stream_options":{"continuous_usage_stats":false}}"#.to_vec(),
            br#"{"model":"a\"b\u00e9","input":[{"role":"user","content":"x"}],"stream":true,"stream_options":null}"#.to_vec(),
        ],
        dictionary: vec![
            b"\"model\":", b"\"stream\":true", b"\"stream_options\":", b"{\"include_usage\":true}",
            b"\"messages\":[", b"\\u0000", b"\\ud800", b"\\\"", b"1e999", b"null", b"[[[[", b"]]]]",
            b"{", b"}", b",", b"\xff", b"\xc3\xa9",
        ],
        check: check_request_body,
    }
}

fn check_request_body(input: &[u8]) {
    let Ok(parsed) = parse_body(input) else {
        return;
    };
    assert!(
        !parsed.model.trim().is_empty(),
        "an empty model was accepted"
    );
    assert!(
        parsed.model.len() <= MAX_MODEL_BYTES,
        "an overlong model was accepted"
    );
    let literal = &input[parsed.model_span.clone()];
    let decoded: String = serde_json::from_slice(literal).expect("the model span is a JSON string");
    assert_eq!(decoded, parsed.model, "the span holds the model");
    let body = Bytes::copy_from_slice(input);
    let mut edits: Vec<_> = parsed.include_usage_edit(&body).into_iter().collect();
    if edits.is_empty() {
        return;
    }
    let edited = apply_edits(body, &mut edits);
    let reparsed = parse_body(&edited).expect("an edited body still parses");
    assert!(reparsed.include_usage, "the edit asks for usage");
    assert_eq!(
        reparsed.model, parsed.model,
        "the edit leaves the model alone"
    );
}

/// The JSON member scan that request bodies are read with: whatever it
/// accepts, serde_json accepts too, and the byte ranges it gives are exactly
/// the values serde_json finds there (what it refuses is read by serde_json
/// itself, so the answers never differ).
pub fn json_members() -> Harness {
    Harness {
        name: "json-members",
        seeds: vec![
            include_bytes!("../../testdata/vllm/chat_completion.request.json").to_vec(),
            include_bytes!("../../testdata/vllm/chat_completion.response.json").to_vec(),
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a\"b"}]}],"usage":null}"#.to_vec(),
            br#"[{"role":"system","content":"x\u00e9\n"},{"content":null,"role":"user"}]"#.to_vec(),
            br#" {"choices" : [ ], "usage":{"prompt_tokens":1,"total_tokens":-2.5e+3},"n":[true,false,null,{}]} "#.to_vec(),
        ],
        dictionary: vec![
            b"\"model\":", b"\"messages\":", b"\"usage\":", b"\"choices\":", b"\"role\":", b"\"content\":",
            b"\\u0000", b"\\ud800", b"\\u12", b"\\\"", b"\\", b"\x1f", b"01", b"-", b"1e999", b".5", b"null",
            b"tru", b"[[[[", b"]]]]", b"{", b"}", b"[", b"]", b",", b":", b"\"", b" ", b"\xc3\xa9",
        ],
        check: check_json_members,
    }
}

fn check_json_members(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    const KEYS: [&[u8]; 5] = [b"model", b"messages", b"usage", b"choices", b"role"];
    let mut spans = [const { None }; 5];
    if top_level_members(text, &KEYS, &mut spans).is_ok() {
        let members: BTreeMap<String, &RawValue> =
            serde_json::from_str(text).expect("serde_json reads what the scan accepted");
        for (key, span) in KEYS.iter().zip(&spans) {
            let key = String::from_utf8_lossy(key);
            assert_eq!(
                span.clone().map(|span| &text[span]),
                members.get(key.as_ref()).map(|value| value.get()),
                "member {key}"
            );
        }
    }
}

/// The string decoder prompt hashing reads message texts with, and the
/// character count token estimates use: a string it accepts is one
/// serde_json accepts, with the same text and as many characters; one
/// serde_json decodes it accepts too; the cursor ends just past the string.
pub fn json_strings() -> Harness {
    Harness {
        name: "json-strings",
        seeds: vec![
            br#""plain text""#.to_vec(),
            br#""caf\u00e9 \"quoted\"\nline\ttab \\ \/ \b\f\r""#.to_vec(),
            br#""\ud83d\ude00 \u4e2d\u6587 \u0041""#.to_vec(),
            "\"raw UTF-8: café, 中文\"".as_bytes().to_vec(),
        ],
        dictionary: vec![
            b"\\u",
            b"\\ud83d",
            b"\\ude00",
            b"\\udbff\\udfff",
            b"\\u00",
            b"\\",
            b"\\n",
            b"\\\"",
            b"\"",
            b"\x1f",
            b"\x7f",
            b"\xc3\xa9",
            b"\xff",
            b"DFFF",
            b"g",
        ],
        check: check_json_strings,
    }
}

fn check_json_strings(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let mut scan = Scan::new(input);
    scan.whitespace();
    let mut decoded = Vec::new();
    let scanned = scan.text(&mut decoded).map(<[u8]>::to_vec);
    // serde_json reads a whole document: the string, then whitespace only.
    let whole_document = scanned.is_ok() && scan.end().is_ok();
    let mut counting = Scan::new(input);
    counting.whitespace();
    let counted = counting.text_characters();
    match serde_json::from_str::<String>(text) {
        Ok(expected) => {
            assert_eq!(
                scanned.ok().as_deref(),
                Some(expected.as_bytes()),
                "a string serde_json decodes is decoded alike"
            );
            assert_eq!(
                counted.ok(),
                Some(expected.chars().count() as u64),
                "its characters are counted alike"
            );
        }
        Err(error) => assert!(
            !whole_document,
            "accepted a string serde_json refuses ({error})"
        ),
    }
}

/// The response observer: output does not depend on how the body is cut
/// into frames; nothing is changed unless a usage chunk is to be hidden.
pub fn response_observer() -> Harness {
    Harness {
        name: "response-observer",
        seeds: vec![
            framed(0, include_bytes!("../../testdata/vllm/chat_completion_stream.sse")),
            framed(1, include_bytes!("../../testdata/vllm/chat_completion_stream.sse")),
            framed(2, include_bytes!("../../testdata/vllm/chat_completion.response.json")),
            framed(1, b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\n\n"),
        ],
        dictionary: vec![
            b"\n\n", b"\r\n\r\n", b"\n", b"data: ", b"\"usage\":", b"{\"prompt_tokens\":1,\"completion_tokens\":2}",
            b"\"choices\":[]", b"data: [DONE]\n\n", b": keep-alive\n\n", b"event: x\n",
        ],
        check: check_response_observer,
    }
}

/// An observer input: a mode byte (SSE, SSE hiding usage, JSON) and a body.
fn framed(mode: u8, body: &[u8]) -> Vec<u8> {
    let mut input = vec![mode, 7];
    input.extend_from_slice(body);
    input
}

fn observe(is_stream: bool, hide: bool, frames: &[&[u8]]) -> (Vec<u8>, Option<(u64, u64)>) {
    let mut observer = ResponseObserver::new(is_stream, hide);
    let mut out = Vec::new();
    for frame in frames {
        if let Some(forwarded) = observer.on_data(Bytes::copy_from_slice(frame)) {
            out.extend_from_slice(&forwarded);
        }
    }
    if let Some(rest) = observer.finish() {
        out.extend_from_slice(&rest);
    }
    let usage = observer
        .usage()
        .map(|usage| (usage.prompt_tokens, usage.completion_tokens));
    (out, usage)
}

fn check_response_observer(input: &[u8]) {
    let [mode, step, body @ ..] = input else {
        return;
    };
    let (is_stream, hide) = match mode % 3 {
        0 => (true, false),
        1 => (true, true),
        _ => (false, false),
    };
    let step = usize::from(*step).max(1);
    let frames: Vec<&[u8]> = body.chunks(step).collect();
    let (whole, whole_usage) = observe(is_stream, hide, &[body]);
    let (cut, cut_usage) = observe(is_stream, hide, &frames);
    assert_eq!(whole, cut, "output depends on the framing");
    assert_eq!(whole_usage, cut_usage, "usage depends on the framing");
    if !hide {
        assert_eq!(whole, body, "nothing to hide, yet the body changed");
    } else {
        assert!(whole.len() <= body.len(), "hiding added bytes");
    }
}

/// The Prometheus text parser and the engine pages read with it: never
/// panic, and the streaming reader agrees with the whole-page parse.
pub fn prometheus() -> Harness {
    Harness {
        name: "prometheus-text",
        seeds: vec![
            include_bytes!("../../testdata/vllm/metrics_idle.txt").to_vec(),
            include_bytes!("../../testdata/vllm/metrics_during_load.txt")[..16 * 1024].to_vec(),
            b"sglang:num_running_reqs{model_name=\"m\"} 3\nsglang:num_queue_reqs{model_name=\"m\"} 1\nsglang:token_usage 0.5\n".to_vec(),
            b"# HELP x y\n# TYPE x gauge\nx{a=\"1\",b=\"\\\"q\\\\\\n\"} -Inf 1700000000\n".to_vec(),
        ],
        dictionary: vec![
            b"{", b"}", b"=", b"\"", b"\\", b",", b"\n", b" ", b"NaN", b"+Inf", b"-Inf", b"1e308",
            b"# TYPE ", b"# HELP ", b"vllm:num_requests_running", b"_bucket{le=\"", b"\xff",
        ],
        check: check_prometheus,
    }
}

fn check_prometheus(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let parsed = prometheus_text::parse(text);
    let streamed: Vec<_> = prometheus_text::samples(text).collect();
    if let Ok(samples) = &parsed {
        assert_eq!(samples.len(), streamed.len(), "the two readers disagree");
        for sample in samples {
            let _ = sample.labels().count();
        }
    }
    let _ = vllm::parse_page(text);
    let _ = sglang::parse_page(text);
}

/// The local-mode loader and the compile behind it: never panic, and every
/// snapshot the controller compiles is one a dataplane accepts.
pub fn local_objects() -> Harness {
    Harness {
        name: "local-objects",
        seeds: vec![
            include_bytes!("../../config/demo/routes.yaml").to_vec(),
            include_bytes!("../../config/demo/modelservers.yaml").to_vec(),
            include_bytes!("../../config/demo/pods.yaml").to_vec(),
            include_bytes!("../../testdata/kthena/examples/LLM-Mock-ds1.5b-Canary.yaml").to_vec(),
            [
                &include_bytes!("../../config/demo/routes.yaml")[..],
                b"\n---\n",
                &include_bytes!("../../config/demo/modelservers.yaml")[..],
                b"\n---\n",
                &include_bytes!("../../config/demo/pods.yaml")[..],
            ]
            .concat(),
        ],
        dictionary: vec![
            b"\n---\n",
            b"regex: \"",
            b"(a+)+$",
            b"weight: ",
            b"4294967296",
            b"-1",
            b"prefix: ",
            b"exact: ",
            b"modelName: ",
            b"loraAdapters: [",
            b"timeout: ",
            b"999999h",
            b"0.5s",
            b"port: ",
            b"65536",
            b"matchLabels: {",
            b"&a ",
            b"*a",
            b"!!binary ",
            b"~",
            b"\t",
        ],
        check: check_local_objects,
    }
}

fn check_local_objects(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let mut objects = ObjectSet::default();
    parse_documents("fuzz.yaml", &text, &mut objects);
    // Gateway API mode on: its objects must compile to what dataplanes accept too.
    let gateway_api = GatewayApiConfig {
        enabled: true,
        inference_extension: true,
        controller_name: DEFAULT_CONTROLLER_NAME.to_owned(),
        default_gateway: Some(("default".to_owned(), "default".to_owned())),
    };
    let compiled = compile(&CompileInput {
        objects: &objects,
        gateway_api: &gateway_api,
        router: &RouterConfig::default(),
        jwks_keys: &[],
        pod_loads: &BTreeMap::new(),
        ejections: &ReportedEjections::new(),
        now_unix_ms: 0,
        // Providers with credentials compile too, so the dataplane's checks of them are fuzzed.
        ship_credentials: true,
    });
    let store = SnapshotStore::new();
    if let Err(error) = store.apply_route_config("fuzz", compiled.route_config) {
        panic!("the dataplane refuses what the controller compiled: {error}");
    }
}

/// Snapshot validation on the dataplane: any RouteConfig or EndpointLoads
/// that decodes is applied or refused, never a panic; a refusal keeps the
/// table that was in use.
pub fn snapshot() -> Harness {
    let mut tiered = builders::route_config(
        vec![builders::route_with_rules(
            "r",
            "m",
            vec![
                builders::rule(
                    "gold",
                    Some(builders::header_exact("x-tier", "gold")),
                    &[("default/s", 70), ("default/t", 30)],
                ),
                builders::rule("rest", None, &[("default/t", 100)]),
            ],
        )],
        vec![
            builders::server("s", &[("s-0", "10.0.0.1"), ("s-1", "10.0.0.2")]),
            builders::server("t", &[("t-0", "10.0.0.3")]),
        ],
    );
    tiered.scheduler = Some(switchyard_snapshot::scheduler::default_config());
    let loads = pb::EndpointLoads {
        loads: vec![pb::EndpointLoad {
            namespace: "default".into(),
            pod: "s-0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut seeds = vec![
        tagged(0, &builders::one_route("m", "10.0.0.9").encode_to_vec()),
        tagged(0, &tiered.encode_to_vec()),
        tagged(1, &loads.encode_to_vec()),
    ];
    seeds.push(tagged(0, &pb::RouteConfig::default().encode_to_vec()));
    Harness {
        name: "snapshot",
        seeds,
        dictionary: vec![
            b"\x0a\x00",
            b"\x12\x01*",
            b"\xff\xff\xff\xff\x0f",
            b"(",
            b"^.*$",
            b"\x00",
        ],
        check: check_snapshot,
    }
}

fn tagged(kind: u8, encoded: &[u8]) -> Vec<u8> {
    let mut input = vec![kind];
    input.extend_from_slice(encoded);
    input
}

fn check_snapshot(input: &[u8]) {
    let [kind, encoded @ ..] = input else {
        return;
    };
    let store = SnapshotStore::new();
    store
        .apply_route_config("base", builders::one_route("m", "10.0.0.9"))
        .expect("the base snapshot is valid");
    let refused = if kind % 2 == 0 {
        match pb::RouteConfig::decode(encoded) {
            Ok(config) => store.apply_route_config("fuzz", config).is_err(),
            Err(_) => return,
        }
    } else {
        match pb::EndpointLoads::decode(encoded) {
            Ok(loads) => store.apply_endpoint_loads("fuzz", loads).is_err(),
            Err(_) => return,
        }
    };
    if refused {
        let table = store.table().expect("a table is in use");
        assert_eq!(
            table.version, "base",
            "a refused snapshot replaced the table"
        );
    }
}
