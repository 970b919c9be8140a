//! Path normalization, done once per request: the path it returns is the one the
//! gateway routes on, authorizes and forwards, so no later layer (nor the upstream)
//! can see a different path than the one that was checked.
//!
//! Steps, in order:
//! 1. percent-escapes are validated; escapes of unreserved characters (RFC 3986
//!    §2.3: `A-Z a-z 0-9 - . _ ~`) are decoded, the others kept with upper-case hex;
//! 2. an escaped `/`, `\` or NUL, a literal `\` or NUL, and a path whose decoded
//!    bytes are not UTF-8 are refused: each is read differently by different servers;
//! 3. repeated slashes follow the [`SlashPolicy`];
//! 4. dot segments are removed (RFC 3986 §5.2.4); `..` never climbs above `/`.

use std::borrow::Cow;

use serde::Deserialize;

/// What to do with `//` in a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlashPolicy {
    /// `/a//b` becomes `/a/b` (what nginx's `merge_slashes on` does).
    #[default]
    Merge,
    /// `/a//b` is a 400.
    Reject,
    /// `/a//b` is routed and forwarded as it is.
    Keep,
}

/// Why a path was refused (the client gets it as a 400's detail).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    #[error("an encoded `/`, `\\` or NUL in the path")]
    EncodedSeparator,
    #[error("a `\\` or NUL in the path")]
    Backslash,
    #[error("the path is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("repeated `/` in the path")]
    RepeatedSlash,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normalized form of `path` (no query). Borrowed when nothing changed, which is
/// the common case and costs no allocation.
pub fn normalize(path: &str, slashes: SlashPolicy) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: validate, and see whether anything must change. Without escapes the
    // decoded bytes are the path's own, already UTF-8, and are not gathered.
    let escapes = bytes.contains(&b'%');
    let mut decoded_bytes = Vec::new();
    let mut changes = false;
    let mut i = 0;
    let mut prev = 0u8;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = hi << 4 | lo;
                if matches!(c, b'/' | b'\\' | 0) {
                    return Err(PathError::EncodedSeparator);
                }
                // Unreserved escapes are decoded; others are kept, so lower-case hex
                // must be rewritten to the canonical upper case.
                if unreserved(c)
                    || bytes[i + 1].is_ascii_lowercase()
                    || bytes[i + 2].is_ascii_lowercase()
                {
                    changes = true;
                }
                if escapes {
                    decoded_bytes.push(c);
                }
                prev = if unreserved(c) { c } else { b'%' };
                i += 3;
                continue;
            }
            b'\\' | 0 => return Err(PathError::Backslash),
            b'/' if prev == b'/' => match slashes {
                SlashPolicy::Reject => return Err(PathError::RepeatedSlash),
                SlashPolicy::Merge => changes = true,
                SlashPolicy::Keep => {}
            },
            _ => {}
        }
        if escapes {
            decoded_bytes.push(b);
        }
        prev = b;
        i += 1;
    }
    // Escapes of multi-byte characters must form UTF-8 once decoded.
    if escapes && std::str::from_utf8(&decoded_bytes).is_err() {
        return Err(PathError::NotUtf8);
    }
    // Escaped dots count as changes already (`.` is unreserved). Every segment
    // follows a `/`, so a path without `/.` has no dot segment.
    let dots = path.contains("/.") && path.split('/').any(|s| s == "." || s == "..");
    if !changes && !dots {
        return Ok(Cow::Borrowed(path));
    }
    // Pass 2: rewrite escapes and slashes into segments, then drop dot segments.
    let mut canonical = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            // Validated above.
            let c = (hex(bytes[i + 1]).unwrap_or(0) << 4) | hex(bytes[i + 2]).unwrap_or(0);
            if unreserved(c) {
                canonical.push(char::from(c));
            } else {
                canonical.push('%');
                canonical.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                canonical.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
            continue;
        }
        if b == b'/' && slashes == SlashPolicy::Merge && canonical.ends_with('/') {
            i += 1;
            continue;
        }
        // A multi-byte character is copied whole (the input is a `str`).
        let len = utf8_len(b);
        canonical.push_str(&path[i..i + len]);
        i += len;
    }
    Ok(Cow::Owned(remove_dot_segments(&canonical)))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// RFC 3986 §5.2.4 for an absolute path; the trailing slash of a final `.` or `..`
/// is kept, as the RFC's algorithm does (`/a/b/..` -> `/a/`).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if n == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if n == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

/// The invariants of [`normalize`] for `input` under every slash policy: what is
/// accepted starts with `/`, has no dot segment and no escaped unreserved character
/// left, is a fixed point, and has no `//` when merging. Shared by the property test
/// and the fuzz target (`fuzz/fuzz_targets/normalize.rs`).
pub fn check_canonical(input: &str) -> Result<(), String> {
    for policy in [SlashPolicy::Merge, SlashPolicy::Reject, SlashPolicy::Keep] {
        let Ok(once) = normalize(input, policy) else {
            continue;
        };
        let fail = |what: &str| Err(format!("{input:?} under {policy:?} gave {once:?}: {what}"));
        if !once.starts_with('/') {
            return fail("not absolute");
        }
        if once.split('/').any(|s| s == "." || s == "..") {
            return fail("a dot segment is left");
        }
        if once.contains("%2E") || once.contains("%2e") {
            return fail("an escaped `.` is left");
        }
        if normalize(&once, policy).as_deref() != Ok(once.as_ref()) {
            return fail("normalizing again changes it");
        }
        if policy == SlashPolicy::Merge && once.contains("//") {
            return fail("`//` left when merging");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p, SlashPolicy::Merge).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_are_resolved() {
        for (input, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/./b", "/a/b"),
            ("/../a", "/a"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/products/../orders", "/orders"),
            ("/products/%2e%2e/orders", "/orders"),
            ("/products/.%2E/orders", "/orders"),
            ("/products/%2E./orders", "/orders"),
            ("/./orders", "/orders"),
            ("/..", "/"),
            ("/", "/"),
            ("/a.b/c..d", "/a.b/c..d"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_canonical() {
        assert_eq!(norm("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(norm("/x%7e").as_deref(), Ok("/x~"));
        assert_eq!(norm("/x%20y").as_deref(), Ok("/x%20y"));
        assert_eq!(norm("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
        assert!(matches!(
            normalize("/orders/1", SlashPolicy::Merge),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (input, want) in [
            ("/orders%2F1", PathError::EncodedSeparator),
            ("/orders%2f1", PathError::EncodedSeparator),
            ("/orders%5c1", PathError::EncodedSeparator),
            ("/orders%00", PathError::EncodedSeparator),
            ("/orders\\1", PathError::Backslash),
            ("/orders%zz", PathError::BadEscape),
            ("/orders%", PathError::BadEscape),
            ("/orders%4", PathError::BadEscape),
            ("/orders/%ff", PathError::NotUtf8),
            ("/orders/%c3", PathError::NotUtf8),
            ("relative", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(norm(input), Err(want), "{input}");
        }
    }

    #[test]
    fn slash_policies() {
        assert_eq!(norm("//orders///1").as_deref(), Ok("/orders/1"));
        assert_eq!(
            normalize("/a//b", SlashPolicy::Reject).map(Cow::into_owned),
            Err(PathError::RepeatedSlash)
        );
        assert_eq!(
            normalize("/a//b", SlashPolicy::Keep)
                .map(Cow::into_owned)
                .as_deref(),
            Ok("/a//b")
        );
    }

    proptest::proptest! {
        /// Any path, however hostile: no panic; what is accepted is canonical.
        #[test]
        fn any_input_is_refused_or_canonical(
            path in "/[a-zA-Z0-9./%~_\\-]{0,40}",
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let lossy = format!("/{}", String::from_utf8_lossy(&raw));
            for input in [path.as_str(), lossy.as_str()] {
                if let Err(e) = check_canonical(input) {
                    proptest::prop_assert!(false, "{}", e);
                }
            }
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for input in [
            "/a/./b/../c//d",
            "/%61/%2e%2e/b",
            "/x%20y/../z",
            "/caf%c3%a9/.",
        ] {
            let once = norm(input).unwrap();
            assert_eq!(norm(&once).unwrap(), once, "{input}");
        }
    }
}
