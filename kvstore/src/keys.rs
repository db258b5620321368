//! Well-known keys and the timestamp format of canaries and heartbeats.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use api::keys::HEARTBEAT_KEY;

/// The current UTC time in RFC 3339, as canaries and heartbeats carry it
/// (wire format).
pub fn rfc3339_now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

/// Parses an RFC 3339 timestamp as written by [`rfc3339_now`].
pub fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}
