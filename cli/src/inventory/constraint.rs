//! What a variable may hold. Roles declare a constraint for each variable they read, as data
//! beside its default (`_types:` in `roles/<role>/defaults/main.yaml`), and an inventory's
//! values are checked against it with file:line:column and a hint. Values reach config files
//! verbatim (nftables, HAProxy, nginx, PostgreSQL) and paths on the hosts, so "a string" or "a
//! number" is not enough: a CIDR list must hold CIDRs only, a path must stay where it says.
//!
//! Declarations: `port`, `bool`, `version`, `abs_path` or `cidr_list` alone, or a mapping with
//! `type:` and the type's bounds: `{type: int, min: 1, max: 100}`, `{type: size, min: 64kB,
//! max: 1TB}`, `{type: duration, min: 1s, max: 24d}`, `{type: enum, values: [a, b]}`,
//! `{type: cidr_list, min_items: 1}`, `{type: port, listener: nginx}` (a port the role's
//! service listens on, so no other service of the host may have it).

use std::fmt;

use crate::net::Cidr;
use crate::yaml::{Decoder, Kind, Node, index};

/// A value with a unit, kept as written for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quantity {
    /// In the smallest unit: bytes for sizes, milliseconds for durations.
    pub value: u64,
    pub text: String,
}

/// What a variable may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Constraint {
    Bool,
    /// A whole number within `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
    /// A TCP port; `listener` names the service listening on it, for the port clash check.
    Port {
        listener: Option<String>,
    },
    /// A memory size as PostgreSQL writes it: digits and kB, MB, GB or TB (`"256MB"`).
    Size {
        min: Quantity,
        max: Quantity,
    },
    /// A time as HAProxy writes it: digits and ms, s, m, h or d (`"1h"`).
    Duration {
        min: Quantity,
        max: Quantity,
    },
    /// One of a few strings.
    Enum(Vec<String>),
    /// A version such as `"15"` or `"1.2.3"`: it lands in package names and paths.
    Version,
    /// An absolute, normalised path of plain characters: it lands in paths on hosts and,
    /// unquoted, in config files.
    AbsPath,
    /// A list of IP addresses and CIDR blocks.
    CidrList {
        min_items: usize,
    },
    /// A list of unix user names (they land in sshd's configuration).
    UserList,
}

const SIZE_UNITS: [(&str, u64); 4] = [
    ("kB", 1 << 10),
    ("MB", 1 << 20),
    ("GB", 1 << 30),
    ("TB", 1 << 40),
];
const DURATION_UNITS: [(&str, u64); 5] = [
    ("ms", 1),
    ("s", 1000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// The declaration types, for "did you mean" hints.
pub const TYPES: [&str; 10] = [
    "bool",
    "int",
    "port",
    "size",
    "duration",
    "enum",
    "version",
    "abs_path",
    "cidr_list",
    "user_list",
];

/// A unix user name as Debian's adduser takes it by default.
fn is_user_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Digits then one of `units`, in the smallest unit; `Err` says what is wrong.
fn quantity(s: &str, units: &[(&str, u64)]) -> Result<u64, &'static str> {
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (num, unit) = s.split_at(digits);
    if num.is_empty() {
        return Err("it does not start with a number");
    }
    let Some((_, scale)) = units.iter().find(|(u, _)| *u == unit) else {
        return Err(if unit.is_empty() {
            "it has no unit"
        } else {
            "its unit is not one of those listed"
        });
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(*scale))
        .ok_or("the number is far too large")
}

fn unit_names(units: &[(&str, u64)]) -> String {
    units.iter().map(|(u, _)| *u).collect::<Vec<_>>().join(", ")
}

/// Characters a path component may hold: nothing a config file or a shell reads as syntax.
fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@')
}

/// Why `s` is not an absolute, normalised path of plain characters, if it is not.
pub fn path_problem(s: &str) -> Option<String> {
    if s.contains('\0') {
        return Some("it holds a NUL character".into());
    }
    if !s.starts_with('/') {
        return Some("it is not an absolute path".into());
    }
    if s.len() > 1024 {
        return Some("it is longer than 1024 characters".into());
    }
    if s == "/" {
        return Some("it is the root directory".into());
    }
    for part in s[1..].split('/') {
        match part {
            "" => return Some("it has an empty component (`//` or a trailing `/`)".into()),
            "." | ".." => return Some(format!("it has a `{part}` component")),
            _ => {}
        }
        if let Some(c) = part.chars().find(|c| !path_char(*c)) {
            return Some(format!("it holds {}", char_name(c)));
        }
    }
    None
}

/// A character as a message names it: control characters by code, others quoted.
pub fn char_name(c: char) -> String {
    if c.is_control() || c.is_whitespace() {
        format!("the character U+{:04X}", c as u32)
    } else {
        format!("`{c}`")
    }
}

fn is_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
}

impl fmt::Display for Constraint {
    /// What a value must be, as messages say it ("expected {self}").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Constraint::Bool => write!(f, "true or false"),
            Constraint::Int { min, max } => write!(f, "a whole number from {min} to {max}"),
            Constraint::Port { .. } => write!(f, "a port (a whole number from 1 to 65535)"),
            Constraint::Size { min, max } => write!(
                f,
                "a size from {} to {} such as \"256MB\" (units {})",
                min.text,
                max.text,
                unit_names(&SIZE_UNITS)
            ),
            Constraint::Duration { min, max } => write!(
                f,
                "a duration from {} to {} such as \"1h\" (units {})",
                min.text,
                max.text,
                unit_names(&DURATION_UNITS)
            ),
            Constraint::Enum(values) => write!(f, "one of: {}", values.join(", ")),
            Constraint::Version => write!(f, "a version such as \"15\" or \"1.2\""),
            Constraint::AbsPath => write!(f, "an absolute path such as \"/var/www/sagews\""),
            Constraint::CidrList { min_items: 0 } => {
                write!(f, "a list of addresses and CIDR blocks")
            }
            Constraint::CidrList { min_items } => write!(
                f,
                "a list of at least {min_items} address{} or CIDR block{}",
                if *min_items == 1 { "" } else { "es" },
                if *min_items == 1 { "" } else { "s" }
            ),
            Constraint::UserList => write!(f, "a list of user names such as [root]"),
        }
    }
}

impl Constraint {
    /// The service listening on a port variable's value, if it is such a port.
    pub fn listener(&self) -> Option<&str> {
        match self {
            Constraint::Port { listener } => listener.as_deref(),
            _ => None,
        }
    }

    /// A declaration from a role's `_types:` block; `None` after reporting any problem in it.
    pub fn parse(d: &mut Decoder, node: &Node, path: &str) -> Option<Constraint> {
        let before = d.diags.len();
        let c = Self::parse_inner(d, node, path);
        if d.diags.len() == before { c } else { None }
    }

    fn parse_inner(d: &mut Decoder, node: &Node, path: &str) -> Option<Constraint> {
        if let Kind::Str(name) = &node.kind {
            return match name.as_str() {
                "bool" => Some(Constraint::Bool),
                "port" => Some(Constraint::Port { listener: None }),
                "version" => Some(Constraint::Version),
                "abs_path" => Some(Constraint::AbsPath),
                "cidr_list" => Some(Constraint::CidrList { min_items: 0 }),
                "user_list" => Some(Constraint::UserList),
                "int" | "size" | "duration" | "enum" => {
                    d.error(
                        node,
                        path,
                        format!("type `{name}` needs its bounds"),
                        Some(format!(
                            "write `{{type: {name}, ...}}`: see inventory/constraint.rs"
                        )),
                    );
                    None
                }
                other => {
                    d.error(
                        node,
                        path,
                        format!("unknown type `{other}`"),
                        Some(crate::diag::suggest(other, &TYPES)),
                    );
                    None
                }
            };
        }
        let keys = ["type", "min", "max", "values", "min_items", "listener"];
        let f = d.fields(node, path, &keys)?;
        let Some(t) = f.get("type") else {
            d.error(node, path, "missing `type`", Some(TYPES.join(", ")));
            return None;
        };
        let t = d.string(t, &f.path_of("type"))?;
        let allowed: &[&str] = match t.as_str() {
            "int" | "size" | "duration" => &["type", "min", "max"],
            "enum" => &["type", "values"],
            "cidr_list" => &["type", "min_items"],
            "port" => &["type", "listener"],
            _ => &["type"],
        };
        for (k, kn, _) in f.iter() {
            if !allowed.contains(&k) {
                d.error(
                    kn,
                    &f.path_of(k),
                    format!("type `{t}` takes no `{k}`"),
                    Some(format!("it takes: {}", allowed.join(", "))),
                );
            }
        }
        let need = |d: &mut Decoder, key: &str| -> Option<&Node> {
            let n = f.get(key);
            if n.is_none() {
                d.error(node, path, format!("type `{t}` needs `{key}`"), None);
            }
            n
        };
        let bounds = |d: &mut Decoder, units: &[(&str, u64)]| -> Option<(Quantity, Quantity)> {
            let mut q = |key: &str| -> Option<Quantity> {
                let n = need(d, key)?;
                let text = d.string(n, &f.path_of(key))?;
                match quantity(&text, units) {
                    Ok(value) => Some(Quantity { value, text }),
                    Err(why) => {
                        d.error(n, &f.path_of(key), format!("`{text}`: {why}"), None);
                        None
                    }
                }
            };
            let (min, max) = (q("min"), q("max"));
            Some((min?, max?))
        };
        Some(match t.as_str() {
            "int" => {
                let min =
                    need(d, "min").and_then(|n| d.int(n, &f.path_of("min"), i64::MIN, i64::MAX));
                let max =
                    need(d, "max").and_then(|n| d.int(n, &f.path_of("max"), i64::MIN, i64::MAX));
                Constraint::Int {
                    min: min?,
                    max: max?,
                }
            }
            "size" => {
                let (min, max) = bounds(d, &SIZE_UNITS)?;
                Constraint::Size { min, max }
            }
            "duration" => {
                let (min, max) = bounds(d, &DURATION_UNITS)?;
                Constraint::Duration { min, max }
            }
            "enum" => {
                let values = need(d, "values")?;
                let values = d.strings(values, &f.path_of("values"))?;
                Constraint::Enum(values.into_iter().map(|(s, _)| s).collect())
            }
            "cidr_list" => Constraint::CidrList {
                min_items: match f.get("min_items") {
                    Some(n) => d.int(n, &f.path_of("min_items"), 0, 1000)? as usize,
                    None => 0,
                },
            },
            "port" => Constraint::Port {
                listener: match f.get("listener") {
                    Some(n) => Some(d.string(n, &f.path_of("listener"))?),
                    None => None,
                },
            },
            "bool" => Constraint::Bool,
            "version" => Constraint::Version,
            "abs_path" => Constraint::AbsPath,
            "user_list" => Constraint::UserList,
            other => {
                let n = f.get("type").expect("present");
                d.error(
                    n,
                    &f.path_of("type"),
                    format!("unknown type `{other}`"),
                    Some(crate::diag::suggest(other, &TYPES)),
                );
                return None;
            }
        })
    }

    /// Checks `node` against the constraint, reporting every problem; true when it holds.
    pub fn check(&self, d: &mut Decoder, node: &Node, path: &str) -> bool {
        let before = d.diags.len();
        self.check_inner(d, node, path);
        d.diags.len() == before
    }

    fn wrong(&self, d: &mut Decoder, node: &Node, path: &str) {
        let found = crate::yaml::found(&node.kind);
        let hint = match (self, &node.kind) {
            (Constraint::Size { .. }, Kind::Int(_) | Kind::Float(_)) => {
                "write the number with its unit, in quotes: \"256MB\"".to_string()
            }
            (Constraint::Duration { .. }, Kind::Int(_) | Kind::Float(_)) => {
                "write the number with its unit, in quotes: \"1h\"".to_string()
            }
            (Constraint::Version, Kind::Int(_) | Kind::Float(_)) => {
                "write it in quotes, such as \"15\"".to_string()
            }
            (Constraint::Int { .. } | Constraint::Port { .. }, Kind::Str(_)) => {
                "write the number without quotes".to_string()
            }
            (Constraint::Int { .. } | Constraint::Port { .. }, Kind::Float(_)) => {
                "write a whole number, without a decimal point".to_string()
            }
            _ => crate::yaml::type_hint(
                match self {
                    Constraint::Bool => "true or false",
                    Constraint::Int { .. } | Constraint::Port { .. } => "a whole number",
                    Constraint::CidrList { .. } | Constraint::UserList => "a list",
                    _ => "a string",
                },
                &node.kind,
            ),
        };
        d.error(
            node,
            path,
            format!("expected {self}, found {found}"),
            Some(hint),
        );
    }

    fn out_of_range(&self, d: &mut Decoder, node: &Node, path: &str, shown: &str) {
        d.error(
            node,
            path,
            format!("{shown} is out of range"),
            Some(format!("use {self}")),
        );
    }

    fn check_inner(&self, d: &mut Decoder, node: &Node, path: &str) {
        match (self, &node.kind) {
            (Constraint::Bool, Kind::Bool(_)) => {}
            (Constraint::Int { min, max }, Kind::Int(i)) => {
                if !(min..=max).contains(&i) {
                    self.out_of_range(d, node, path, &i.to_string());
                }
            }
            (Constraint::Port { .. }, Kind::Int(i)) => {
                if !(1..=65535).contains(i) {
                    self.out_of_range(d, node, path, &format!("port {i}"));
                }
            }
            // Past 64 bits YAML reads a float: it is too large, not a fraction.
            (Constraint::Int { .. } | Constraint::Port { .. }, Kind::Float(x))
                if x.is_finite() && x.fract() == 0.0 =>
            {
                self.out_of_range(d, node, path, "the number");
            }
            (Constraint::Size { min, max }, Kind::Str(s)) => {
                self.check_quantity(d, node, path, s, &SIZE_UNITS, min, max)
            }
            (Constraint::Duration { min, max }, Kind::Str(s)) => {
                self.check_quantity(d, node, path, s, &DURATION_UNITS, min, max)
            }
            (Constraint::Enum(values), Kind::Str(s)) => {
                if !values.contains(s) {
                    let names: Vec<&str> = values.iter().map(String::as_str).collect();
                    d.error(
                        node,
                        path,
                        format!("`{s}` is not one of the choices"),
                        Some(crate::diag::suggest(s, &names)),
                    );
                }
            }
            (Constraint::Version, Kind::Str(s)) => {
                if !is_version(s) {
                    d.error(
                        node,
                        path,
                        format!("`{s}` is not a version"),
                        Some(format!(
                            "write {self}: digits and at most two dots (it lands in package names and paths)"
                        )),
                    );
                }
            }
            (Constraint::AbsPath, Kind::Str(s)) => {
                if let Some(why) = path_problem(s) {
                    d.error(
                        node,
                        path,
                        format!("`{s}` is not a usable path: {why}"),
                        Some(format!(
                            "write {self}: letters, digits and . _ - + @ between single slashes, no `.` or `..`"
                        )),
                    );
                }
            }
            (Constraint::CidrList { min_items }, Kind::Seq(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let p = index(path, i);
                    match &item.kind {
                        Kind::Str(s) => {
                            if let Err(e) = s.parse::<Cidr>() {
                                d.error(
                                    item,
                                    &p,
                                    format!("not a valid address block: {e}"),
                                    Some(
                                        "write an address (10.0.0.5) or a CIDR block (10.0.0.0/24)"
                                            .into(),
                                    ),
                                );
                            }
                        }
                        _ => d.expected(item, &p, "a string"),
                    }
                }
                if items.len() < *min_items {
                    d.error(
                        node,
                        path,
                        match items.len() {
                            0 => "the list is empty".to_string(),
                            n => format!("the list has {n}; expected {self}"),
                        },
                        Some("with none, no one could reach the hosts' SSH; give the addresses administrators connect from".into()),
                    );
                }
            }
            (Constraint::UserList, Kind::Seq(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let p = index(path, i);
                    match &item.kind {
                        Kind::Str(s) if is_user_name(s) => {}
                        Kind::Str(s) => d.error(
                            item,
                            &p,
                            format!("`{s}` is not a user name"),
                            Some("use lowercase letters, digits, '_' and '-', starting with a letter or '_' (at most 32)".into()),
                        ),
                        _ => d.expected(item, &p, "a string"),
                    }
                }
            }
            _ => self.wrong(d, node, path),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_quantity(
        &self,
        d: &mut Decoder,
        node: &Node,
        path: &str,
        s: &str,
        units: &[(&str, u64)],
        min: &Quantity,
        max: &Quantity,
    ) {
        match quantity(s, units) {
            Ok(v) if v < min.value || v > max.value => {
                self.out_of_range(d, node, path, &format!("`{s}`"))
            }
            Ok(_) => {}
            Err(why) => d.error(
                node,
                path,
                format!("`{s}` is not {}: {why}", self.kind_name()),
                Some(format!("write {self}")),
            ),
        }
    }

    fn kind_name(&self) -> &'static str {
        match self {
            Constraint::Size { .. } => "a size",
            Constraint::Duration { .. } => "a duration",
            _ => "valid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn node(text: &str) -> Node {
        let n = crate::yaml::parse(Path::new("t.yaml"), &format!("v: {text}\n")).unwrap();
        let Kind::Map(m) = n.kind else { panic!() };
        m.into_iter().next().unwrap().1
    }

    fn decl(text: &str) -> Constraint {
        let mut d = Decoder::default();
        let c = Constraint::parse(&mut d, &node(text), "v");
        assert!(d.diags.is_empty(), "{}", d.diags);
        c.unwrap()
    }

    /// The problems of checking `value` against `c`, as "message | hint" lines.
    fn problems(c: &Constraint, value: &str) -> Vec<String> {
        let mut d = Decoder::default();
        c.check(&mut d, &node(value), "v");
        d.diags
            .0
            .iter()
            .map(|p| {
                format!(
                    "{}:{} {} | {}",
                    p.pos.line,
                    p.pos.col,
                    p.message,
                    p.hint.clone().unwrap_or_default()
                )
            })
            .collect()
    }

    #[test]
    fn ports() {
        let c = decl("{type: port, listener: nginx}");
        assert_eq!(c.listener(), Some("nginx"));
        assert!(problems(&c, "8081").is_empty());
        for bad in [
            "0",
            "65536",
            "-1",
            "5432.5",
            "\"80\"",
            "99999999999999999999",
            "[80]",
            "",
        ] {
            assert_eq!(problems(&c, bad).len(), 1, "{bad}");
        }
        assert_eq!(
            problems(&c, "5432.5"),
            [
                "1:4 expected a port (a whole number from 1 to 65535), found the number 5432.5 | write a whole number, without a decimal point"
            ]
        );
        assert_eq!(
            problems(&c, "99999999999999999999"),
            ["1:4 the number is out of range | use a port (a whole number from 1 to 65535)"]
        );
    }

    #[test]
    fn sizes_and_durations() {
        let c = decl("{type: size, min: 128kB, max: 1TB}");
        assert!(problems(&c, "256MB").is_empty());
        assert!(problems(&c, "\"1TB\"").is_empty());
        for bad in [
            "256",
            "\"256\"",
            "256mb",
            "2TB",
            "64kB",
            "99999999999999999999MB",
            "MB",
            "-1MB",
            "1.5GB",
        ] {
            assert_eq!(problems(&c, bad).len(), 1, "{bad}");
        }
        assert_eq!(
            problems(&c, "99999999999999999999MB"),
            [
                "1:4 `99999999999999999999MB` is not a size: the number is far too large | write a size from 128kB to 1TB such as \"256MB\" (units kB, MB, GB, TB)"
            ]
        );
        let t = decl("{type: duration, min: 1s, max: 24d}");
        assert!(problems(&t, "1h").is_empty());
        assert!(problems(&t, "500ms").len() == 1);
        assert!(problems(&t, "25d").len() == 1);
        assert!(problems(&t, "1h; x").len() == 1);
    }

    #[test]
    fn paths_versions_enums_and_cidrs() {
        let p = decl("abs_path");
        assert!(problems(&p, "/var/www/sagews").is_empty());
        for bad in [
            "/../../ESCAPED2",
            "../../../../x",
            "/a/./b",
            "/a//b",
            "/a/",
            "/",
            "\"/a\\0b\"",
            "/a;b",
            "\"/a b\"",
            "/a$x",
            "relative",
            "\"/a\\u001b\"",
        ] {
            assert_eq!(problems(&p, bad).len(), 1, "{bad}");
        }
        let v = decl("version");
        assert!(problems(&v, "\"15\"").is_empty() && problems(&v, "\"1.2.3\"").is_empty());
        for bad in [
            "15",
            "\"../../../../ESCAPED\"",
            "\"15a\"",
            "\"\"",
            "\"1..2\"",
            "\"1.2.3.4\"",
        ] {
            assert_eq!(problems(&v, bad).len(), 1, "{bad}");
        }
        let e = decl("{type: enum, values: [error, warn, info]}");
        assert_eq!(
            problems(&e, "inf"),
            [
                "1:4 `inf` is not one of the choices | did you mean `info`? (expected one of: error, warn, info)"
            ]
        );
        let c = decl("{type: cidr_list, min_items: 1}");
        assert!(problems(&c, "[\"10.0.0.0/8\", \"::1\"]").is_empty());
        assert_eq!(problems(&c, "[\"x\", 1, \"10.0.0.1/8\"]").len(), 3);
        assert_eq!(problems(&c, "[]").len(), 1);
        assert_eq!(problems(&c, "\"10.0.0.0/8\"").len(), 1);
        let i = decl("{type: int, min: 1, max: 10}");
        assert_eq!(
            problems(&i, "11"),
            ["1:4 11 is out of range | use a whole number from 1 to 10"]
        );
    }

    #[test]
    fn bad_declarations_are_reported() {
        let mut d = Decoder::default();
        for text in [
            "prot",
            "int",
            "{type: size, min: 1, max: 2GB}",
            "{type: enum}",
            "{type: port, min: 1}",
            "{min: 1}",
        ] {
            assert!(
                Constraint::parse(&mut d, &node(text), "v").is_none(),
                "{text}"
            );
        }
        assert_eq!(
            d.diags.0[0].hint.as_deref(),
            Some(
                "did you mean `port`? (expected one of: bool, int, port, size, duration, enum, version, abs_path, cidr_list, user_list)"
            )
        );
    }
}
