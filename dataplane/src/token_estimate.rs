//! The input-token estimate token rate limits reserve before a request is
//! forwarded: Kthena's estimator, so a budget means the same number here.
//!
//! A chat is rendered the way a ChatML template would render it,
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and costs
//! ⌈characters / 4⌉ (characters are Unicode scalar values). A single user
//! message "hello world" renders to 39 characters: 10 tokens. A completion
//! prompt costs ⌈characters / 4⌉ of its text; a prompt given as token ids
//! costs one token per id.
//!
//! Computed only for requests a limit applies to: it reads the prompt's
//! strings, which routing alone never needs. The common shapes are counted
//! by a scan that builds nothing; serde reads the rest.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chat_messages::{MessageVisitor, Role, walk_message};
use crate::json_members::{Refused, Scan};
use crate::request::PromptField;

/// Characters per estimated token.
pub const CHARACTERS_PER_TOKEN: u64 = 4;

/// Characters ChatML adds around each message: `<|im_start|>` + `\n` after
/// the role + `<|im_end|>` + `\n`.
const CHATML_FRAME_CHARACTERS: u64 = 12 + 1 + 10 + 1;

/// Estimated input tokens of `prompt`, the raw JSON value of the body's
/// prompt field (see [`crate::request::ParsedBody::prompt_span`]).
pub fn estimate_input_tokens(field: PromptField, prompt: &[u8]) -> u64 {
    scan_estimate(field, prompt).unwrap_or_else(|Refused| serde_estimate(field, prompt))
}

/// [`estimate_input_tokens`] for a prompt of any shape.
fn serde_estimate(field: PromptField, prompt: &[u8]) -> u64 {
    let Ok(raw) = serde_json::from_slice::<&RawValue>(prompt) else {
        return 0;
    };
    let characters = match field {
        PromptField::Messages => chat_characters(raw),
        PromptField::Prompt => return completion_prompt_tokens(raw),
        // `/v1/responses`: a string, or a list of messages.
        PromptField::Input => match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
            Ok(text) => characters_of(&text),
            Err(_) => chat_characters(raw),
        },
    };
    characters.div_ceil(CHARACTERS_PER_TOKEN)
}

/// [`estimate_input_tokens`] for the common shapes, read by a scan that
/// builds nothing: messages of the common shape ([`crate::chat_messages`]);
/// a prompt or input that is a string or a list of strings.
/// Refuses every other shape, which serde then reads; for the shapes this
/// accepts both count the same.
fn scan_estimate(field: PromptField, prompt: &[u8]) -> Result<u64, Refused> {
    let mut scan = Scan::new(prompt);
    let tokens = match (field, scan.peek()?) {
        (PromptField::Prompt | PromptField::Input, b'"') => {
            scan.text_characters()?.div_ceil(CHARACTERS_PER_TOKEN)
        }
        (PromptField::Prompt, _) => {
            let mut tokens = 0;
            scan.each_element(|text| {
                tokens += text.text_characters()?.div_ceil(CHARACTERS_PER_TOKEN);
                Ok(())
            })?;
            tokens
        }
        (PromptField::Messages | PromptField::Input, _) => {
            let mut characters = 0;
            scan.each_element(|message| {
                let mut counted = MessageCharacters::default();
                walk_message(message, &mut counted)?;
                characters += counted.chatml_characters();
                Ok(())
            })?;
            characters.div_ceil(CHARACTERS_PER_TOKEN)
        }
    };
    scan.end()?;
    Ok(tokens)
}

/// One message of [`scan_estimate`]: its ChatML characters, 0 when its role
/// is not a string (skipped, as Kthena does, though its content is still
/// read: the scan must refuse what serde would).
#[derive(Default)]
struct MessageCharacters {
    role: Option<u64>,
    content: u64,
}

impl MessageCharacters {
    fn chatml_characters(&self) -> u64 {
        self.role
            .map_or(0, |role| CHATML_FRAME_CHARACTERS + role + self.content)
    }
}

impl MessageVisitor for MessageCharacters {
    // The counts add up in any order: each content is read once, where it is.
    const ROLE_BEFORE_TEXT: bool = false;

    fn role(&mut self, role: Role<'_, '_>) -> Result<(), Refused> {
        if let Role::Text(role) = role {
            self.role = Some(role.text_characters()?);
        }
        Ok(())
    }

    fn text(&mut self, text: &mut Scan<'_>) -> Result<(), Refused> {
        self.content += text.text_characters()?;
        Ok(())
    }
}

/// A chat message: only `role` and `content` are read.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// One part of a multi-part `content`: only text parts have characters.
#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// Characters of the ChatML rendering of a list of messages. A message
/// without a string role is skipped (as Kthena does); a multi-part content
/// counts its text parts.
fn chat_characters(messages: &RawValue) -> u64 {
    let Ok(messages) = serde_json::from_str::<Vec<Message<'_>>>(messages.get()) else {
        return 0;
    };
    messages
        .iter()
        .filter_map(|message| {
            let role = message.role.as_deref()?;
            let content = message.content.map_or(0, content_characters);
            Some(CHATML_FRAME_CHARACTERS + characters_of(role) + content)
        })
        .sum()
}

fn content_characters(content: &RawValue) -> u64 {
    if let Ok(text) = serde_json::from_str::<Cow<'_, str>>(content.get()) {
        return characters_of(&text);
    }
    serde_json::from_str::<Vec<ContentPart<'_>>>(content.get())
        .map(|parts| {
            parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .map(characters_of)
                .sum()
        })
        .unwrap_or(0)
}

/// A completion prompt: a string, a list of strings, token ids, or lists of
/// token ids.
fn completion_prompt_tokens(prompt: &RawValue) -> u64 {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Prompt<'a> {
        Text(#[serde(borrow)] Cow<'a, str>),
        Texts(#[serde(borrow)] Vec<Cow<'a, str>>),
        TokenIds(Vec<u64>),
        TokenIdLists(Vec<Vec<u64>>),
    }
    match serde_json::from_str::<Prompt<'_>>(prompt.get()) {
        Ok(Prompt::Text(text)) => characters_of(&text).div_ceil(CHARACTERS_PER_TOKEN),
        Ok(Prompt::Texts(texts)) => texts
            .iter()
            .map(|text| characters_of(text).div_ceil(CHARACTERS_PER_TOKEN))
            .sum(),
        Ok(Prompt::TokenIds(ids)) => ids.len() as u64,
        Ok(Prompt::TokenIdLists(lists)) => lists.iter().map(|ids| ids.len() as u64).sum(),
        Err(_) => 0,
    }
}

fn characters_of(text: &str) -> u64 {
    text.chars().count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_body;

    fn estimate(body: &str) -> u64 {
        let parsed = parse_body(body.as_bytes()).expect("valid body");
        let (field, span) = parsed.prompt_span.expect("a prompt field");
        estimate_input_tokens(field, &body.as_bytes()[span])
    }

    #[test]
    fn the_scan_counts_what_serde_counts_and_leaves_the_rest_to_it() {
        let taken = [
            (
                PromptField::Messages,
                r#"[{"role":"system","content":"be brief"},{"role":"user","content":"caf\u00e9 \ud83d\ude00 日本\n"}]"#,
            ),
            (
                PromptField::Messages,
                r#"[{"content":"no role"},{"role":null,"content":"x"},{"role":"user"}]"#,
            ),
            (
                PromptField::Messages,
                r#"[{"content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}},{"text":null}],"role":"user","name":"n"}]"#,
            ),
            (
                PromptField::Messages,
                r#"[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]"#,
            ),
            (PromptField::Messages, "[]"),
            (PromptField::Input, r#""hello \"world\"""#),
            (PromptField::Input, r#"[{"role":"user","content":"hi"}]"#),
            (PromptField::Prompt, r#""hello world""#),
            (PromptField::Prompt, r#"["hello","world!",""]"#),
            (PromptField::Prompt, "[]"),
        ];
        for (field, raw) in taken {
            assert_eq!(
                scan_estimate(field, raw.as_bytes()),
                Ok(serde_estimate(field, raw.as_bytes())),
                "{raw}"
            );
        }
        let left = [
            (PromptField::Messages, r#"[{"role":3,"content":"x"}]"#),
            (
                PromptField::Messages,
                r#"[{"role":"user","role":"again","content":"x"}]"#,
            ),
            (PromptField::Messages, r#"[{"role":"user","content":42}]"#),
            (
                PromptField::Messages,
                r#"[{"role":"user","content":[{"text":7}]}]"#,
            ),
            (
                PromptField::Messages,
                r#"[{"role":"user","content":[["seq"]]}]"#,
            ),
            (PromptField::Messages, r#"[["user","seq-form message"]]"#),
            (
                PromptField::Messages,
                r#"[{"role":"user","content":"lone \ud83d"}]"#,
            ),
            (PromptField::Messages, r#"{"not":"a list"}"#),
            (PromptField::Input, "42"),
            (PromptField::Prompt, "[1,2,3]"),
            (PromptField::Prompt, "[[1,2],[3]]"),
            (PromptField::Prompt, r#"["a",1]"#),
            (PromptField::Prompt, r#"{"odd":1}"#),
        ];
        for (field, raw) in left {
            assert_eq!(scan_estimate(field, raw.as_bytes()), Err(Refused), "{raw}");
        }
    }

    #[test]
    fn hello_world_chat_is_ten_tokens() {
        // "<|im_start|>user\nhello world<|im_end|>\n" = 39 characters.
        assert_eq!(
            estimate(r#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#),
            10
        );
    }

    #[test]
    fn every_message_is_rendered_and_characters_are_not_bytes() {
        // 24 + 6 + 2 = 32 and 24 + 4 + 6 = 34 (six 3-byte characters): 66 -> 17.
        let body = r#"{"model":"m","messages":[
            {"role":"system","content":"be"},
            {"role":"user","content":"日本語です。"}]}"#;
        assert_eq!(estimate(body), (32 + 24 + 4 + 6_u64).div_ceil(4));
        // An escape is one character, however it is spelled in JSON.
        assert_eq!(
            estimate(r#"{"model":"m","messages":[{"role":"user","content":"a\nb\u00e9"}]}"#),
            (24 + 4 + 4_u64).div_ceil(4)
        );
    }

    #[test]
    fn multi_part_content_counts_its_text_parts() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"hello"},
            {"type":"image_url","image_url":{"url":"data:..."}},
            {"type":"text","text":" world"}]}]}"#;
        assert_eq!(estimate(body), 10);
    }

    #[test]
    fn messages_without_a_role_are_skipped() {
        let body = r#"{"model":"m","messages":[{"content":"ignored"},{"role":"user","content":"hello world"}]}"#;
        assert_eq!(estimate(body), 10);
    }

    #[test]
    fn completion_prompts() {
        assert_eq!(estimate(r#"{"model":"m","prompt":"hello world"}"#), 3);
        assert_eq!(
            estimate(r#"{"model":"m","prompt":["hello","world!"]}"#),
            2 + 2
        );
        assert_eq!(estimate(r#"{"model":"m","prompt":[1,2,3]}"#), 3);
        assert_eq!(estimate(r#"{"model":"m","prompt":[[1,2],[3]]}"#), 3);
        assert_eq!(estimate(r#"{"model":"m","prompt":{"odd":1}}"#), 0);
    }

    #[test]
    fn responses_input_is_text_or_messages() {
        assert_eq!(estimate(r#"{"model":"m","input":"hello world"}"#), 3);
        assert_eq!(
            estimate(r#"{"model":"m","input":[{"role":"user","content":"hello world"}]}"#),
            10
        );
    }
}
