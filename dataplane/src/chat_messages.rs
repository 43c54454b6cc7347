//! The common shape of a chat message (OpenAI `messages`, and the Responses
//! API's `input` messages), walked by the JSON scan ([`Scan`]) for each of
//! its readers: prefix hashing feeds `role: content`, the token estimate
//! counts characters. The shape is stated here once; each reader supplies
//! what it does with the role and the text ([`MessageVisitor`]).
//!
//! A message is an object whose `role` is a string or `null` and whose
//! `content` is a string, `null` or a list of parts, objects whose `text` is
//! a string or `null`; other members are stepped over. Anything else, a
//! `role`, `content` or `text` member twice (serde refuses a duplicate
//! field) and a key with escapes (serde decodes keys before it compares
//! them) is refused, and the reader falls back to serde.

use crate::json_members::{Refused, Scan};

/// A message's role as [`walk_message`] found it.
pub enum Role<'s, 'a> {
    /// The message has no `role` member.
    Absent,
    /// `"role": null` (already stepped over).
    Null,
    /// A string: the cursor at its opening quote. The visitor reads it
    /// whole, so that the walk goes on after it.
    Text(&'s mut Scan<'a>),
}

/// What a reader of messages does with each message's role and text.
pub trait MessageVisitor {
    /// Whether every [`text`](Self::text) must come after the
    /// [`role`](Self::role), as for a reader that writes the role first:
    /// then a content that comes before its role is stepped over and read
    /// again once the role has been seen. A reader whose result does not
    /// depend on the order (a sum) says false, and each content is read
    /// once, where it is.
    const ROLE_BEFORE_TEXT: bool;

    /// The message's role; called exactly once per message.
    fn role(&mut self, role: Role<'_, '_>) -> Result<(), Refused>;

    /// A text of the message's content, the cursor at a string, which the
    /// visitor reads whole: the content itself when it is a string, else
    /// each part's `text` when it is a string, in order.
    fn text(&mut self, text: &mut Scan<'_>) -> Result<(), Refused>;
}

/// Where one message's content stands while its members are read.
enum Content<'a> {
    Absent,
    /// Came before the role, for a visitor that wants the role first: read
    /// once the role has been seen.
    Waiting(Scan<'a>),
    Read,
}

/// Walks the message at the cursor (an object, stepped over whole) with
/// `visitor`; refuses what is not of the common shape.
// Inlined into each reader's loop over messages: as a call of its own it
// cost prefix hashing ~70 instructions a message (callgrind), 3% of hashing
// a 1 KB chat.
#[inline]
pub fn walk_message<V: MessageVisitor>(
    scan: &mut Scan<'_>,
    visitor: &mut V,
) -> Result<(), Refused> {
    let mut role_seen = false;
    let mut content = Content::Absent;
    scan.each_member(|key, scan| {
        match key {
            b"role" if !role_seen => {
                role_seen = true;
                let role = match scan.peek()? {
                    b'"' => Role::Text(scan),
                    b'n' => {
                        scan.null()?;
                        Role::Null
                    }
                    _ => return Err(Refused),
                };
                visitor.role(role)?;
                if let Content::Waiting(waiting) = &mut content {
                    walk_content(waiting, visitor)?;
                    content = Content::Read;
                }
            }
            b"content" if matches!(content, Content::Absent) => {
                if role_seen || !V::ROLE_BEFORE_TEXT {
                    walk_content(scan, visitor)?;
                    content = Content::Read;
                } else {
                    content = Content::Waiting(scan.clone());
                    scan.skip_value()?;
                }
            }
            b"role" | b"content" => return Err(Refused),
            _ => scan.skip_value()?,
        }
        Ok(())
    })?;
    if !role_seen {
        visitor.role(Role::Absent)?;
        if let Content::Waiting(mut waiting) = content {
            walk_content(&mut waiting, visitor)?;
        }
    }
    Ok(())
}

/// A message's content: a string, `null` or a list of parts.
fn walk_content(scan: &mut Scan<'_>, visitor: &mut impl MessageVisitor) -> Result<(), Refused> {
    match scan.peek()? {
        b'"' => visitor.text(scan),
        b'n' => scan.null(),
        b'[' => scan.each_element(|part| walk_part(part, visitor)),
        _ => Err(Refused),
    }
}

/// One part of a content: an object whose `text`, if any, is a string or
/// `null`.
fn walk_part(scan: &mut Scan<'_>, visitor: &mut impl MessageVisitor) -> Result<(), Refused> {
    let mut text_seen = false;
    scan.each_member(|key, scan| {
        match key {
            b"text" if !text_seen => {
                text_seen = true;
                match scan.peek()? {
                    b'"' => visitor.text(scan)?,
                    b'n' => scan.null()?,
                    _ => return Err(Refused),
                }
            }
            b"text" => return Err(Refused),
            _ => scan.skip_value()?,
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes down what the walk calls, in order: `role=<text>`,
    /// `role absent`, `role null`, `text=<text>`.
    #[derive(Default)]
    struct Recorder<const ROLE_BEFORE_TEXT: bool> {
        calls: Vec<String>,
    }

    fn read_string(scan: &mut Scan<'_>) -> Result<String, Refused> {
        let mut decoded = Vec::new();
        let text = scan.text(&mut decoded)?;
        String::from_utf8(text.to_vec()).map_err(|_| Refused)
    }

    impl<const ROLE_BEFORE_TEXT: bool> MessageVisitor for Recorder<ROLE_BEFORE_TEXT> {
        const ROLE_BEFORE_TEXT: bool = ROLE_BEFORE_TEXT;

        fn role(&mut self, role: Role<'_, '_>) -> Result<(), Refused> {
            let call = match role {
                Role::Absent => "role absent".to_owned(),
                Role::Null => "role null".to_owned(),
                Role::Text(scan) => format!("role={}", read_string(scan)?),
            };
            self.calls.push(call);
            Ok(())
        }

        fn text(&mut self, text: &mut Scan<'_>) -> Result<(), Refused> {
            let call = format!("text={}", read_string(text)?);
            self.calls.push(call);
            Ok(())
        }
    }

    /// The calls walking `json` makes, the whole text being one message.
    fn walked<const ROLE_BEFORE_TEXT: bool>(json: &str) -> Result<Vec<String>, Refused> {
        let mut recorder = Recorder::<ROLE_BEFORE_TEXT>::default();
        let mut scan = Scan::new(json.as_bytes());
        scan.whitespace();
        walk_message(&mut scan, &mut recorder)?;
        scan.end()?;
        Ok(recorder.calls)
    }

    fn in_order(json: &str) -> Result<Vec<String>, Refused> {
        walked::<true>(json)
    }

    fn as_found(json: &str) -> Result<Vec<String>, Refused> {
        walked::<false>(json)
    }

    #[test]
    fn the_role_comes_first_when_the_visitor_asks_for_it() {
        let content_first = r#"{"content":"c","name":"n","role":"r"}"#;
        assert_eq!(
            in_order(content_first),
            Ok(vec!["role=r".into(), "text=c".into()])
        );
        assert_eq!(
            as_found(content_first),
            Ok(vec!["text=c".into(), "role=r".into()])
        );
        let role_first = r#"{"role":"r","content":"c"}"#;
        let expected = Ok(vec!["role=r".to_owned(), "text=c".to_owned()]);
        assert_eq!(in_order(role_first), expected);
        assert_eq!(as_found(role_first), expected);
        // Without a role, `Absent` comes before the text or at the end.
        let no_role = r#"{"content":"c"}"#;
        assert_eq!(
            in_order(no_role),
            Ok(vec!["role absent".into(), "text=c".into()])
        );
        assert_eq!(
            as_found(no_role),
            Ok(vec!["text=c".into(), "role absent".into()])
        );
        assert_eq!(in_order("{}"), Ok(vec!["role absent".into()]));
    }

    #[test]
    fn parts_give_their_string_texts_in_order() {
        let json = r#" { "content" : [ {"type":"text","text":"a\nb"}, {"type":"image_url","image_url":{"url":"u"}},
            {"text":null}, {}, {"text":"c","extra":[1,{"text":2}]} ], "role" : "u\u00e9" } "#;
        assert_eq!(
            in_order(json),
            Ok(vec![
                "role=u\u{e9}".into(),
                "text=a\nb".into(),
                "text=c".into()
            ])
        );
        assert_eq!(
            in_order(r#"{"role":"u","content":[]}"#),
            Ok(vec!["role=u".into()])
        );
    }

    #[test]
    fn null_role_content_and_text_make_no_text_call() {
        // A null role is the visitor's to judge; the content is still read.
        assert_eq!(
            in_order(r#"{"content":"c","role":null}"#),
            Ok(vec!["role null".into(), "text=c".into()])
        );
        assert_eq!(
            in_order(r#"{"role":"u","content":null}"#),
            Ok(vec!["role=u".into()])
        );
        assert_eq!(
            as_found(r#"{"content":[{"text":null}],"role":"u"}"#),
            Ok(vec!["role=u".into()])
        );
    }

    #[test]
    fn refuses_duplicates_and_other_shapes() {
        for json in [
            r#"{"role":"u","role":"v"}"#,
            r#"{"role":null,"role":"v"}"#,
            r#"{"content":"a","content":"b","role":"u"}"#,
            r#"{"role":"u","content":null,"content":"b"}"#,
            r#"{"role":"u","content":[{"text":"a","text":"b"}]}"#,
            r#"{"role":"u","content":[{"text":null,"text":"b"}]}"#,
            r#"{"role":3,"content":"c"}"#,
            r#"{"role":["u"]}"#,
            r#"{"role":"u","content":42}"#,
            r#"{"role":"u","content":{"text":"an object"}}"#,
            r#"{"role":"u","content":[["seq"]]}"#,
            r#"{"role":"u","content":["text"]}"#,
            r#"{"role":"u","content":[{"text":7}]}"#,
            r#"{"content":true}"#,
            r#"["u","seq-form message"]"#,
            r#"{"r\u006fle":"u"}"#,
        ] {
            assert_eq!(in_order(json), Err(Refused), "{json}");
            assert_eq!(as_found(json), Err(Refused), "{json}");
        }
    }
}
