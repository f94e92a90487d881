//! The one place that turns an argument list into a POSIX shell command line (for SSH, which
//! runs a string through the remote user's shell). Every argument is single-quoted unless it is
//! made only of characters no shell treats specially.

/// Quotes one argument for a POSIX shell.
pub fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        return arg.to_string();
    }
    // Inside single quotes nothing is special except the quote itself: end the quoted part,
    // add an escaped quote, start again.
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Joins an argument list into one shell command line.
pub fn join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs the quoted line through a real `sh` and returns the arguments it saw.
    fn through_sh(argv: &[&str]) -> Vec<String> {
        let line = format!("printf '%s\\0' {}", join(argv));
        let out = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .expect("sh runs");
        assert!(out.status.success(), "{line}");
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_terminator('\0').map(String::from).collect()
    }

    #[test]
    fn plain_words_stay_plain() {
        assert_eq!(
            join(&["apt-get", "install", "-y", "haproxy"]),
            "apt-get install -y haproxy"
        );
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn hostile_arguments_round_trip() {
        let cases = [
            "a b",
            "it's",
            "\"double\"",
            "$HOME",
            "`id`",
            "$(id)",
            "line\nbreak",
            "back\\slash",
            "semi;colon && rm -rf /",
            "glob*?[a]",
            "~user",
            "#comment",
            "tab\there",
            "/etc/sage agent/'it's' \"q\" $x `y`\nz.conf",
            "",
        ];
        for c in cases {
            assert_eq!(through_sh(&[c]), vec![c.to_string()], "case {c:?}");
        }
        assert_eq!(
            through_sh(&cases),
            cases.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        );
    }
}
