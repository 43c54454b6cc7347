//! The byte ranges of a few top-level members of a JSON object, found by one
//! scan that steps over every other value without building anything; the
//! same scan as a cursor ([`Scan`]) for a caller that walks one expected
//! shape (the chat messages of [`crate::chat_messages`]).
//!
//! It jumps from quote to quote inside strings (memchr), which pays where
//! strings are long: a request body's prompt (~12% fewer instructions than
//! serde for a ~1 KB chat body, 44% fewer for a 400 KB prompt). For short
//! tokens it costs about what serde does, so responses are still read by
//! serde. It accepts only plainly valid JSON (keys without escapes or
//! non-ASCII bytes, each wanted member at most once, bounded nesting) and
//! refuses everything else, so a caller that falls back to serde on a
//! refusal gets exactly serde's answer for every input.

use std::ops::Range;

/// Nesting the scan follows; deeper documents are left to serde (whose own
/// limit is 128).
const MAX_DEPTH: usize = 64;

/// Why the scan gave up: the text is not plainly valid JSON, or is valid in a
/// way the scan does not follow (serde then decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// Sets `spans[i]` to the byte range of the value of top-level member
/// `keys[i]` in `json` (None when absent). Refuses anything but a valid JSON
/// object, and an object with a wanted member twice.
pub fn top_level_members(
    json: &str,
    keys: &[&[u8]],
    spans: &mut [Option<Range<usize>>],
) -> Result<(), Refused> {
    spans.fill(None);
    let json = json.as_bytes();
    let mut scan = Scan { json, at: 0 };
    scan.whitespace();
    scan.expect(b'{')?;
    scan.whitespace();
    if scan.peek()? == b'}' {
        scan.at += 1;
    } else {
        loop {
            scan.whitespace();
            let key = scan.string()?;
            let key = &json[key];
            // serde decodes keys before it compares them: leave those with
            // escapes (or bytes that need UTF-8 checks) to it.
            if key.iter().any(|&byte| byte == b'\\' || byte >= 0x80) {
                return Err(Refused);
            }
            scan.whitespace();
            scan.expect(b':')?;
            scan.whitespace();
            let start = scan.at;
            scan.value(1)?;
            if let Some(slot) = keys.iter().position(|wanted| *wanted == key) {
                if spans[slot].is_some() {
                    return Err(Refused);
                }
                spans[slot] = Some(start..scan.at);
            }
            scan.whitespace();
            match scan.take()? {
                b',' => {}
                b'}' => break,
                _ => return Err(Refused),
            }
        }
    }
    scan.end()
}

/// Where the value of a member starts, `after_key` being just past its key:
/// whitespace, the colon, whitespace.
pub fn value_after_key(json: &[u8], after_key: usize) -> Result<usize, Refused> {
    let mut scan = Scan {
        json,
        at: after_key,
    };
    scan.whitespace();
    scan.expect(b':')?;
    scan.whitespace();
    Ok(scan.at)
}

/// Checks that `json[at..]`, which follows the value of one of an object's
/// members, is the rest of that object up to the end of the text: more
/// members (read, not kept), the closing brace, whitespace. Whether the
/// object is the top-level one is for the caller to know; the text before
/// `at` is not read.
pub fn rest_of_object(json: &[u8], at: usize) -> Result<(), Refused> {
    let mut scan = Scan { json, at };
    loop {
        scan.whitespace();
        match scan.take()? {
            b'}' => break,
            b',' => {
                scan.whitespace();
                scan.string()?;
                scan.whitespace();
                scan.expect(b':')?;
                scan.whitespace();
                scan.value(1)?;
            }
            _ => return Err(Refused),
        }
    }
    scan.end()
}

/// A cursor over JSON text for a caller that walks one expected shape and
/// leaves everything else to serde: each step either reads what the shape
/// says comes next or refuses. Steps over values it is not asked to read.
#[derive(Clone)]
pub struct Scan<'a> {
    json: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    /// A cursor at the start of `json`, which is UTF-8 (checked by the
    /// caller; the scan only reads its ASCII bytes).
    pub fn new(json: &'a [u8]) -> Self {
        Self { json, at: 0 }
    }

    /// A string without escapes: its text between the quotes. One with
    /// escapes is refused (its text differs from its bytes).
    fn plain_string(&mut self) -> Result<&'a [u8], Refused> {
        let text = &self.json[self.string()?];
        if memchr::memchr(b'\\', text).is_some() {
            return Err(Refused);
        }
        Ok(text)
    }

    /// A string's text: borrowed from the JSON when it has no escapes, else
    /// decoded into `decoded` (cleared first).
    pub fn text<'d>(&mut self, decoded: &'d mut Vec<u8>) -> Result<&'d [u8], Refused>
    where
        'a: 'd,
    {
        self.expect(b'"')?;
        let (run, stop) = self.run()?;
        if stop == b'"' {
            return Ok(run);
        }
        decoded.clear();
        decoded.extend_from_slice(run);
        loop {
            match self.escape()? {
                ascii if ascii.is_ascii() => decoded.push(ascii as u8),
                other => decoded.extend_from_slice(other.encode_utf8(&mut [0; 4]).as_bytes()),
            }
            let (run, stop) = self.run()?;
            decoded.extend_from_slice(run);
            if stop == b'"' {
                return Ok(decoded);
            }
        }
    }

    /// How many characters (Unicode scalar values) a string's text has,
    /// counted without building it: an escape is one, a surrogate pair too.
    pub fn text_characters(&mut self) -> Result<u64, Refused> {
        self.expect(b'"')?;
        let mut characters = 0;
        loop {
            let (run, stop) = self.run()?;
            // UTF-8 continuation bytes (0b10xx_xxxx) do not start a character.
            characters += run.iter().filter(|&&byte| (byte as i8) >= -0x40).count() as u64;
            if stop == b'"' {
                return Ok(characters);
            }
            self.escape()?;
            characters += 1;
        }
    }

    /// Steps over one value of any kind.
    pub fn skip_value(&mut self) -> Result<(), Refused> {
        self.value(1)
    }

    /// Reads the list at the cursor, each element by `element` (which
    /// starts at it and must step over all of it).
    pub fn each_element(
        &mut self,
        mut element: impl FnMut(&mut Self) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        self.each_item(b'[', b']', |scan| element(scan))
    }

    /// Reads the object at the cursor, each member by `member`, given its
    /// key (refused when it has escapes) and the cursor at its value.
    pub fn each_member(
        &mut self,
        mut member: impl FnMut(&'a [u8], &mut Self) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        self.each_item(b'{', b'}', |scan| {
            let key = scan.plain_string()?;
            scan.whitespace();
            scan.expect(b':')?;
            scan.whitespace();
            member(key, scan)
        })
    }

    fn each_item(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        self.expect(open)?;
        self.whitespace();
        if self.peek()? == close {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.whitespace();
            item(self)?;
            self.whitespace();
            match self.take()? {
                b',' => {}
                byte if byte == close => return Ok(()),
                _ => return Err(Refused),
            }
        }
    }

    /// Steps over `null`.
    pub fn null(&mut self) -> Result<(), Refused> {
        self.literal(b"null")
    }

    pub fn peek(&self) -> Result<u8, Refused> {
        self.json.get(self.at).copied().ok_or(Refused)
    }

    pub fn take(&mut self) -> Result<u8, Refused> {
        let byte = self.peek()?;
        self.at += 1;
        Ok(byte)
    }

    pub fn expect(&mut self, byte: u8) -> Result<(), Refused> {
        if self.take()? == byte {
            Ok(())
        } else {
            Err(Refused)
        }
    }

    /// Nothing but whitespace is left.
    pub fn end(mut self) -> Result<(), Refused> {
        self.whitespace();
        if self.at == self.json.len() {
            Ok(())
        } else {
            Err(Refused)
        }
    }

    pub fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.json.get(self.at) {
            self.at += 1;
        }
    }

    /// A string; returns the range of its text between the quotes.
    fn string(&mut self) -> Result<Range<usize>, Refused> {
        self.expect(b'"')?;
        let start = self.at;
        while self.run()?.1 == b'\\' {
            self.skip_escape()?;
        }
        Ok(start..self.at - 1)
    }

    /// Steps over an escape, the cursor just past its backslash. Any four
    /// hex digits will do, as for serde when it steps over a string: whether
    /// they make a character matters only to a reader of the text.
    fn skip_escape(&mut self) -> Result<(), Refused> {
        match self.take()? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok(()),
            b'u' => self.hex_unit().map(drop),
            _ => Err(Refused),
        }
    }

    /// The bytes up to the next quote or backslash of a string, which must
    /// not be control characters, and that quote or backslash; the cursor
    /// ends past it.
    fn run(&mut self) -> Result<(&'a [u8], u8), Refused> {
        let rest = &self.json[self.at..];
        let stop = memchr::memchr2(b'"', b'\\', rest).ok_or(Refused)?;
        let run = &rest[..stop];
        // Written as a reduction so that it vectorises.
        if run
            .iter()
            .fold(false, |control, &byte| control | (byte < 0x20))
        {
            return Err(Refused);
        }
        self.at += stop + 1;
        Ok((run, rest[stop]))
    }

    /// The character an escape stands for, the cursor just past its
    /// backslash. A UTF-16 surrogate must be half of an escaped pair: serde
    /// refuses a lone one in a string it decodes.
    fn escape(&mut self) -> Result<char, Refused> {
        let unit = match self.take()? {
            b'"' => return Ok('"'),
            b'\\' => return Ok('\\'),
            b'/' => return Ok('/'),
            b'b' => return Ok('\u{8}'),
            b'f' => return Ok('\u{c}'),
            b'n' => return Ok('\n'),
            b'r' => return Ok('\r'),
            b't' => return Ok('\t'),
            b'u' => self.hex_unit()?,
            _ => return Err(Refused),
        };
        let code = match unit {
            0xD800..=0xDBFF => {
                self.expect(b'\\')?;
                self.expect(b'u')?;
                let low = self.hex_unit()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return Err(Refused);
                }
                0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
            }
            code => code,
        };
        char::from_u32(code).ok_or(Refused)
    }

    /// The four hex digits of a `\u` escape.
    fn hex_unit(&mut self) -> Result<u32, Refused> {
        let mut unit = 0;
        for _ in 0..4 {
            let digit = match self.take()? {
                byte @ b'0'..=b'9' => byte - b'0',
                byte @ b'a'..=b'f' => byte - b'a' + 10,
                byte @ b'A'..=b'F' => byte - b'A' + 10,
                _ => return Err(Refused),
            };
            unit = (unit << 4) | u32::from(digit);
        }
        Ok(unit)
    }

    fn value(&mut self, depth: usize) -> Result<(), Refused> {
        if depth > MAX_DEPTH {
            return Err(Refused);
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.members(b'}', depth, true),
            b'[' => self.members(b']', depth, false),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Refused),
        }
    }

    /// An object's members or an array's elements, from the opening bracket.
    fn members(&mut self, close: u8, depth: usize, keyed: bool) -> Result<(), Refused> {
        let open = self.peek()?;
        self.each_item(open, close, |scan| {
            if keyed {
                scan.string()?;
                scan.whitespace();
                scan.expect(b':')?;
                scan.whitespace();
            }
            scan.value(depth + 1)
        })
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Refused> {
        if self.json[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(Refused)
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<(), Refused> {
        if self.peek()? == b'-' {
            self.at += 1;
        }
        if self.take()? == b'0' {
            if self.json.get(self.at).is_some_and(u8::is_ascii_digit) {
                return Err(Refused);
            }
        } else {
            self.at -= 1;
            self.digits()?;
        }
        if self.json.get(self.at) == Some(&b'.') {
            self.at += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.json.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.json.get(self.at) {
                self.at += 1;
            }
            self.digits()?;
        }
        Ok(())
    }

    /// One or more digits.
    fn digits(&mut self) -> Result<(), Refused> {
        let count = self.json[self.at..]
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count();
        if count == 0 {
            return Err(Refused);
        }
        self.at += count;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(json: &str, keys: &[&str]) -> Result<Vec<Option<String>>, Refused> {
        let keys: Vec<&[u8]> = keys.iter().map(|key| key.as_bytes()).collect();
        let mut spans = vec![None; keys.len()];
        top_level_members(json, &keys, &mut spans)?;
        Ok(spans
            .into_iter()
            .map(|span| span.map(|span| json[span].to_owned()))
            .collect())
    }

    #[test]
    fn the_rest_of_an_object_is_members_and_its_closing_brace_to_the_end() {
        let json = br#"{"a":1, "b":{"c":[2]}, "d":"}"} "#;
        let after_a = 6;
        assert_eq!(rest_of_object(json, after_a), Ok(()));
        assert_eq!(rest_of_object(json, json.len() - 2), Ok(()));
        // The end of an inner object is not the end of the text.
        assert_eq!(rest_of_object(br#"{"a":{"b":1}}"#, 11), Err(Refused));
        for bad in [
            &br#"{"a":1,}"#[..],
            br#"{"a":1 "b":2}"#,
            br#"{"a":1"#,
            br#"{"a":1}x"#,
        ] {
            assert_eq!(
                rest_of_object(bad, 6),
                Err(Refused),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn finds_the_wanted_top_level_members_and_steps_over_the_rest() {
        let json = r#" { "a" : [1, -2.5e+3, {"usage": {"x": 1}}, "s\"\\\u00e9", true, false, null] ,
            "usage":{"prompt_tokens":3} , "b":{"c":[[],{}]}, "n": 0 }  "#;
        assert_eq!(
            members(json, &["usage", "n", "missing"]),
            Ok(vec![
                Some(r#"{"prompt_tokens":3}"#.to_owned()),
                Some("0".to_owned()),
                None
            ])
        );
        assert_eq!(members("{}", &["a"]), Ok(vec![None]));
    }

    #[test]
    fn refuses_what_is_not_plainly_valid_json() {
        // (text, whether it is valid JSON that the scan leaves to serde)
        for (refused, valid) in [
            ("", false),
            ("[]", true),
            ("{", false),
            (r#"{"a":1,}"#, false),
            (r#"{"a":01}"#, false),
            (r#"{"a":1.}"#, false),
            (r#"{"a":-}"#, false),
            (r#"{"a":1e}"#, false),
            (r#"{"a":tru}"#, false),
            (r#"{"a":"x\q"}"#, false),
            (r#"{"a":"\u12g4"}"#, false),
            ("{\"a\":\"tab\there\"}", false),
            (r#"{"a":[1 2]}"#, false),
            (r#"{"a":1} x"#, false),
            (r#"{"a" 1}"#, false),
            (r#"{"us\u0061ge":1}"#, true),
            (r#"{"usage":1,"usage":2}"#, true),
        ] {
            assert_eq!(members(refused, &["usage"]), Err(Refused), "{refused}");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(refused).is_ok(),
                valid,
                "{refused}"
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(members(&deep, &["a"]), Err(Refused));
    }
}
