//! Syntax checks for names and labels, as Kubernetes and Cilium define them.
//!
//! Each check returns the reason a value is refused; the caller names the field.
//! The rules matter beyond taste: names and labels end up in etcd keys and in
//! identity label strings (`k8s:key=value;`), so a `;`, `=` or `/` where it does
//! not belong would corrupt a key other clusters parse.

/// Cluster name: at most 32 characters, `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`.
pub fn cluster_name(name: &str) -> Result<(), String> {
    dns_label(name, 32)
}

/// DNS-1123 label (namespace): at most `max` lowercase alphanumerics or '-',
/// starting and ending with an alphanumeric.
pub fn dns_label(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > max {
        return Err(format!("longer than {max} characters"));
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    if !bytes.iter().all(|&c| alnum(c) || c == b'-') {
        return Err("only lowercase alphanumerics and '-' are allowed".to_owned());
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err("must start and end with a lowercase alphanumeric".to_owned());
    }
    Ok(())
}

/// DNS-1123 subdomain (pod, node, service account names): at most 253
/// characters, dot-separated DNS labels.
pub fn dns_subdomain(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err("longer than 253 characters".to_owned());
    }
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    name.split('.')
        .try_for_each(|part| dns_label(part, 63))
        .map_err(|e| format!("not a DNS subdomain: {e}"))
}

/// Kubernetes label key: `[prefix/]name`, name at most 63 alphanumerics, '-',
/// '_' or '.', starting and ending alphanumeric; prefix a DNS subdomain.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns_subdomain(prefix).map_err(|e| format!("key prefix {prefix:?}: {e}"))?;
    }
    if name.is_empty() {
        return Err("key name must not be empty".to_owned());
    }
    label_chars(name, "key name")
}

/// Kubernetes label value: empty, or at most 63 alphanumerics, '-', '_' or '.',
/// starting and ending alphanumeric.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    label_chars(value, "value")
}

fn label_chars(text: &str, what: &str) -> Result<(), String> {
    if text.len() > 63 {
        return Err(format!("{what} longer than 63 characters"));
    }
    let bytes = text.as_bytes();
    let ok_inner = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    if !bytes.iter().all(|&c| ok_inner(c))
        || !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
    {
        return Err(format!(
            "{what} {text:?} must be alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Port name (IANA service name): at most 15 lowercase alphanumerics or '-',
/// at least one letter, no leading, trailing or double '-'.
pub fn port_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err("must be 1 to 15 characters".to_owned());
    }
    let bytes = name.as_bytes();
    if !bytes
        .iter()
        .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        || !bytes.iter().any(u8::is_ascii_lowercase)
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
        return Err(
            "must be lowercase alphanumerics and single inner '-' with at least one letter"
                .to_owned(),
        );
    }
    Ok(())
}

/// Port number: 1..=65535 (wire formats carry it in a wider integer).
pub fn port(value: u32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is not a port in 1..=65535"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(cluster_name("c1").is_ok());
        assert!(cluster_name("a-b-c").is_ok());
        assert!(cluster_name("-a").is_err());
        assert!(cluster_name(&"a".repeat(33)).is_err());
        assert!(dns_subdomain("web-1.x").is_ok());
        assert!(dns_subdomain("Web").is_err());
    }

    #[test]
    fn labels() {
        assert!(label_key("app").is_ok());
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("a;b").is_err());
        assert!(label_key("x/").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_x").is_ok());
        assert!(label_value("a=b").is_err());
    }

    #[test]
    fn ports() {
        assert!(port_name("http").is_ok());
        assert!(port_name("http-alt").is_ok());
        assert!(port_name("8080").is_err());
        assert!(port_name("a--b").is_err());
        assert!(port_name("abcdefghijklmnop").is_err());
        assert_eq!(port(80), Ok(80));
        assert!(port(0).is_err());
        assert!(port(70_000).is_err());
    }
}
