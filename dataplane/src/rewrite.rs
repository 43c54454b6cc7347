//! What an HTTPRoute rule does to the request sent upstream: its
//! `URLRewrite` and `RequestHeaderModifier` filters, resolved when the
//! snapshot is applied and applied to every attempt of a request.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;

/// What an HTTPRoute rule does to the request sent upstream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// `URLRewrite.hostname`: the `Host` sent upstream.
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathRewrite>,
    /// `RequestHeaderModifier`.
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    /// Replaces `matched` (the rule's PathPrefix) at the start of the path.
    Prefix {
        matched: String,
        replacement: String,
    },
}

impl Rewrite {
    /// Applies the filters to the upstream request's path and headers.
    pub fn apply(&self, path_and_query: &mut PathAndQuery, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        if let Some(hostname) = &self.hostname {
            headers.insert(http::header::HOST, hostname.clone());
        }
        let Some(rewrite) = &self.path else {
            return;
        };
        let path = path_and_query.path();
        let new_path = match rewrite {
            PathRewrite::Full(full) => full.clone(),
            PathRewrite::Prefix {
                matched,
                replacement,
            } => {
                let rest = path.strip_prefix(matched.as_str()).unwrap_or(path);
                match (replacement.trim_end_matches('/'), rest) {
                    ("", "") => "/".to_owned(),
                    ("", rest) => rest.to_owned(),
                    (replacement, rest) => format!("{replacement}{rest}"),
                }
            }
        };
        let rebuilt = match path_and_query.query() {
            Some(query) => format!("{new_path}?{query}"),
            None => new_path,
        };
        // Built from validated parts; an unparsable result keeps the original path.
        if let Ok(rewritten) = PathAndQuery::try_from(rebuilt) {
            *path_and_query = rewritten;
        }
    }
}
