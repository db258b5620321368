//! Kubernetes name syntax (RFC 1123 labels and subdomains), used for
//! namespaces, service and node names and label-key prefixes.
//!
//! The validators return a static reason so that callers can wrap it into
//! their own error with the context they know (which key, which field).

/// Longest RFC 1123 label (namespace, service name, label name).
pub const MAX_DNS_LABEL_LEN: usize = 63;
/// Longest RFC 1123 subdomain (node name, label-key prefix).
pub const MAX_DNS_SUBDOMAIN_LEN: usize = 253;

/// Checks `s` against `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 63 characters
/// (Kubernetes namespaces and service names).
///
/// # Errors
///
/// A short description of the rule `s` breaks.
pub fn validate_dns_label(s: &str) -> Result<(), &'static str> {
    let lower_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    validate_short_name(
        s,
        |b| lower_alnum(b) || b == b'-',
        "must consist of lowercase letters, digits and '-'",
        lower_alnum,
        "must start and end with a lowercase letter or digit",
    )
}

/// Checks `s` is an RFC 1123 subdomain: dot-separated RFC 1123 labels, at
/// most 253 characters (Kubernetes node names, label-key prefixes).
///
/// # Errors
///
/// A short description of the rule `s` breaks.
pub fn validate_dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > MAX_DNS_SUBDOMAIN_LEN {
        return Err("must be at most 253 characters");
    }
    for part in s.split('.') {
        validate_dns_label(part).map_err(|reason| match reason {
            "must not be empty" => "must not have an empty part between dots",
            "must be at most 63 characters" => "has a dot-separated part longer than 63 characters",
            _ => "must be dot-separated parts of lowercase letters, digits and '-', each starting and ending with a letter or digit",
        })?;
    }
    Ok(())
}

/// Checks `s` is a "qualified name" part of a Kubernetes label key or a label
/// value: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending
/// alphanumeric. Empty strings are refused; callers allow empty label values.
///
/// # Errors
///
/// A short description of the rule `s` breaks.
pub fn validate_qualified_name_part(s: &str) -> Result<(), &'static str> {
    validate_short_name(
        s,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'),
        "must consist of letters, digits, '-', '_' and '.'",
        |b| b.is_ascii_alphanumeric(),
        "must start and end with a letter or digit",
    )
}

/// Checks `s` is a port name (an IANA service name, as Kubernetes checks
/// container and service port names): 1 to 15 lowercase letters, digits and
/// single inner '-', with at least one letter.
///
/// # Errors
///
/// A short description of the rule `s` breaks.
pub fn validate_port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 characters");
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err("must be lowercase letters, digits and single inner '-', with at least one letter")
    }
}

/// Checks a port number carried in a wider integer: 1..=65535.
///
/// # Errors
///
/// When it is 0 or does not fit 16 bits.
pub fn validate_port(value: u32) -> Result<u16, &'static str> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or("is not a port in 1..=65535")
}

/// The rules DNS labels and qualified-name parts share, checked and reported
/// in this order: not empty, at most 63 characters, every byte `allowed`
/// (else `bad_char`), first and last byte `edge` (else `bad_edge`).
fn validate_short_name(
    s: &str,
    allowed: impl Fn(u8) -> bool,
    bad_char: &'static str,
    edge: impl Fn(u8) -> bool,
    bad_edge: &'static str,
) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > MAX_DNS_LABEL_LEN {
        return Err("must be at most 63 characters");
    }
    if !s.bytes().all(allowed) {
        return Err(bad_char);
    }
    if !s.bytes().next().is_some_and(&edge) || !s.bytes().last().is_some_and(&edge) {
        return Err(bad_edge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(validate_dns_label("default").is_ok());
        assert!(validate_dns_label("kube-system").is_ok());
        assert!(validate_dns_label(&"a".repeat(63)).is_ok());
        assert!(validate_dns_label(&"a".repeat(64)).is_err());
        for bad in ["", "-a", "a-", "A", "a.b", "a/b"] {
            assert!(validate_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_subdomains() {
        assert!(validate_dns_subdomain("node-1.example.com").is_ok());
        for bad in ["", ".a", "a.", "a..b", "A.b", "a_b"] {
            assert!(validate_dns_subdomain(bad).is_err(), "{bad}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(validate_dns_subdomain(&long).is_err());
    }

    #[test]
    fn qualified_name_parts() {
        for ok in ["app", "App_1", "a.b-c", "9", "io.cilium.k8s.policy.cluster"] {
            assert!(validate_qualified_name_part(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a_", ".a", "a b", "a=b", "a;b", "a:b"] {
            assert!(validate_qualified_name_part(bad).is_err(), "{bad}");
        }
        assert!(validate_qualified_name_part(&"a".repeat(64)).is_err());
    }

    #[test]
    fn port_names_and_numbers() {
        for ok in ["http", "h2c", "a-b", "x1"] {
            assert!(validate_port_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1234",
            "-a",
            "a-",
            "a--b",
            "Http",
            "a_b",
            "sixteen-chars-xx",
        ] {
            assert!(validate_port_name(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_port(80), Ok(80));
        assert!(validate_port(0).is_err() && validate_port(65_536).is_err());
    }
}
