//! Authentication end to end, in local mode: API keys from `Secret` objects
//! of the config directory with per-tier token budgets, and JWTs verified
//! against a JWKS the controller fetches (by OIDC discovery) from an issuer
//! on loopback, including a key rotation picked up without a restart and
//! every kind of bad token refused.

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::json;
use switchyard_e2e::harness::{
    HttpResponse, Stack, TestPod, model_server_yaml, simple_route_yaml, wait_for,
};
use switchyard_e2e::jwt::{Issuer, SigningKey, now, unsigned_token};

const MODEL: &str = "llama";

fn api_key_secret(name: &str, key: &str, user: &str, tier: Option<&str>) -> String {
    let tier = tier.map_or(String::new(), |tier| format!("  tier: {tier}\n"));
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  labels: {{switchyard.dev/api-key: \"true\"}}\nstringData:\n  key: {key}\n  user: {user}\n{tier}"
    )
}

/// One route to one mock engine, `files` added to the config directory, the
/// router configuration `router_config`, one dataplane.
async fn stack(files: &[(&str, String)], router_config: &str) -> Stack {
    let mut all = vec![
        ("server.yaml", model_server_yaml("llama", "")),
        ("route.yaml", simple_route_yaml("llama", MODEL, "llama")),
    ];
    all.extend(files.iter().map(|(name, yaml)| (*name, yaml.clone())));
    let mut stack = Stack::new(&all);
    stack
        .start_pods(&[TestPod::serving("llama-0", 10, "llama", MODEL, &[])])
        .await;
    let router_config_path = stack.dir.path().join("router.yaml");
    std::fs::write(&router_config_path, router_config).expect("router config");
    let path = router_config_path.display().to_string();
    stack
        .start_controller_with(&["--router-config", &path])
        .await;
    stack.start_dataplane().await;
    stack
}

fn hello_world() -> String {
    format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello world"}}]}}"#)
}

async fn chat(stack: &Stack, headers: &[(&str, &str)]) -> HttpResponse {
    stack
        .post("/v1/chat/completions", headers, &hello_world())
        .await
}

async fn chat_with(stack: &Stack, credential: &str) -> HttpResponse {
    let header = format!("Bearer {credential}");
    chat(stack, &[("authorization", header.as_str())]).await
}

/// The dataplane's JSON access log lines.
fn access_log(stack: &Stack) -> Vec<serde_json::Value> {
    stack.dataplanes[0]
        .process
        .log_text()
        .lines()
        .filter(|line| line.starts_with('{') && line.contains("\"status_code\""))
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[tokio::test]
async fn api_keys_from_secrets_with_per_tier_budgets() {
    let secrets = [
        api_key_secret("alice", "sk-alice-1", "alice", Some("free")),
        api_key_secret("bob", "sk-bob-1", "bob", Some("free")),
        api_key_secret("carol", "sk-carol-1", "carol", None),
    ]
    .join("---\n");
    let stack = stack(
        &[("keys.yaml", secrets)],
        "tiers:\n  free: {inputTokensPerUnit: 20, unit: minute}\n",
    )
    .await;
    let _logs = stack.logs_on_failure();
    let refused = chat(&stack, &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Bearer realm=\"switchyard\"")
    );
    assert_eq!(refused.json()["error"]["code"], "invalid_authentication");
    let models = stack
        .http
        .get(&stack.dataplanes[0].url("/v1/models"))
        .await
        .expect("answers");
    assert_eq!(models.status, StatusCode::UNAUTHORIZED, "/v1/models too");
    assert_eq!(
        chat(&stack, &[("x-api-key", "sk-mallory")]).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Tier free: 20 input tokens a minute per user, two hello worlds.
    for _ in 0..2 {
        let answer = chat(&stack, &[("x-api-key", "sk-alice-1")]).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let refused = chat_with(&stack, "sk-alice-1").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.json()["error"]["message"],
        "input token rate limit exceeded for user alice of tier free (20 input tokens per minute)"
    );
    // Bob's budget is his own; Carol has no tier and no limit.
    assert_eq!(chat_with(&stack, "sk-bob-1").await.status, StatusCode::OK);
    for _ in 0..4 {
        assert_eq!(chat_with(&stack, "sk-carol-1").await.status, StatusCode::OK);
    }

    let lines = wait_for("the access log lines", || async {
        let lines = access_log(&stack);
        (lines.len() >= 11).then_some(lines)
    })
    .await;
    let alice: Vec<_> = lines.iter().filter(|l| l["user_id"] == "alice").collect();
    assert_eq!(alice.len(), 3);
    assert!(alice.iter().all(|line| line["tier"] == "free"));
    assert_eq!(alice[2]["error"]["type"], "rate_limit");
    let text: String = lines.iter().map(|line| line.to_string()).collect();
    assert!(!text.contains("sk-"), "no key is ever logged");

    // Keys change without a restart: a new Secret works, a removed one stops.
    stack.write_config(
        "keys.yaml",
        &api_key_secret("dave", "sk-dave-1", "dave", None),
    );
    wait_for("the new key", || async {
        (chat_with(&stack, "sk-dave-1").await.status == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(
        chat_with(&stack, "sk-carol-1").await.status,
        StatusCode::UNAUTHORIZED
    );
}

fn claims(issuer: &Issuer) -> serde_json::Value {
    json!({
        "iss": issuer.url(),
        "aud": "switchyard",
        "sub": "erin",
        "tier": "gold",
        "exp": now() + 600,
    })
}

#[tokio::test]
async fn jwts_verify_against_the_issuers_keys_and_a_rotation_needs_no_restart() {
    let old = SigningKey::load("rsa-a.pem", "2024-key", Algorithm::RS256);
    let issuer = Issuer::start(&[&old]).await;
    let stack = stack(
        &[],
        &format!(
            "auth:\n  issuer: {}\n  audiences: [switchyard]\n  tierClaim: tier\n",
            issuer.url()
        ),
    )
    .await;
    let _logs = stack.logs_on_failure();
    let valid = old.sign(&claims(&issuer));
    let answer = wait_for("the JWKS in the snapshot", || async {
        let answer = chat_with(&stack, &valid).await;
        (answer.status == StatusCode::OK).then_some(answer)
    })
    .await;
    assert!(answer.text().contains("choices"));

    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = claims(&issuer);
        change(&mut claims);
        old.sign(&claims)
    };
    let bad_tokens = [
        ("expired", with(&|c| c["exp"] = json!(now() - 120))),
        ("not yet valid", with(&|c| c["nbf"] = json!(now() + 120))),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://evil.example")),
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("someone-else")),
        ),
        ("alg none", unsigned_token(&claims(&issuer))),
        (
            "HS256 signed with the public key",
            old.sign_hs256_with_public_key(&claims(&issuer)),
        ),
        ("a garbage string", "not-a-token".to_owned()),
    ];
    for (case, token) in &bad_tokens {
        let refused = chat_with(&stack, token).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{case}");
        assert!(
            refused
                .header("www-authenticate")
                .is_some_and(|challenge| challenge.starts_with("Bearer realm=\"switchyard\"")),
            "{case}"
        );
        assert!(
            !refused.text().contains(token.as_str()),
            "{case}: the token is not echoed"
        );
    }
    assert_eq!(
        chat(&stack, &[]).await.status,
        StatusCode::UNAUTHORIZED,
        "a missing header"
    );

    // The issuer rotates to a new key: the first token signed with it is
    // refused (its key id is unknown), the dataplane tells the controller,
    // which refetches the keys, and within seconds the token verifies.
    let new = SigningKey::load("ec-p256.pem", "2025-key", Algorithm::ES256);
    issuer.publish(&[&new]);
    let rotated = new.sign(&claims(&issuer));
    let fetches = issuer.fetches();
    let refused = chat_with(&stack, &rotated).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    wait_for("the rotated key", || async {
        (chat_with(&stack, &rotated).await.status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(issuer.fetches() > fetches, "the controller refetched");
    assert_eq!(
        chat_with(&stack, &valid).await.status,
        StatusCode::UNAUTHORIZED,
        "the retired key no longer verifies"
    );
    let lines = access_log(&stack);
    assert!(
        lines
            .iter()
            .any(|line| line["user_id"] == "erin" && line["tier"] == "gold"),
        "the caller is in the access log"
    );
}
