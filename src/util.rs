//! Small helpers several modules share.

use time::OffsetDateTime;

/// An error and its sources on one line (`error: cause: cause…`), for logs, replies and outcome reasons. A source
/// whose text the line already holds is skipped: some errors (rumqttc's, image decoders') print their source
/// themselves, and saying it twice only hides the useful part.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// The current UTC time in RFC 3339, as every timestamp attrd publishes is written.
pub fn now_rfc3339() -> String {
    // RFC 3339 formatting of a UTC timestamp cannot fail for years 0..=9999.
    OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
