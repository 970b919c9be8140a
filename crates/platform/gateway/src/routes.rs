//! The route table and the path checks made before routing.

use std::sync::Arc;

use crate::configuration::{AuthPolicy, RouteConfig};

#[derive(Clone, Debug)]
pub struct Route {
    pub prefix: String,
    pub service: String,
    pub auth: AuthPolicy,
    /// The metrics label (the prefix), shared to avoid an allocation per request.
    pub label: Arc<str>,
}

/// Routes, longest prefix first.
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> Self {
        let mut routes: Vec<Route> = configs
            .iter()
            .map(|c| Route {
                prefix: c.prefix.clone(),
                service: c.service.clone(),
                auth: c.auth,
                label: Arc::from(c.prefix.as_str()),
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self { routes }
    }

    /// The route for `path`: its prefix equals the path or is followed by `/`.
    pub fn matching(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            r.prefix == "/"
                || path == r.prefix
                || (path.starts_with(&r.prefix)
                    && path.as_bytes().get(r.prefix.len()) == Some(&b'/'))
        })
    }

    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routes.iter().map(|r| r.service.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

/// Refuses paths that could make the gateway and a service disagree on what was
/// asked for: dot segments, encoded `/`, `\` or NUL, a literal `\`, malformed
/// percent-encoding and invalid UTF-8. The gateway routes, authorizes and forwards
/// the one path it checked.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("the path must start with `/`");
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or("malformed percent-encoding")?;
                let text = std::str::from_utf8(hex).map_err(|_| "malformed percent-encoding")?;
                let byte =
                    u8::from_str_radix(text, 16).map_err(|_| "malformed percent-encoding")?;
                if matches!(byte, b'/' | b'\\' | 0) {
                    return Err("encoded `/`, `\\` or NUL in the path");
                }
                decoded.push(byte);
                i += 3;
            }
            b'\\' => return Err("`\\` in the path"),
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = std::str::from_utf8(&decoded).map_err(|_| "the path is not valid UTF-8")?;
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("`.` or `..` segments in the path");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let r = |prefix: &str, service: &str, auth| RouteConfig {
            prefix: prefix.into(),
            service: service.into(),
            auth,
        };
        RouteTable::new(&[
            r("/users", "users", AuthPolicy::Anonymous),
            r("/users/me", "users", AuthPolicy::Required),
            r("/orders", "orders", AuthPolicy::Required),
        ])
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        let hit = |p: &str| t.matching(p).map(|r| (r.prefix.as_str(), r.auth));
        assert_eq!(hit("/users"), Some(("/users", AuthPolicy::Anonymous)));
        assert_eq!(hit("/users/me"), Some(("/users/me", AuthPolicy::Required)));
        assert_eq!(
            hit("/users/me/x"),
            Some(("/users/me", AuthPolicy::Required))
        );
        assert_eq!(hit("/users/meow"), Some(("/users", AuthPolicy::Anonymous)));
        assert_eq!(hit("/ordersx"), None);
        assert_eq!(hit("/orders/1"), Some(("/orders", AuthPolicy::Required)));
        assert_eq!(hit("/"), None);
    }

    #[test]
    fn path_tricks_are_refused() {
        for bad in [
            "/products/../orders",
            "/products/%2e%2e/orders",
            "/products/.%2E/orders",
            "/./orders",
            "/orders%2F1",
            "/orders%2f1",
            "/orders%5c1",
            "/orders\\1",
            "/orders%00",
            "/orders%zz",
            "/orders%",
            "/orders/%ff",
            "relative",
        ] {
            assert!(check_path(bad).is_err(), "{bad} accepted");
        }
        for good in [
            "/",
            "/orders",
            "/orders/",
            "/products/caf%C3%A9",
            "/a.b/c..d",
            "/x%20y",
        ] {
            assert!(check_path(good).is_ok(), "{good} refused");
        }
    }
}
