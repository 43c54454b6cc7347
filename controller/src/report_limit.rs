//! Reading what dataplanes report on the snapshot stream (ejections,
//! fairness usage): a leaf module, so the stream server and the state the
//! reports feed do not import each other.

/// The first `limit` entries of a dataplane's `report`: one that holds more
/// (a broken or hostile dataplane) is logged, and the rest is not read.
pub fn first_entries<'a, T>(
    node: &str,
    report: &'static str,
    entries: &'a [T],
    limit: usize,
) -> &'a [T] {
    if entries.len() > limit {
        tracing::warn!(
            node,
            report,
            reported = entries.len(),
            read = limit,
            "report too long; reading its first entries only"
        );
    }
    &entries[..entries.len().min(limit)]
}
