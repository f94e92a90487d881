//! Diagnostics: problems found in a user's files, each with file, line, column, a path such as
//! `hosts.web1.roles[2]`, a message and an optional hint. Reported all at once, never one by one.
//! This is where they are printed, so this is where text from the user's files is made safe for
//! a terminal: control and invisible formatting characters are shown escaped, never sent raw.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// A place in a source file (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pos {
    pub file: Arc<str>,
    pub line: usize,
    pub col: usize,
}

impl Pos {
    /// The start of `file`, for problems that belong to a file as a whole.
    pub fn file_start(file: &Path) -> Pos {
        Pos {
            file: display_path(file).into(),
            line: 1,
            col: 1,
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", escape(&self.file), self.line, self.col)
    }
}

/// Whether `c` must not reach a terminal raw: control characters (an escape sequence can
/// rewrite the screen, a carriage return hide what came before) and invisible formatting
/// characters (bidirectional overrides reorder what is shown).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// `s` with every control or invisible formatting character written as an escape (`\n`,
/// `\u{1b}`), so a message shows what the file holds and nothing can act on the terminal.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A path shown as given when relative, so messages stay short and stable in tests.
pub fn display_path(p: &Path) -> String {
    p.display().to_string()
}

/// One problem in an input file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub pos: Pos,
    /// Where in the document: `hosts.web1.roles[2]`; empty for the document itself.
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.pos)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", escape(&self.path))?;
        }
        write!(f, "{}", escape(&self.message))?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {}", escape(h))?;
        }
        Ok(())
    }
}

/// Every problem found in one read of the inventory, in the order of the files.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(
        &mut self,
        pos: &Pos,
        path: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.0.push(Diagnostic {
            pos: pos.clone(),
            path: path.to_string(),
            message: message.into(),
            hint,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "error: {d}")?;
        }
        let n = self.0.len();
        write!(f, "{n} problem{} found", if n == 1 { "" } else { "s" })
    }
}

/// The candidate closest to `word` when it is a likely typo of it (for "did you mean" hints).
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance over chars, counting a swap of neighbours as one edit (optimal string
/// alignment), since `bd` for `db` is the commonest typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// A hint naming the closest candidate, or else listing all of them.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    match closest(word, candidates.iter().copied()) {
        Some(c) => format!(
            "did you mean `{c}`? (expected one of: {})",
            candidates.join(", ")
        ),
        None => format!("expected one of: {}", candidates.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typos_only() {
        let roles = ["loadbalancer", "static", "database"];
        assert_eq!(closest("loadbalncer", roles), Some("loadbalancer"));
        assert_eq!(closest("databse", roles), Some("database"));
        assert_eq!(closest("mail", roles), None);
    }

    #[test]
    fn terminal_control_is_escaped() {
        assert_eq!(escape("plain `text` é"), "plain `text` é");
        assert_eq!(
            escape("a\x1b[31mred\r\n\0\t"),
            "a\\u{1b}[31mred\\r\\n\\0\\t"
        );
        assert_eq!(escape("\u{202e}evil\u{9b}"), "\\u{202e}evil\\u{9b}");
        let d = Diagnostic {
            pos: Pos {
                file: "f\x07.yaml".into(),
                line: 1,
                col: 2,
            },
            path: "hosts.a\x1b".into(),
            message: "bad `\x1b]0;x\x07`".into(),
            hint: Some("h\n".into()),
        };
        let shown = d.to_string();
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        assert_eq!(
            shown,
            "f\\u{7}.yaml:1:2: hosts.a\\u{1b}: bad `\\u{1b}]0;x\\u{7}`\n  hint: h\\n"
        );
    }

    #[test]
    fn edit_distance_counts() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(edit_distance("bd", "db"), 1);
    }
}
