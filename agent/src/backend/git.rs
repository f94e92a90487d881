//! Workspaces' repositories as git bundles (stored in PostgreSQL). Every operation works in a
//! fresh temporary directory with the `git` command (no library supports bundles): verify and
//! normalise an upload, list history, revert (a new commit whose tree is an old one's), check
//! out files to publish. git runs without system or user config, with a time limit, and never
//! through a shell.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ApiError;

const GIT_TIMEOUT: Duration = Duration::from_secs(60);

async fn git(dir: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut c = tokio::process::Command::new("git");
    c.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "sagews")
        .env("GIT_AUTHOR_EMAIL", "sagews@localhost")
        .env("GIT_COMMITTER_NAME", "sagews")
        .env("GIT_COMMITTER_EMAIL", "sagews@localhost")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(GIT_TIMEOUT, c.output())
        .await
        .map_err(|_| format!("git {} took longer than {GIT_TIMEOUT:?}", args[0]))?
        .map_err(|e| format!("running git: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let err = err.lines().last().unwrap_or("").to_string();
        return Err(format!("git {} failed: {err}", args[0]));
    }
    Ok(out.stdout)
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).trim().to_string()
}

/// A scratch directory holding `in.bundle` and a bare clone of it as `repo`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    async fn from_bundle(bundle: &[u8]) -> Result<Scratch, ApiError> {
        let dir = tempfile::Builder::new()
            .prefix("sagews-git")
            .tempdir()
            .map_err(|e| ApiError::internal(format!("scratch directory: {e}")))?;
        std::fs::write(dir.path().join("in.bundle"), bundle)
            .map_err(|e| ApiError::internal(format!("writing the bundle: {e}")))?;
        git(
            dir.path(),
            &[
                "-c",
                "transfer.fsckObjects=true",
                "clone",
                "-q",
                "--bare",
                "in.bundle",
                "repo",
            ],
        )
        .await
        .map_err(|e| ApiError::bad(format!("not a valid git bundle: {e}")))?;
        let s = Scratch { dir };
        s.git(&["rev-parse", "--verify", "-q", "HEAD^{commit}"])
            .await
            .map_err(|_| {
                ApiError::bad("not a valid git bundle: it has no HEAD commit (make it with `git bundle create FILE --all`)")
            })?;
        Ok(s)
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    async fn git(&self, args: &[&str]) -> Result<String, String> {
        git(&self.repo(), args).await.map(text)
    }

    async fn bundle(&self) -> Result<Vec<u8>, ApiError> {
        self.git(&["bundle", "create", "-q", "../out.bundle", "--all"])
            .await
            .map_err(ApiError::internal)?;
        std::fs::read(self.dir.path().join("out.bundle"))
            .map_err(|e| ApiError::internal(format!("reading the bundle: {e}")))
    }
}

/// Checks an uploaded bundle (complete, objects valid, has a HEAD commit) and returns it
/// rewritten by our git, so what is stored is always a plain `--all` bundle.
pub async fn normalize(bundle: &[u8]) -> Result<Vec<u8>, ApiError> {
    let s = Scratch::from_bundle(bundle).await?;
    s.bundle().await
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Commit {
    pub commit: String,
    /// Unix seconds.
    pub time: i64,
    pub message: String,
}

/// Newest first, at most `limit`.
pub async fn history(bundle: &[u8], limit: usize) -> Result<Vec<Commit>, ApiError> {
    let s = Scratch::from_bundle(bundle).await?;
    let n = format!("-n{limit}");
    let out = s
        .git(&["log", &n, "--format=%H%x1f%at%x1f%s", "HEAD"])
        .await
        .map_err(ApiError::internal)?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\u{1f}');
            Some(Commit {
                commit: f.next()?.to_string(),
                time: f.next()?.parse().ok()?,
                message: f.next().unwrap_or("").to_string(),
            })
        })
        .collect())
}

/// A commit id as a client may name one: 4 to 64 hex digits.
fn check_commit(c: &str) -> Result<(), ApiError> {
    if (4..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{c:?} is not a commit id (4 to 64 hex digits)"
        )))
    }
}

/// A new commit on top of HEAD whose tree is `commit`'s; history is kept. Returns the new
/// bundle and the new commit's id.
pub async fn revert(bundle: &[u8], commit: &str) -> Result<(Vec<u8>, String), ApiError> {
    check_commit(commit)?;
    let s = Scratch::from_bundle(bundle).await?;
    let full = s
        .git(&[
            "rev-parse",
            "--verify",
            "-q",
            &format!("{commit}^{{commit}}"),
        ])
        .await
        .map_err(|_| ApiError::not_found(format!("no commit {commit} in this workspace")))?;
    s.git(&["merge-base", "--is-ancestor", &full, "HEAD"])
        .await
        .map_err(|_| {
            ApiError::not_found(format!(
                "commit {commit} is not in this workspace's history"
            ))
        })?;
    let tree = s
        .git(&["rev-parse", &format!("{full}^{{tree}}")])
        .await
        .map_err(ApiError::internal)?;
    let short = &full[..12.min(full.len())];
    let msg = format!("Revert to {short}");
    let new = s
        .git(&["commit-tree", &tree, "-p", "HEAD", "-m", &msg])
        .await
        .map_err(ApiError::internal)?;
    s.git(&["update-ref", "-m", &msg, "HEAD", &new])
        .await
        .map_err(ApiError::internal)?;
    Ok((s.bundle().await?, new))
}

/// The files of HEAD, checked out in a temporary directory (without `.git`).
pub async fn checkout(bundle: &[u8]) -> Result<tempfile::TempDir, ApiError> {
    let s = Scratch::from_bundle(bundle).await?;
    let out = tempfile::Builder::new()
        .prefix("sagews-pub")
        .tempdir()
        .map_err(|e| ApiError::internal(format!("scratch directory: {e}")))?;
    let dest = out.path().join("files");
    git(
        s.dir.path(),
        &[
            "clone",
            "-q",
            "repo",
            dest.to_str().expect("utf-8 temp path"),
        ],
    )
    .await
    .map_err(ApiError::internal)?;
    std::fs::remove_dir_all(dest.join(".git"))
        .map_err(|e| ApiError::internal(format!("removing .git: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) {
        let o = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
    }

    /// A bundle with two commits: a.txt "one" then "two"; returns it and the first commit.
    pub fn two_commits() -> (Vec<u8>, String) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        sh(p, &["init", "-q", "-b", "main"]);
        std::fs::write(p.join("a.txt"), "one").unwrap();
        sh(p, &["add", "-A"]);
        sh(p, &["commit", "-q", "-m", "first"]);
        let first = String::from_utf8(
            std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(p)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        std::fs::write(p.join("a.txt"), "two").unwrap();
        sh(p, &["commit", "-q", "-am", "second"]);
        sh(p, &["bundle", "create", "-q", "b.bundle", "--all"]);
        (std::fs::read(p.join("b.bundle")).unwrap(), first)
    }

    #[tokio::test]
    async fn history_revert_checkout() {
        let (b, first) = two_commits();
        let b = normalize(&b).await.unwrap();
        let h = history(&b, 10).await.unwrap();
        assert_eq!(
            h.iter().map(|c| c.message.as_str()).collect::<Vec<_>>(),
            ["second", "first"]
        );
        let (b2, new) = revert(&b, &first[..10]).await.unwrap();
        let h2 = history(&b2, 10).await.unwrap();
        assert_eq!(h2.len(), 3);
        assert_eq!(h2[0].commit, new);
        let files = checkout(&b2).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(files.path().join("files/a.txt")).unwrap(),
            "one"
        );
        assert!(!files.path().join("files/.git").exists());
        // Not in the history, not hex, not a commit at all.
        assert!(revert(&b, "deadbeef").await.is_err());
        assert!(revert(&b, "HEAD~1; rm -rf /").await.is_err());
    }

    #[tokio::test]
    async fn corrupt_bundles_are_refused() {
        let (b, _) = two_commits();
        let e = normalize(b"not a bundle").await.unwrap_err();
        assert!(e.message.contains("not a valid git bundle"), "{e:?}");
        let mut cut = b.clone();
        cut.truncate(b.len() / 2);
        assert!(normalize(&cut).await.is_err());
        let mut flipped = b.clone();
        let n = flipped.len();
        flipped[n - 30] ^= 0xff;
        assert!(normalize(&flipped).await.is_err());
    }
}
