//! A YAML document as a tree of nodes that remember where they stand in their file, and a
//! decoder that walks such a tree collecting every problem instead of stopping at the first.
//!
//! The parser is saphyr (pure Rust, maintained, YAML 1.2); it is confined to this module so the
//! rest of sagectl sees only `Node`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::diag::{Diagnostics, Pos, display_path, suggest};

/// A YAML value with its position.
#[derive(Clone, Debug)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys are kept as nodes so messages can point at them.
    Map(Vec<(Node, Node)>),
}

impl Kind {
    /// What the value is, for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "nothing (null)",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// What a value is, showing short scalars: "the string \"x\"", "the number 5432.5".
pub fn found(kind: &Kind) -> String {
    match kind {
        Kind::Str(s) if s.chars().count() <= 40 => format!("the string \"{s}\""),
        Kind::Int(i) => format!("the integer {i}"),
        Kind::Float(x) => format!("the number {x}"),
        Kind::Bool(b) => format!("the boolean {b}"),
        other => other.describe().to_string(),
    }
}

/// How to write what was `expected` when `found` was given instead.
pub fn type_hint(expected: &str, found: &Kind) -> String {
    match (expected, found) {
        ("a string", Kind::Int(_) | Kind::Float(_) | Kind::Bool(_)) => {
            "put it in quotes: unquoted, YAML reads it as a number or a boolean (`0644`, `yes`)"
                .into()
        }
        ("a whole number", Kind::Float(_)) => {
            "write a whole number, without a decimal point".into()
        }
        ("a whole number", Kind::Str(_)) => "write the number without quotes".into(),
        ("true or false", Kind::Str(_)) => "write true or false, without quotes".into(),
        ("a list", _) => "write `[a, b]`, or one `- item` per line under the key".into(),
        ("a mapping", _) => "write `key: value` entries, indented under it".into(),
        (_, Kind::Seq(_) | Kind::Map(_)) => {
            format!("write {expected} here, not a list or a mapping")
        }
        (_, Kind::Null) => format!("give {expected} after the colon"),
        _ => format!("write {expected} here"),
    }
}

/// Columns of indentation, and collections opened by `- `, `? ` or `: ` at the start of one
/// line, beyond which a document is refused before it is parsed. The parser recurses once per
/// nesting level, so a few kilobytes of `- - - -` would otherwise overflow the stack and abort
/// the process; together with the parser's own limit of 255 flow levels (`[[[`), these bound the
/// depth to a few hundred levels. Inventories use a dozen columns at most.
const MAX_INDENT: usize = 128;
const MAX_COMPACT: usize = 16;

/// Stack for the thread that parses: room for the deepest document `too_deep` lets through,
/// whatever thread the caller runs on (test threads get 2 MiB).
const PARSE_STACK: usize = 64 << 20;

/// The first line that nests deeper than sagectl parses, as (line, column, message).
fn too_deep(text: &str) -> Option<(usize, usize, String)> {
    for (i, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let rest = &line[indent..];
        if rest.is_empty() || rest.starts_with('#') {
            continue;
        }
        if indent > MAX_INDENT {
            return Some((
                i + 1,
                indent + 1,
                format!(
                    "this line is indented {indent} columns; sagectl reads at most {MAX_INDENT}"
                ),
            ));
        }
        let (mut n, mut r) = (0, rest);
        while let Some(after) = r.strip_prefix(['-', '?', ':']) {
            if !(after.is_empty() || after.starts_with(' ')) {
                break;
            }
            n += 1;
            r = after.trim_start_matches(' ');
        }
        if n > MAX_COMPACT {
            return Some((
                i + 1,
                indent + 1,
                format!("{n} collections nested on one line; sagectl reads at most {MAX_COMPACT}"),
            ));
        }
    }
    None
}

/// The token of `text` at a parser position (1-based line, 0-based column), up to the next
/// blank: the tag as written, for messages.
fn token_at(text: &str, line: usize, col: usize) -> String {
    let l = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
    l.chars()
        .skip(col)
        .take_while(|c| !c.is_whitespace())
        .collect()
}

/// The key starting at a parser position: quoted, or plain up to its `:`.
fn key_at(text: &str, line: usize, col: usize) -> String {
    let l: String = text
        .lines()
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .chars()
        .skip(col)
        .collect();
    if let Some(q) = l.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = l[1..].find(q).map_or(l.len(), |e| e + 2);
        return l[..end].to_string();
    }
    let end = l
        .char_indices()
        .find(|&(i, c)| {
            matches!(c, ',' | '}' | ']')
                || (c == ':' && l[i + 1..].chars().next().is_none_or(|n| n == ' '))
        })
        .map_or(l.len(), |(i, _)| i);
    l[..end].trim_end().to_string()
}

/// Where an earlier entry with the same key sits in the same block mapping (1-based line), by
/// looking up from `line` for the key at the same indentation.
fn first_key_line(text: &str, line: usize, col: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    for i in (0..line.saturating_sub(1)).rev() {
        let l = lines[i];
        let indent = l.len() - l.trim_start_matches(' ').len();
        let rest = &l[indent..];
        if rest.is_empty() || rest.starts_with('#') {
            continue;
        }
        if indent < col && !rest.starts_with("- ") {
            return None;
        }
        if indent == col && key_at(text, i + 1, col) == key {
            return Some(i + 1);
        }
    }
    None
}

fn syntax_error(name: &Arc<str>, text: &str, e: &saphyr::ScanError) -> Diagnostics {
    let m = e.marker();
    let mut d = Diagnostics::default();
    let pos = Pos {
        file: name.clone(),
        line: m.line(),
        col: m.col() + 1,
    };
    if e.info() == "duplicated key in mapping" {
        let key = key_at(text, m.line(), m.col());
        let hint = match first_key_line(text, m.line(), m.col(), &key) {
            Some(l) => format!("`{key}` is already set on line {l}; keep one of the two"),
            None => format!("`{key}` is already set earlier in this mapping; keep one of the two"),
        };
        d.push(&pos, "", format!("duplicate key `{key}`"), Some(hint));
    } else {
        d.push(
            &pos,
            "",
            format!("YAML syntax error: {}", e.info()),
            Some("check the indentation and quoting around this line".into()),
        );
    }
    d
}

/// Parses `text` (read from `file`) into one node; a syntax error becomes a diagnostic.
pub fn parse(file: &Path, text: &str) -> Result<Node, Diagnostics> {
    let name: Arc<str> = display_path(file).into();
    if let Some((line, col, msg)) = too_deep(text) {
        let mut d = Diagnostics::default();
        let pos = Pos {
            file: name.clone(),
            line,
            col,
        };
        d.push(
            &pos,
            "",
            format!("nesting too deep: {msg}"),
            Some("an inventory needs a few levels of nesting; check this line".into()),
        );
        return Err(d);
    }
    let (n, t) = (name.clone(), text.to_string());
    match std::thread::Builder::new()
        .name("yaml".into())
        .stack_size(PARSE_STACK)
        .spawn(move || parse_here(n, &t))
    {
        Ok(handle) => handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        Err(_) => parse_here(name, text),
    }
}

fn parse_here(name: Arc<str>, text: &str) -> Result<Node, Diagnostics> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| syntax_error(&name, text, &e))?;
    let mut diags = Diagnostics::default();
    let mut docs = docs.into_iter();
    let root = match docs.next() {
        Some(doc) => convert(&name, text, doc, &mut diags),
        None => Node {
            pos: Pos {
                file: name.clone(),
                line: 1,
                col: 1,
            },
            kind: Kind::Null,
        },
    };
    if let Some(extra) = docs.next() {
        let pos = pos_of(&name, &extra);
        diags.push(
            &pos,
            "",
            "a second YAML document in one file",
            Some("remove the `---` line: an inventory file holds one document".into()),
        );
    }
    if diags.is_empty() {
        Ok(root)
    } else {
        Err(diags)
    }
}

fn pos_of(file: &Arc<str>, y: &MarkedYaml<'_>) -> Pos {
    Pos {
        file: file.clone(),
        line: y.span.start.line(),
        col: y.span.start.col() + 1,
    }
}

const TAG_HINT: &str =
    "sagectl reads plain YAML values: remove the tag (quote the value to make it a string)";

fn convert(file: &Arc<str>, text: &str, y: MarkedYaml<'_>, diags: &mut Diagnostics) -> Node {
    let pos = pos_of(file, &y);
    let kind = match y.data {
        YamlData::Value(s) => scalar(s),
        YamlData::Representation(s, _, _) => Kind::Str(s.into_owned()),
        YamlData::Sequence(items) => Kind::Seq(
            items
                .into_iter()
                .map(|i| convert(file, text, i, diags))
                .collect(),
        ),
        YamlData::Mapping(map) => Kind::Map(
            map.into_iter()
                .map(|(k, v)| (convert(file, text, k, diags), convert(file, text, v, diags)))
                .collect(),
        ),
        // Only tags outside the core schema (`!foo`, `!<x>`) stay as `Tagged`; the node's span
        // is the tag's own (its value may have none).
        YamlData::Tagged(_, _) => {
            let tag = token_at(text, y.span.start.line(), y.span.start.col());
            diags.push(
                &pos,
                "",
                format!("unknown YAML tag `{tag}`"),
                Some(TAG_HINT.into()),
            );
            Kind::Null
        }
        YamlData::Alias(_) => {
            diags.push(
                &pos,
                "",
                "YAML aliases are not supported",
                Some("write the value out".into()),
            );
            Kind::Null
        }
        // A core-schema tag sagectl does not take (`!!binary`, `!!set`), or a value its tag
        // refuses (`!!int x`).
        YamlData::BadValue => {
            let tag = token_at(text, y.span.start.line(), y.span.start.col());
            let known = [
                "!!str", "!!int", "!!float", "!!bool", "!!null", "!!seq", "!!map",
            ];
            let msg = if known.contains(&tag.as_str()) {
                format!("this value is not what its tag `{tag}` says")
            } else {
                format!("unknown YAML tag `{tag}`")
            };
            diags.push(&pos, "", msg, Some(TAG_HINT.into()));
            Kind::Null
        }
    };
    Node { pos, kind }
}

fn scalar(s: Scalar<'_>) -> Kind {
    match s {
        Scalar::Null => Kind::Null,
        Scalar::Boolean(b) => Kind::Bool(b),
        Scalar::Integer(i) => Kind::Int(i),
        Scalar::FloatingPoint(f) => Kind::Float(f.into_inner()),
        Scalar::String(s) => Kind::Str(s.into_owned()),
    }
}

/// `a.b` or `a[3]` paths as shown in messages.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Walks nodes, converting them to Rust values and recording every mismatch.
#[derive(Default)]
pub struct Decoder {
    pub diags: Diagnostics,
    /// Paths already reported: a value of the wrong type, or a misspelt key (under the name it
    /// likely meant). Later checks say nothing more of them, such as "`address` is missing"
    /// after `address: [1]` or `adress: 10.0.0.5`: the cause is reported, not its consequences.
    pub reported: BTreeSet<String>,
}

/// The fields of one mapping, looked up by key; unknown keys were reported when it was made.
pub struct Fields<'n> {
    pub pos: Pos,
    pub path: String,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// The value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }

    /// The path of a field of this mapping.
    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The key nodes and values, in document order.
    pub fn iter(&self) -> impl Iterator<Item = (&'n str, &'n Node, &'n Node)> + '_ {
        self.entries.iter().copied()
    }
}

impl Decoder {
    pub fn error(
        &mut self,
        node: &Node,
        path: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.reported.insert(path.to_string());
        self.diags.push(&node.pos, path, message, hint);
    }

    /// Whether a problem was already reported at `path`.
    pub fn was_reported(&self, path: &str) -> bool {
        self.reported.contains(path)
    }

    /// Reports a value of the wrong type, with a hint on how to write the right one.
    pub fn expected(&mut self, node: &Node, path: &str, what: &str) {
        let msg = format!("expected {what}, found {}", found(&node.kind));
        self.error(node, path, msg, Some(type_hint(what, &node.kind)));
    }

    /// A mapping whose keys must be among `known`; each unknown key is reported with a hint.
    /// A null node counts as an empty mapping (`ssh:` with nothing under it).
    pub fn fields<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<Fields<'n>> {
        let entries = self.mapping(node, path)?;
        let mut fields = Fields {
            pos: node.pos.clone(),
            path: path.to_string(),
            entries: Vec::new(),
        };
        for (k, kn, v) in entries {
            if known.contains(&k) {
                fields.entries.push((k, kn, v));
            } else {
                let hint = suggest(k, known);
                if let Some(meant) = crate::diag::closest(k, known.iter().copied()) {
                    self.reported.insert(join(path, meant));
                }
                self.error(kn, &join(path, k), format!("unknown key `{k}`"), Some(hint));
            }
        }
        Some(fields)
    }

    /// A mapping with free-form string keys (host names, variables).
    pub fn mapping<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
    ) -> Option<Vec<(&'n str, &'n Node, &'n Node)>> {
        match &node.kind {
            Kind::Null => Some(Vec::new()),
            Kind::Map(entries) => {
                let mut out = Vec::new();
                let mut seen = BTreeSet::new();
                for (k, v) in entries {
                    match &k.kind {
                        Kind::Str(s) => {
                            if seen.insert(s.as_str()) {
                                out.push((s.as_str(), k, v));
                            }
                        }
                        _ => self.error(k, path, "a key must be a string", Some("quote it".into())),
                    }
                }
                Some(out)
            }
            _ => {
                self.expected(node, path, "a mapping");
                None
            }
        }
    }

    pub fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Null => Some(&[]),
            Kind::Seq(items) => Some(items),
            _ => {
                self.expected(node, path, "a list");
                None
            }
        }
    }

    /// A string; integers and booleans are refused so `0644` or `yes` never mean something else.
    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.kind {
            Kind::Str(s) => Some(s.clone()),
            _ => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    pub fn bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.kind {
            Kind::Bool(b) => Some(b),
            _ => {
                self.expected(node, path, "true or false");
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn int(&mut self, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
        match node.kind {
            Kind::Int(i) if (min..=max).contains(&i) => Some(i),
            Kind::Int(i) => {
                self.error(
                    node,
                    path,
                    format!("{i} is out of range"),
                    Some(format!("use a whole number from {min} to {max}")),
                );
                None
            }
            // Beyond 64 bits YAML gives a float: say it is too large, not that it is a fraction.
            Kind::Float(f) if f.is_finite() && f.fract() == 0.0 => {
                self.error(
                    node,
                    path,
                    "the number is out of range",
                    Some(format!("use a whole number from {min} to {max}")),
                );
                None
            }
            _ => {
                self.expected(node, path, "a whole number");
                None
            }
        }
    }

    /// A list of strings.
    pub fn strings(&mut self, node: &Node, path: &str) -> Option<Vec<(String, Node)>> {
        let items = self.seq(node, path)?;
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = self.string(item, &index(path, i)) {
                out.push((s, item.clone()));
            }
        }
        Some(out)
    }
}

/// A node as plain JSON, for variables handed to templates.
pub fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match &node.kind {
        Kind::Null => Value::Null,
        Kind::Bool(b) => Value::Bool(*b),
        Kind::Int(i) => Value::from(*i),
        Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Kind::Str(s) => Value::String(s.clone()),
        Kind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        Kind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match &k.kind {
                        Kind::Str(s) => s.clone(),
                        other => format!("{other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Node {
        parse(Path::new("t.yaml"), text).expect("parses")
    }

    #[test]
    fn positions_are_one_based() {
        let n = p("a:\n  b: [1, two]\n");
        let Kind::Map(m) = &n.kind else { panic!() };
        let (_, v) = &m[0];
        let Kind::Map(inner) = &v.kind else { panic!() };
        let (k, list) = &inner[0];
        assert_eq!((k.pos.line, k.pos.col), (2, 3));
        let Kind::Seq(items) = &list.kind else {
            panic!()
        };
        assert_eq!((items[1].pos.line, items[1].pos.col), (2, 10));
    }

    #[test]
    fn unknown_keys_all_reported_with_hints() {
        let n = p("nmae: x\nport: 1\nzzz: 2\n");
        let mut d = Decoder::default();
        let f = d.fields(&n, "", &["name", "port"]).unwrap();
        assert!(f.get("port").is_some());
        assert_eq!(d.diags.len(), 2);
        assert_eq!(
            d.diags.0[0].hint.as_deref(),
            Some("did you mean `name`? (expected one of: name, port)")
        );
        assert_eq!(d.diags.0[1].path, "zzz");
        assert_eq!(d.diags.0[1].pos.line, 3);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse(Path::new("bad.yaml"), "a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e.0[0].message.starts_with("YAML syntax error"));
        assert_eq!(&*e.0[0].pos.file, "bad.yaml");
    }

    #[test]
    fn duplicate_key_is_an_error_naming_the_key() {
        let e = parse(
            Path::new("d.yaml"),
            "a: 1\nhosts:\n  db: 1\n  x: 2\n  db: 3\n",
        )
        .unwrap_err();
        let d = &e.0[0];
        assert_eq!((d.pos.line, d.pos.col), (5, 3));
        assert_eq!(d.message, "duplicate key `db`");
        assert_eq!(
            d.hint.as_deref(),
            Some("`db` is already set on line 3; keep one of the two")
        );
        let e = parse(Path::new("d.yaml"), "x: {\"a b\": 1, \"a b\": 2}\n").unwrap_err();
        assert_eq!(e.0[0].message, "duplicate key `\"a b\"`");
    }

    #[test]
    fn unknown_tags_are_refused_where_they_are() {
        for (text, line, col, tag) in [
            ("a: !foo bar\n", 1, 4, "!foo"),
            ("a:\n  b: !!binary aGk=\n", 2, 6, "!!binary"),
            ("a:\n  - !x [1]\n", 2, 5, "!x"),
            ("a: !<tag:x> 1\n", 1, 4, "!<tag:x>"),
        ] {
            let e = parse(Path::new("t.yaml"), text).unwrap_err();
            let d = &e.0[0];
            assert_eq!((d.pos.line, d.pos.col), (line, col), "{text}");
            assert_eq!(d.message, format!("unknown YAML tag `{tag}`"));
        }
        // Core-schema tags that say what the value is anyway are fine.
        assert!(matches!(p("a: !!str 0644\n").kind, Kind::Map(_)));
    }

    /// The deepest document `too_deep` lets through parses, even from a test thread's small
    /// stack; one nested deeper is refused with a position, not a crash.
    #[test]
    fn nesting_is_bounded() {
        let mut text = String::new();
        for i in 0..MAX_INDENT / 2 {
            text.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
        }
        text.push_str(&" ".repeat(MAX_INDENT));
        text.push_str(&"- ".repeat(MAX_COMPACT));
        text.push_str(&"[".repeat(250));
        text.push_str(&"]".repeat(250));
        text.push('\n');
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || parse(Path::new("deep.yaml"), &text).unwrap())
            .unwrap()
            .join()
            .unwrap();
        let e = parse(
            Path::new("d.yaml"),
            &format!("a:\n{}x\n", "- ".repeat(MAX_COMPACT + 1)),
        )
        .unwrap_err();
        assert_eq!((e.0[0].pos.line, e.0[0].pos.col), (2, 1));
        let e = parse(
            Path::new("d.yaml"),
            &format!("a:\n{}x: 1\n", " ".repeat(MAX_INDENT + 1)),
        )
        .unwrap_err();
        assert!(
            e.0[0].message.starts_with("nesting too deep"),
            "{}",
            e.0[0].message
        );
    }

    #[test]
    fn strings_refuse_numbers() {
        let n = p("mode: 0644\n");
        let mut d = Decoder::default();
        let f = d.fields(&n, "", &["mode"]).unwrap();
        assert_eq!(d.string(f.get("mode").unwrap(), "mode"), None);
        assert_eq!(
            d.diags.0[0].message,
            "expected a string, found the integer 644"
        );
    }
}
