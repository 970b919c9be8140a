//! Typed, layered configuration: defaults -> TOML file -> `BAZAAR_<SECTION>__<KEY>`
//! environment variables.
//!
//! Sections are declared with [`config_section!`](crate::config_section), which
//! generates the struct, its `Default` (every default named in one place, with its
//! reason in a comment) and a loader that keeps going after an error, so that *every*
//! mistake in a file and in the environment is reported at once, each naming its key,
//! where it came from, and the fix.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "BAZAAR_";

/// One mistake in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `http.port`.
    pub key: String,
    /// Where the value came from: a file path or an environment variable.
    pub origin: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` ({}): {}; fix: {}",
            self.key, self.origin, self.problem, self.fix
        )
    }
}

/// Every mistake found, in the order met.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Errors(pub Vec<ConfigError>);

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

impl Errors {
    pub fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The merged raw configuration, with the origin of each value.
#[derive(Debug, Default, Clone)]
pub struct Source {
    root: toml::Table,
    file: Option<PathBuf>,
    /// Dotted key -> environment variable it came from.
    env_keys: HashMap<String, String>,
}

impl Source {
    /// Reads `file` (if any), then overlays `BAZAAR_*` variables from `env`.
    /// A file that cannot be read or parsed is a single, fatal error.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Errors> {
        let mut source = Source::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                single(
                    "(file)",
                    &path.display().to_string(),
                    &format!("cannot read the config file: {e}"),
                    "pass an existing, readable TOML file to --config",
                )
            })?;
            source.root = text.parse::<toml::Table>().map_err(|e| {
                single(
                    "(file)",
                    &path.display().to_string(),
                    &format!("not valid TOML: {}", e.message()),
                    &format!(
                        "correct the TOML syntax{}",
                        e.span()
                            .map(|s| format!(
                                " near line {}",
                                text[..s.start.min(text.len())].lines().count().max(1)
                            ))
                            .unwrap_or_default()
                    ),
                )
            })?;
            source.file = Some(path.to_owned());
        }
        let mut errors = Errors::default();
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, value) in vars {
            source.overlay_env(&var, value, &mut errors);
        }
        if errors.is_empty() {
            Ok(source)
        } else {
            Err(errors)
        }
    }

    /// From the process environment.
    pub fn from_process(file: Option<&Path>) -> Result<Self, Errors> {
        Self::load(file, std::env::vars())
    }

    fn overlay_env(&mut self, var: &str, value: String, errors: &mut Errors) {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            errors.push(ConfigError {
                key: path.join("."),
                origin: format!("env {var}"),
                problem: "empty key segment".into(),
                fix: "name variables BAZAAR_<SECTION>__<KEY>, e.g. BAZAAR_HTTP__HOST".into(),
            });
            return;
        }
        let mut table = &mut self.root;
        for (i, seg) in path.iter().enumerate() {
            if i + 1 == path.len() {
                table.insert(seg.clone(), toml::Value::String(value));
                self.env_keys.insert(path.join("."), var.to_owned());
                return;
            }
            let entry = table
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => table = t,
                _ => {
                    errors.push(ConfigError {
                        key: path[..=i].join("."),
                        origin: format!("env {var}"),
                        problem: "this key is a value, not a section".into(),
                        fix: format!(
                            "set BAZAAR_{} instead",
                            path[..=i].join("__").to_ascii_uppercase()
                        ),
                    });
                    return;
                }
            }
        }
    }

    /// The root node, for [`Section::load`].
    pub fn root(&self) -> Node<'_> {
        Node {
            path: "",
            value: NodeValue::Table(&self.root),
            source: self,
        }
    }

    /// Loads a whole configuration, collecting every error.
    pub fn parse<T: Section>(&self) -> Result<T, Errors> {
        let mut errors = Errors::default();
        let value = T::load(self.root(), &mut errors);
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(errors)
        }
    }

    fn origin(&self, key: &str) -> String {
        if let Some(var) = self.env_keys.get(key) {
            return format!("env {var}");
        }
        // A section set from env (e.g. a map entry) is still named by its variable.
        let prefix = format!("{key}.");
        if let Some((_, var)) = self.env_keys.iter().find(|(k, _)| k.starts_with(&prefix)) {
            return format!("env {var}");
        }
        match &self.file {
            Some(f) => f.display().to_string(),
            None => "defaults".into(),
        }
    }

    /// `value` with every string set from the environment read as a TOML scalar
    /// where it is one.
    fn coerce_env(&self, key: &str, value: &toml::Value) -> toml::Value {
        match value {
            toml::Value::String(s) if self.env_keys.contains_key(key) => {
                parse_env_scalar(s).unwrap_or_else(|| value.clone())
            }
            toml::Value::Table(t) => toml::Value::Table(
                t.iter()
                    .map(|(k, v)| (k.clone(), self.coerce_env(&format!("{key}.{k}"), v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

fn single(key: &str, origin: &str, problem: &str, fix: &str) -> Errors {
    Errors(vec![ConfigError {
        key: key.into(),
        origin: origin.into(),
        problem: problem.into(),
        fix: fix.into(),
    }])
}

#[derive(Clone, Copy)]
enum NodeValue<'a> {
    Missing,
    Table(&'a toml::Table),
    Other(&'a toml::Value),
}

/// A position in the raw configuration tree.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    path: &'a str,
    value: NodeValue<'a>,
    source: &'a Source,
}

impl<'a> Node<'a> {
    fn key(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    /// The sub-section `field`, loaded by `f`.
    pub fn section<T: Section>(&self, field: &str, errors: &mut Errors) -> T {
        let key = self.key(field);
        let value = match self.value {
            NodeValue::Table(t) => match t.get(field) {
                None => NodeValue::Missing,
                Some(toml::Value::Table(t)) => NodeValue::Table(t),
                Some(other) => NodeValue::Other(other),
            },
            _ => NodeValue::Missing,
        };
        let child = Node {
            path: &key,
            value,
            source: self.source,
        };
        T::load(child, errors)
    }

    /// Reports keys of this table that the section does not declare.
    pub fn check_keys(&self, known: &[&str], errors: &mut Errors) {
        match self.value {
            NodeValue::Table(t) => {
                for key in t.keys() {
                    if known.contains(&key.as_str()) {
                        continue;
                    }
                    let full = self.key(key);
                    let suggestion = known
                        .iter()
                        .map(|k| (strsim::jaro_winkler(k, key), *k))
                        .filter(|(score, _)| *score > 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0))
                        .map(|(_, k)| format!("did you mean `{}`?", self.key(k)))
                        .unwrap_or_else(|| {
                            format!(
                                "remove it; known keys here: {}",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            )
                        });
                    errors.push(ConfigError {
                        origin: self.source.origin(&full),
                        key: full,
                        problem: "unknown key".into(),
                        fix: suggestion,
                    });
                }
            }
            NodeValue::Other(v) => errors.push(ConfigError {
                key: self.path.to_owned(),
                origin: self.source.origin(self.path),
                problem: format!("expected a section (table), found a {}", v.type_str()),
                fix: format!("write it as a [{}] table", self.path),
            }),
            NodeValue::Missing => {}
        }
    }

    /// Reads leaf `field`; `None` when absent or invalid (the error is recorded and
    /// the caller falls back to the default so the rest can still be checked).
    pub fn leaf<T: DeserializeOwned>(&self, field: &str, errors: &mut Errors) -> Option<T> {
        let NodeValue::Table(t) = self.value else {
            return None;
        };
        let raw = t.get(field)?;
        let key = self.key(field);
        let first = T::deserialize(raw.clone());
        let result = match first {
            Ok(v) => Ok(v),
            // Environment values arrive as strings: read "8080" as 8080, "true" as true,
            // here or anywhere inside a table set from the environment.
            Err(e) => T::deserialize(self.source.coerce_env(&key, raw)).map_err(|_| e),
        };
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(ConfigError {
                    origin: self.source.origin(&key),
                    problem: e.message().to_owned(),
                    fix: format!("give `{key}` a value of the expected type, or remove it to use the default (see docs/configuration.md)"),
                    key,
                });
                None
            }
        }
    }
}

fn parse_env_scalar(s: &str) -> Option<toml::Value> {
    format!("v = {s}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
}

/// A configuration section: a struct whose fields are leaves or sections.
/// Implemented by [`config_section!`](crate::config_section).
pub trait Section: Default {
    /// Every key this section declares.
    const KEYS: &'static [&'static str];
    fn load(node: Node<'_>, errors: &mut Errors) -> Self;
}

/// Declares a configuration section. A field with `= default` is a leaf read with
/// serde; a field without is a nested section.
///
/// ```
/// chassis::config_section! {
///     /// The HTTP listener.
///     pub struct Listener {
///         /// 0 picks a free port.
///         pub port: u16 = 0,
///     }
/// }
/// chassis::config_section! {
///     pub struct Root {
///         pub listener: Listener,
///     }
/// }
/// let src = chassis::config::Source::load(None, [("BAZAAR_LISTENER__PORT".to_string(), "8080".to_string())]).unwrap();
/// let root: Root = src.parse().unwrap();
/// assert_eq!(root.listener.port, 8080);
/// ```
#[macro_export]
macro_rules! config_section {
    (
        $(#[$smeta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty $(= $default:expr)?
            ),* $(,)?
        }
    ) => {
        $(#[$smeta])*
        #[derive(Clone, Debug)]
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl ::core::default::Default for $name {
            fn default() -> Self {
                Self { $( $field: $crate::config_section!(@default $ty $(, $default)?), )* }
            }
        }

        impl $crate::config::Section for $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
            fn load(node: $crate::config::Node<'_>, errors: &mut $crate::config::Errors) -> Self {
                node.check_keys(Self::KEYS, errors);
                Self {
                    $( $field: $crate::config_section!(@load node, errors, $field, $ty $(, $default)?), )*
                }
            }
        }
    };
    (@default $ty:ty) => { <$ty as ::core::default::Default>::default() };
    (@default $ty:ty, $default:expr) => { $default };
    (@load $node:ident, $errors:ident, $field:ident, $ty:ty) => {
        $node.section::<$ty>(stringify!($field), $errors)
    };
    (@load $node:ident, $errors:ident, $field:ident, $ty:ty, $default:expr) => {
        $node.leaf::<$ty>(stringify!($field), $errors).unwrap_or_else(|| $default)
    };
}

/// A duration written as `"30s"`, `"500ms"`, `"2m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// `"30s"`, `"500ms"`, `"1h30m"`.
    pub fn parse(s: &str) -> Option<Self> {
        humantime::parse_duration(s).ok().map(HumanDuration)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{s}` ({e}); write it like \"30s\", \"500ms\" or \"2m\""
                ))
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size written as a number of bytes or `"512KiB"`, `"1MiB"`, `"10MB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }
    /// Parses `"1MiB"`-style sizes.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size `{s}`; write a number of bytes or a size like \"512KiB\" or \"1MiB\""
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::config_section! {
        pub struct Inner {
            pub port: u16 = 8080,
            pub timeout: HumanDuration = HumanDuration::secs(30),
            pub name: String = "x".to_owned(),
        }
    }
    crate::config_section! {
        pub struct Outer {
            pub http: Inner,
            pub limit: ByteSize = ByteSize::mib(1),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_defaults_file_then_env() {
        let dir = std::env::temp_dir().join(format!("cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "limit = \"2MiB\"\n[http]\nport = 9000\nname = \"file\"\n",
        )
        .unwrap();
        let src = Source::load(
            Some(&file),
            env(&[("BAZAAR_HTTP__NAME", "1234"), ("OTHER", "x")]),
        )
        .unwrap();
        let cfg: Outer = src.parse().unwrap();
        assert_eq!(cfg.http.port, 9000);
        assert_eq!(cfg.http.name, "1234", "env wins and stays a string");
        assert_eq!(cfg.http.timeout, HumanDuration::secs(30));
        assert_eq!(cfg.limit, ByteSize::mib(2));
    }

    #[test]
    fn every_error_is_reported_with_key_origin_and_fix() {
        let src = Source::load(
            None,
            env(&[
                ("BAZAAR_HTTP__PORT", "eighty"),
                ("BAZAAR_HTTP__TIMEOUT", "soon"),
                ("BAZAAR_HTTP__PROT", "1"),
                ("BAZAAR_LIMIT", "lots"),
            ]),
        )
        .unwrap();
        let errs = src.parse::<Outer>().unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["http.prot", "http.port", "http.timeout", "limit"]);
        assert!(errs.0[0].fix.contains("did you mean `http.port`"));
        assert_eq!(errs.0[1].origin, "env BAZAAR_HTTP__PORT");
        assert!(errs.to_string().starts_with("4 configuration errors"));
    }

    #[test]
    fn env_values_inside_a_table_leaf_are_typed() {
        #[derive(serde::Deserialize, Debug, PartialEq, Clone)]
        struct Entry {
            rate: f64,
            name: String,
        }
        crate::config_section! {
            pub struct WithMap {
                pub items: std::collections::BTreeMap<String, Entry> = Default::default(),
            }
        }
        let src = Source::load(
            None,
            env(&[
                ("BAZAAR_ITEMS__A__RATE", "2.5"),
                ("BAZAAR_ITEMS__A__NAME", "abc"),
            ]),
        )
        .unwrap();
        let cfg: WithMap = src.parse().unwrap();
        assert_eq!(
            cfg.items["a"],
            Entry {
                rate: 2.5,
                name: "abc".into()
            }
        );
    }

    #[test]
    fn a_value_where_a_section_belongs_is_an_error() {
        let src = Source::load(None, env(&[("BAZAAR_HTTP", "3")])).unwrap();
        let errs = src.parse::<Outer>().unwrap_err();
        assert_eq!(errs.0[0].key, "http");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("1MiB"), Some(ByteSize(1 << 20)));
        assert_eq!(ByteSize::parse("10 kb"), Some(ByteSize(10_000)));
        assert_eq!(ByteSize::parse("12"), Some(ByteSize(12)));
        assert_eq!(ByteSize::parse("1 parsec"), None);
        assert_eq!(ByteSize::parse("99999999999999999999GiB"), None);
    }
}
