//! A small parser of the Prometheus text exposition format 0.0.4, enough for
//! engine `/metrics` pages.
//!
//! Error policy: **strict**. The first malformed line fails the whole page with a
//! [`ParseError`] naming the 1-based line number. A page we cannot fully read is
//! not trusted at all: silently skipping a line could drop e.g. the waiting-queue
//! gauge and make a busy pod look idle, whereas a failed scrape keeps the pod's
//! last good values and is counted, which is the honest outcome.
//!
//! Handled: `# HELP` / `# TYPE` and other comment lines (skipped: engine
//! extractors match on sample names, since counters and histograms expand into
//! several sample names anyway), blank lines, `\r\n` line ends, samples
//! `name{label="value",...} value [timestamp_ms]` with blanks or tabs between
//! tokens, a trailing comma in the label set, the label-value escapes `\\`, `\"`
//! and `\n`, and the values `+Inf`, `-Inf` and `NaN`.
//!
//! Not checked: duplicate label names within one sample and duplicate series
//! across the page (both harmless for summing extractors).
//!
//! Labels are validated while parsing but kept as the raw text between the braces;
//! [`Sample::labels`] decodes them lazily, so parsing a page allocates only the
//! output vector.

use std::borrow::Cow;

/// One sample line of an exposition page, borrowing from the page text.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    /// Sample name, e.g. `vllm:time_to_first_token_seconds_count`.
    pub name: &'a str,
    /// Label text after `{`, up to and including `}`; validated by the parser.
    raw_labels: &'a str,
    pub value: f64,
    /// Optional timestamp in Unix milliseconds.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Sample<'a> {
    /// The sample's labels in page order, values unescaped.
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            rest: self.raw_labels,
        }
    }

    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        self.labels()
            .find(|(label_name, _)| *label_name == name)
            .map(|(_, value)| value)
    }
}

/// Iterator over a [`Sample`]'s labels as `(name, unescaped value)`.
#[derive(Clone, Debug)]
pub struct Labels<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Labels<'a> {
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        // The label text was validated when the sample was parsed, so an error
        // here cannot happen; ending the iteration is the harmless reaction.
        match next_label(self.rest) {
            Ok(Some((name, raw_value, rest))) => {
                self.rest = rest;
                Some((name, unescape_label_value(raw_value)))
            }
            Ok(None) | Err(_) => {
                self.rest = "";
                None
            }
        }
    }
}

/// A malformed line; the page it came from is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct ParseError {
    /// 1-based line number in the page.
    pub line: usize,
    pub kind: ParseErrorKind,
}

/// What is wrong with a line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("invalid metric name")]
    InvalidMetricName,
    #[error("invalid label name")]
    InvalidLabelName,
    #[error("expected `=` after a label name")]
    MissingEquals,
    #[error("expected `\"` to open a label value")]
    MissingLabelValueQuote,
    #[error("label value is not terminated")]
    UnterminatedLabelValue,
    #[error("invalid escape sequence in a label value")]
    InvalidEscape,
    #[error("expected `,` or `}}` after a label value")]
    MissingLabelSeparator,
    #[error("label set is not closed with `}}`")]
    UnterminatedLabelSet,
    #[error("missing sample value")]
    MissingValue,
    #[error("invalid sample value")]
    InvalidValue,
    #[error("invalid timestamp")]
    InvalidTimestamp,
    #[error("unexpected text after the timestamp")]
    TrailingCharacters,
}

/// Parses a whole page; see the module docs for what is accepted.
pub fn parse(text: &str) -> Result<Vec<Sample<'_>>, ParseError> {
    samples(text).collect()
}

/// Lazily parses a page, one item per sample line; comment and blank lines
/// produce no item. Stop at the first `Err` to follow the strict policy.
pub fn samples(text: &str) -> Samples<'_> {
    Samples {
        lines: text.split('\n').enumerate(),
    }
}

/// Iterator returned by [`samples`].
#[derive(Clone, Debug)]
pub struct Samples<'a> {
    lines: std::iter::Enumerate<std::str::Split<'a, char>>,
}

impl<'a> Iterator for Samples<'a> {
    type Item = Result<Sample<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        for (index, line) in self.lines.by_ref() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let line = trim_blanks_start(line);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            return Some(parse_sample(line).map_err(|kind| ParseError {
                line: index + 1,
                kind,
            }));
        }
        None
    }
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

fn trim_blanks_start(text: &str) -> &str {
    text.trim_start_matches([' ', '\t'])
}

fn is_name_start(byte: u8, allow_colon: bool) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || (allow_colon && byte == b':')
}

fn is_name_continue(byte: u8, allow_colon: bool) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || (allow_colon && byte == b':')
}

/// Splits a leading name (`[a-zA-Z_:][a-zA-Z0-9_:]*`, colon only for metric
/// names) off `text`; `None` if `text` does not start with one.
fn split_name(text: &str, allow_colon: bool) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    match bytes.first() {
        Some(&first) if is_name_start(first, allow_colon) => {}
        _ => return None,
    }
    let end = bytes
        .iter()
        .position(|&byte| !is_name_continue(byte, allow_colon))
        .unwrap_or(bytes.len());
    // `end` is at an ASCII byte or the end, so both halves are valid UTF-8.
    Some(text.split_at(end))
}

/// Label text of a sample without labels: an empty, closed set.
const NO_LABELS: &str = "}";

fn parse_sample(line: &str) -> Result<Sample<'_>, ParseErrorKind> {
    let (name, after_name) = split_name(line, true).ok_or(ParseErrorKind::InvalidMetricName)?;
    let (raw_labels, rest) = match trim_blanks_start(after_name).strip_prefix('{') {
        Some(after_brace) => split_label_set(after_brace)?,
        // Without labels the name must end at a blank: `m-1 1` is a bad name,
        // not the sample `m` with value `-1`.
        None if after_name.is_empty()
            || after_name.as_bytes().first().copied().is_some_and(is_blank) =>
        {
            (NO_LABELS, after_name)
        }
        None => return Err(ParseErrorKind::InvalidMetricName),
    };

    let mut tokens = rest.split([' ', '\t']).filter(|token| !token.is_empty());
    let value = tokens.next().ok_or(ParseErrorKind::MissingValue)?;
    let value = parse_value(value).ok_or(ParseErrorKind::InvalidValue)?;
    let timestamp_ms = match tokens.next() {
        Some(token) => Some(
            token
                .parse::<i64>()
                .map_err(|_| ParseErrorKind::InvalidTimestamp)?,
        ),
        None => None,
    };
    if tokens.next().is_some() {
        return Err(ParseErrorKind::TrailingCharacters);
    }

    Ok(Sample {
        name,
        raw_labels,
        value,
        timestamp_ms,
    })
}

/// Validates the label set that follows `{` and splits it into the label text
/// (including the closing `}`) and the text after it.
fn split_label_set(after_brace: &str) -> Result<(&str, &str), ParseErrorKind> {
    let mut rest = after_brace;
    while let Some((_, _, after_label)) = next_label(rest)? {
        rest = after_label;
    }
    // `next_label` returned `None`, so `rest` is optional blanks then `}`.
    let closing = after_brace.len() - trim_blanks_start(rest).len();
    Ok(after_brace.split_at(closing + 1))
}

/// Reads one `name="value"` pair (and a following comma) from the text inside
/// a label set. `Ok(None)` when the set ends (`}` after optional blanks).
/// The returned value is still escaped.
fn next_label(text: &str) -> Result<Option<(&str, &str, &str)>, ParseErrorKind> {
    let text = trim_blanks_start(text);
    if text.starts_with('}') {
        return Ok(None);
    }
    if text.is_empty() {
        return Err(ParseErrorKind::UnterminatedLabelSet);
    }
    let (name, rest) = split_name(text, false).ok_or(ParseErrorKind::InvalidLabelName)?;
    let rest = trim_blanks_start(rest)
        .strip_prefix('=')
        .ok_or(ParseErrorKind::MissingEquals)?;
    let rest = trim_blanks_start(rest)
        .strip_prefix('"')
        .ok_or(ParseErrorKind::MissingLabelValueQuote)?;

    let bytes = rest.as_bytes();
    let mut index = 0;
    let value_end = loop {
        match bytes.get(index) {
            None => return Err(ParseErrorKind::UnterminatedLabelValue),
            Some(b'"') => break index,
            Some(b'\\') => match bytes.get(index + 1) {
                Some(b'\\' | b'"' | b'n') => index += 2,
                Some(_) => return Err(ParseErrorKind::InvalidEscape),
                None => return Err(ParseErrorKind::UnterminatedLabelValue),
            },
            Some(_) => index += 1,
        }
    };
    let value = &rest[..value_end];
    let rest = trim_blanks_start(&rest[value_end + 1..]);
    let rest = if let Some(after_comma) = rest.strip_prefix(',') {
        after_comma
    } else if rest.starts_with('}') {
        rest
    } else if rest.is_empty() {
        return Err(ParseErrorKind::UnterminatedLabelSet);
    } else {
        return Err(ParseErrorKind::MissingLabelSeparator);
    };
    Ok(Some((name, value, rest)))
}

/// Decodes `\\`, `\"` and `\n`; borrows when there is nothing to decode.
fn unescape_label_value(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut decoded = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(character) = chars.next() {
        if character != '\\' {
            decoded.push(character);
            continue;
        }
        match chars.next() {
            Some('n') => decoded.push('\n'),
            Some(other) => decoded.push(other),
            None => {}
        }
    }
    Cow::Owned(decoded)
}

/// Like Go's `strconv.ParseFloat`, which Prometheus uses: Rust's parser accepts
/// `+Inf`, `-Inf`, `Inf` and `NaN` in any letter case as well as plain and
/// exponent notation.
fn parse_value(token: &str) -> Option<f64> {
    token.parse::<f64>().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn parses_samples_and_skips_comments_and_blank_lines() {
        let page = "# HELP vllm:num_requests_running Number of requests.\n\
                    # TYPE vllm:num_requests_running gauge\n\
                    \n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"tiny-llama\"} 8.0\n\
                    process_cpu_seconds_total 9.09\n\
                    # a free-form comment\n";
        let samples = parse(page).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "vllm:num_requests_running");
        assert_eq!(samples[0].value, 8.0);
        assert_eq!(samples[0].label("engine").as_deref(), Some("0"));
        assert_eq!(
            samples[0].label("model_name").as_deref(),
            Some("tiny-llama")
        );
        assert_eq!(samples[0].label("absent"), None);
        assert_eq!(samples[0].timestamp_ms, None);
        assert_eq!(samples[1].name, "process_cpu_seconds_total");
        assert_eq!(samples[1].value, 9.09);
        assert_eq!(samples[1].labels().count(), 0);
    }

    #[test]
    fn parses_special_values_exponents_and_timestamps() {
        let page =
            "a{le=\"+Inf\"} +Inf\nb -Inf\nc NaN\nd 4.849987584e+09 1712345678901\ne\t7\t-5\n";
        let samples = parse(page).unwrap();
        assert_eq!(samples[0].value, f64::INFINITY);
        assert_eq!(samples[0].label("le").as_deref(), Some("+Inf"));
        assert_eq!(samples[1].value, f64::NEG_INFINITY);
        assert!(samples[2].value.is_nan());
        assert_eq!(samples[3].value, 4_849_987_584.0);
        assert_eq!(samples[3].timestamp_ms, Some(1_712_345_678_901));
        assert_eq!(samples[4].value, 7.0);
        assert_eq!(samples[4].timestamp_ms, Some(-5));
    }

    #[test]
    fn unescapes_label_values() {
        let page = r#"m{path="C:\\dir",quote="say \"hi\"",multi="a\nb",plain="x"} 1"#;
        let samples = parse(page).unwrap();
        let labels: Vec<(&str, String)> = samples[0]
            .labels()
            .map(|(name, value)| (name, value.into_owned()))
            .collect();
        assert_eq!(
            labels,
            vec![
                ("path", r"C:\dir".to_owned()),
                ("quote", r#"say "hi""#.to_owned()),
                ("multi", "a\nb".to_owned()),
                ("plain", "x".to_owned()),
            ]
        );
        assert!(matches!(
            samples[0].label("plain"),
            Some(Cow::Borrowed("x"))
        ));
    }

    #[test]
    fn accepts_blanks_trailing_comma_crlf_and_empty_label_sets() {
        let page = "  m { a = \"1\" , b=\"}, {\", } 2\r\nn{} 3\r\n";
        let samples = parse(page).unwrap();
        assert_eq!(samples[0].label("a").as_deref(), Some("1"));
        assert_eq!(samples[0].label("b").as_deref(), Some("}, {"));
        assert_eq!(samples[0].value, 2.0);
        assert_eq!(samples[1].name, "n");
        assert_eq!(samples[1].labels().count(), 0);
        assert_eq!(samples[1].value, 3.0);
    }

    #[test]
    fn rejects_malformed_lines_naming_the_line() {
        let cases = [
            ("ok 1\n9bad 1\n", 2, ParseErrorKind::InvalidMetricName),
            ("m{1a=\"x\"} 1", 1, ParseErrorKind::InvalidLabelName),
            ("m{a:b=\"x\"} 1", 1, ParseErrorKind::MissingEquals),
            ("m{a=x} 1", 1, ParseErrorKind::MissingLabelValueQuote),
            ("m{a=\"x} 1", 1, ParseErrorKind::UnterminatedLabelValue),
            ("m{a=\"\\t\"} 1", 1, ParseErrorKind::InvalidEscape),
            (
                "m{a=\"x\" b=\"y\"} 1",
                1,
                ParseErrorKind::MissingLabelSeparator,
            ),
            ("m{a=\"x\"", 1, ParseErrorKind::UnterminatedLabelSet),
            ("m{a=\"x\",", 1, ParseErrorKind::UnterminatedLabelSet),
            ("# c\n\nm\n", 3, ParseErrorKind::MissingValue),
            ("m{a=\"x\"}", 1, ParseErrorKind::MissingValue),
            ("m one", 1, ParseErrorKind::InvalidValue),
            ("m 1 12.5", 1, ParseErrorKind::InvalidTimestamp),
            ("m 1 12 extra", 1, ParseErrorKind::TrailingCharacters),
            ("m-1 1", 1, ParseErrorKind::InvalidMetricName),
        ];
        for (page, line, kind) in cases {
            assert_eq!(parse(page), Err(ParseError { line, kind }), "page {page:?}");
        }
    }

    #[test]
    fn error_message_names_the_line() {
        let error = parse("a 1\nb 2\nc x\n").unwrap_err();
        assert_eq!(error.to_string(), "line 3: invalid sample value");
    }

    #[test]
    fn parses_every_recorded_vllm_page() {
        // Pages recorded from a real vLLM engine; `testdata/README.md` says how.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vllm");
        let entries = std::fs::read_dir(dir).unwrap_or_else(|error| panic!("{dir}: {error}"));
        let mut pages = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !(file_name.starts_with("metrics_") && file_name.ends_with(".txt")) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let samples = parse(&text).unwrap_or_else(|error| panic!("{file_name}: {error}"));
            let sample_lines = text
                .lines()
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .count();
            assert_eq!(samples.len(), sample_lines, "{file_name}");
            pages += 1;
        }
        assert_eq!(pages, 4, "expected the four captured vLLM pages");
    }
}
