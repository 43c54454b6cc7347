//! Prompt text to token ids, and token ids to the chained block hashes the prefix cache matches
//! on.
//!
//! The tokeniser is deliberately simple but deterministic: identical prompt prefixes give
//! identical leading tokens, so identical leading KV blocks, which is all prefix caching needs.

use serde_json::Value;

use crate::mock_engine::openai::Endpoint;

/// A token id; only equality matters to the simulator.
pub type TokenId = u64;

/// Longest token in characters: English BPE vocabularies average about four characters per
/// token, so prompt lengths (hence KV footprints and prefill times) land near a real tokenizer's.
pub const MAX_TOKEN_CHARS: usize = 4;

/// The beginning-of-sequence token every text prompt starts with, as chat templates and
/// tokenizers add one; it also keeps an empty prompt at one token.
const BOS_TOKEN: TokenId = 1;

/// Token ids of an inference request body. Chat messages are flattened in order as
/// `role: content\n` (text parts of multi-part contents joined by newlines), completion prompts
/// are tokenised in order, and pre-tokenised prompts keep their ids. Unknown shapes give just
/// the BOS token; the request parser rejects them anyway.
pub fn prompt_token_ids(endpoint: Endpoint, body: &Value) -> Vec<TokenId> {
    match endpoint {
        Endpoint::ChatCompletions => {
            let mut text = String::new();
            let messages = body.get("messages").and_then(Value::as_array);
            for message in messages.into_iter().flatten() {
                let role = message.get("role").and_then(Value::as_str).unwrap_or("");
                text.push_str(role);
                text.push_str(": ");
                text.push_str(&message_content(message.get("content")));
                text.push('\n');
            }
            tokenize(&text)
        }
        Endpoint::Completions => match body.get("prompt") {
            Some(Value::String(text)) => tokenize(text),
            Some(Value::Array(items)) => {
                let mut tokens = Vec::new();
                for item in items {
                    match item {
                        Value::String(text) => tokens.extend(tokenize(text)),
                        Value::Number(id) => tokens.extend(id.as_u64()),
                        Value::Array(ids) => tokens.extend(ids.iter().filter_map(Value::as_u64)),
                        _ => {}
                    }
                }
                if tokens.is_empty() {
                    tokens.push(BOS_TOKEN);
                }
                tokens
            }
            _ => vec![BOS_TOKEN],
        },
    }
}

fn message_content(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// BOS, then one token per whitespace-separated word, words longer than [`MAX_TOKEN_CHARS`]
/// split into chunks of that many characters.
pub fn tokenize(text: &str) -> Vec<TokenId> {
    let mut tokens = vec![BOS_TOKEN];
    for word in text.split_whitespace() {
        let mut chunk_start = 0;
        for (count, (index, _)) in word.char_indices().enumerate() {
            if count > 0 && count % MAX_TOKEN_CHARS == 0 {
                tokens.push(token_id(&word[chunk_start..index]));
                chunk_start = index;
            }
        }
        tokens.push(token_id(&word[chunk_start..]));
    }
    tokens
}

/// `len` tokens no other prompt shares, for requests admitted without their text: they
/// occupy KV blocks but never hit nor seed the prefix cache.
pub fn unique_prompt(request_number: u64, len: usize) -> Vec<TokenId> {
    let salt = mix(request_number ^ 0x5eed_0f0a_0000_0000);
    (0..len as u64).map(|index| mix(salt ^ index)).collect()
}

/// Where every block hash chain of `model` starts. The model is part of it because KV computed
/// under one LoRA adapter is useless to another (vLLM puts the adapter into its block hashes).
pub fn chain_root(seed: u64, model: &str) -> u64 {
    mix(fnv1a(
        fnv1a(FNV_OFFSET, &seed.to_le_bytes()),
        model.as_bytes(),
    ))
}

/// Hashes of the prompt's full blocks, each covering the previous block's hash and its own
/// tokens, so equal hashes mean equal prefixes. The trailing partial block has none: only full
/// blocks are shared.
pub fn block_hashes(root: u64, tokens: &[TokenId], block_size: usize) -> Vec<u64> {
    tokens
        .chunks_exact(block_size.max(1))
        .scan(root, |previous, block| {
            let mut state = fnv1a(FNV_OFFSET, &previous.to_le_bytes());
            for token in block {
                state = fnv1a(state, &token.to_le_bytes());
            }
            *previous = mix(state);
            Some(*previous)
        })
        .collect()
}

fn token_id(text: &str) -> TokenId {
    mix(fnv1a(FNV_OFFSET, text.as_bytes()))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a: stable across platforms and Rust releases, unlike `std`'s default hasher, so a seed
/// names the same simulation everywhere.
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        state ^= u64::from(*byte);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// SplitMix64's finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn words_become_tokens_and_long_words_are_chunked() {
        let tokens = tokenize("the cat  sat\nunbelievable");
        // BOS + the + cat + sat + unbe/liev/able.
        assert_eq!(tokens.len(), 7);
        assert_eq!(tokens[0], BOS_TOKEN);
        assert_eq!(tokens[1], token_id("the"));
        assert_eq!(tokens[4], token_id("unbe"));
        assert_eq!(tokens[6], token_id("able"));
        assert_eq!(tokenize(""), vec![BOS_TOKEN]);
        // Multi-byte characters are counted as characters, never split.
        assert_eq!(tokenize("ééééé").len(), 3);
    }

    #[test]
    fn chat_messages_flatten_in_order_with_their_roles() {
        let body = json!({"messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
        ]});
        assert_eq!(
            prompt_token_ids(Endpoint::ChatCompletions, &body),
            tokenize("system: Be terse.\nuser: Hi\n")
        );
        let swapped = json!({"messages": [
            {"role": "user", "content": "Be terse."},
            {"role": "system", "content": "Hi"},
        ]});
        assert_ne!(
            prompt_token_ids(Endpoint::ChatCompletions, &swapped),
            prompt_token_ids(Endpoint::ChatCompletions, &body)
        );
    }

    #[test]
    fn completion_prompts_of_every_form_are_tokenised() {
        let ids =
            |prompt: Value| prompt_token_ids(Endpoint::Completions, &json!({"prompt": prompt}));
        assert_eq!(ids(json!("a b")), tokenize("a b"));
        assert_eq!(ids(json!([7, 8, 9])), vec![7, 8, 9]);
        assert_eq!(ids(json!([[7], [8, 9]])), vec![7, 8, 9]);
        assert_eq!(
            ids(json!(["a", "b"])),
            [tokenize("a"), tokenize("b")].concat()
        );
        assert_eq!(ids(json!([])), vec![BOS_TOKEN]);
        assert_eq!(ids(json!({"odd": true})), vec![BOS_TOKEN]);
    }

    #[test]
    fn block_hashes_are_chained_and_cover_full_blocks_only() {
        let root = chain_root(0, "m");
        let tokens: Vec<TokenId> = (0..10).collect();
        let hashes = block_hashes(root, &tokens, 4);
        assert_eq!(hashes.len(), 2);
        // Same prefix, same leading hashes; one differing token changes every later hash.
        let mut changed = tokens.clone();
        changed[1] = 99;
        let changed_hashes = block_hashes(root, &changed, 4);
        assert_ne!(changed_hashes[0], hashes[0]);
        assert_ne!(changed_hashes[1], hashes[1]);
        let mut tail_changed = tokens.clone();
        tail_changed[5] = 99;
        let tail_hashes = block_hashes(root, &tail_changed, 4);
        assert_eq!(tail_hashes[0], hashes[0]);
        assert_ne!(tail_hashes[1], hashes[1]);
        // A block equal in content but under a different prefix hashes differently.
        let shifted = block_hashes(root, &[4, 5, 6, 7], 4);
        assert_ne!(shifted[0], hashes[1]);
    }

    #[test]
    fn chains_depend_on_seed_and_model() {
        let tokens: Vec<TokenId> = (0..4).collect();
        let base = block_hashes(chain_root(1, "base"), &tokens, 4);
        assert_eq!(base, block_hashes(chain_root(1, "base"), &tokens, 4));
        assert_ne!(base, block_hashes(chain_root(1, "lora"), &tokens, 4));
        assert_ne!(base, block_hashes(chain_root(2, "base"), &tokens, 4));
    }

    #[test]
    fn unique_prompts_do_not_share_tokens() {
        let first = unique_prompt(1, 8);
        let second = unique_prompt(2, 8);
        assert_eq!(first.len(), 8);
        assert!(first.iter().all(|token| !second.contains(token)));
        assert_eq!(first, unique_prompt(1, 8));
    }
}
