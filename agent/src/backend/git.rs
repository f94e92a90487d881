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

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A regular file of HEAD's tree, as the client will see it published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Path relative to what was asked for (the file's name when one file was asked for).
    pub path: String,
    pub data: Vec<u8>,
}

/// One entry of `git ls-tree -r -t -l -z HEAD`.
#[derive(Debug, PartialEq, Eq)]
struct TreeEntry {
    mode: String,
    kind: String,
    oid: String,
    size: Option<u64>,
    path: Vec<u8>,
}

fn parse_ls_tree(out: &[u8]) -> Vec<TreeEntry> {
    out.split(|&b| b == 0)
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let tab = l.iter().position(|&b| b == b'\t')?;
            let head = std::str::from_utf8(&l[..tab]).ok()?;
            let mut f = head.split_ascii_whitespace();
            Some(TreeEntry {
                mode: f.next()?.to_string(),
                kind: f.next()?.to_string(),
                oid: f.next()?.to_string(),
                size: f.next()?.parse().ok(),
                path: l[tab + 1..].to_vec(),
            })
        })
        .collect()
}

/// Limits on what one `files` call may read.
#[derive(Clone, Copy, Debug)]
pub struct FileLimits {
    pub max_files: usize,
    pub max_bytes: u64,
}

/// The regular files of HEAD at `sub` (a file, or every file under a directory; `""` is the
/// whole tree), read from the repository's objects. Nothing is ever checked out: a symbolic
/// link in the workspace is only a blob holding its target's text, so no path through one can
/// reach the backend's own files (a checkout followed by `join` did, once). Symbolic links and
/// submodules under a directory are left out; asking for one by name is refused.
/// `sub` must already be checked by the caller's path rules (relative, no `..`, no `.git`).
pub async fn files(bundle: &[u8], sub: &str, limits: FileLimits) -> Result<Vec<Blob>, ApiError> {
    let s = Scratch::from_bundle(bundle).await?;
    let out = git(
        &s.repo(),
        &["ls-tree", "-r", "-t", "-l", "-z", "--full-tree", "HEAD"],
    )
    .await
    .map_err(ApiError::internal)?;
    let entries = parse_ls_tree(&out);
    let sub = sub.trim_end_matches('/').as_bytes();
    // What the published paths are relative to, and whether one file was asked for.
    let (prefix, single): (Vec<u8>, bool) = if sub.is_empty() {
        (Vec::new(), false)
    } else {
        match entries.iter().find(|e| e.path == sub) {
            None => {
                return Err(ApiError::not_found(format!(
                    "no file or directory {:?} in the last save",
                    String::from_utf8_lossy(sub)
                )));
            }
            Some(e) if e.kind == "tree" => ([sub, b"/"].concat(), false),
            Some(e) if e.kind == "blob" && e.mode != "120000" => {
                // One file: published under its own name.
                let cut = sub.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
                (sub[..cut].to_vec(), true)
            }
            Some(_) => {
                return Err(ApiError::bad(format!(
                    "{:?} is a symbolic link or a submodule: only regular files are published",
                    String::from_utf8_lossy(sub)
                )));
            }
        }
    };
    let mut chosen = Vec::new();
    let mut total = 0u64;
    for e in &entries {
        let regular = e.kind == "blob" && (e.mode == "100644" || e.mode == "100755");
        if !regular || !e.path.starts_with(&prefix) || (single && e.path != sub) {
            continue;
        }
        let rel = String::from_utf8(e.path[prefix.len()..].to_vec()).map_err(|_| {
            ApiError::bad(format!(
                "the file name {:?} is not UTF-8: rename it to publish it",
                String::from_utf8_lossy(&e.path)
            ))
        })?;
        // A tree made by hand may name `..` or `.git` (git's fsck refuses them, but not every
        // git runs it on a bundle): such a path would leave `/pub/<workspace>/`.
        if crate::proto::workspace_path(&rel).as_deref() != Ok(rel.as_str()) {
            return Err(ApiError::bad(format!(
                "the saved tree holds the path {rel:?}, which cannot be published"
            )));
        }
        total += e.size.unwrap_or(0);
        chosen.push((rel, e.oid.clone()));
        if chosen.len() > limits.max_files {
            return Err(ApiError::too_large(format!(
                "more than {} files: choose a subdirectory",
                limits.max_files
            )));
        }
        if total > limits.max_bytes {
            return Err(ApiError::too_large(format!(
                "more than {} bytes of files: choose a subdirectory or a file",
                limits.max_bytes
            )));
        }
    }
    let data = cat_blobs(&s.repo(), chosen.iter().map(|(_, o)| o.as_str())).await?;
    Ok(chosen
        .into_iter()
        .zip(data)
        .map(|((path, _), data)| Blob { path, data })
        .collect())
}

/// The contents of blobs, in order, through one `git cat-file --batch`.
async fn cat_blobs<'a>(
    repo: &Path,
    oids: impl Iterator<Item = &'a str>,
) -> Result<Vec<Vec<u8>>, ApiError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let input: String = oids.map(|o| format!("{o}\n")).collect();
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let mut c = tokio::process::Command::new("git");
    c.args(["cat-file", "--batch"])
        .current_dir(repo)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = c
        .spawn()
        .map_err(|e| ApiError::internal(format!("running git: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
    });
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("piped"));
    let read = async {
        let mut blobs = Vec::new();
        let mut header = String::new();
        loop {
            header.clear();
            if out.read_line(&mut header).await? == 0 {
                break;
            }
            // "<oid> blob <size>"
            let size: usize = header
                .split_ascii_whitespace()
                .nth(2)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("git said {header:?}")))?;
            let mut data = vec![0; size + 1];
            out.read_exact(&mut data).await?;
            data.pop(); // the newline after each object
            blobs.push(data);
        }
        Ok::<_, std::io::Error>(blobs)
    };
    let blobs = tokio::time::timeout(GIT_TIMEOUT, read)
        .await
        .map_err(|_| ApiError::internal("git cat-file took too long"))?
        .map_err(|e| ApiError::internal(format!("reading blobs: {e}")))?;
    let _ = writer.await;
    let _ = child.wait().await;
    Ok(blobs)
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
        let lim = FileLimits {
            max_files: 10,
            max_bytes: 1000,
        };
        let got = files(&b2, "", lim).await.unwrap();
        assert_eq!(
            got,
            [Blob {
                path: "a.txt".into(),
                data: b"one".to_vec()
            }]
        );
        // Not in the history, not hex, not a commit at all.
        assert!(revert(&b, "deadbeef").await.is_err());
        assert!(revert(&b, "HEAD~1; rm -rf /").await.is_err());
    }

    #[tokio::test]
    async fn files_come_from_objects_and_never_follow_symbolic_links() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        sh(p, &["init", "-q", "-b", "main"]);
        std::os::unix::fs::symlink("/etc", p.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("pw")).unwrap();
        std::fs::create_dir_all(p.join("d/e")).unwrap();
        std::fs::write(p.join("d/x.txt"), "x").unwrap();
        std::fs::write(p.join("d/e/y.txt"), "y").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", p.join("d/h")).unwrap();
        std::fs::write(p.join("top.txt"), "top").unwrap();
        sh(p, &["add", "-A"]);
        sh(p, &["commit", "-q", "-m", "links"]);
        sh(p, &["bundle", "create", "-q", "b.bundle", "--all"]);
        let b = std::fs::read(p.join("b.bundle")).unwrap();
        let lim = FileLimits {
            max_files: 100,
            max_bytes: 1 << 20,
        };
        let names = |v: Vec<Blob>| v.into_iter().map(|b| b.path).collect::<Vec<_>>();
        // Through a link to a directory: there is no such path in the tree.
        for through in ["link/passwd", "link/ssh/sshd_config", "d/h/x"] {
            let e = files(&b, through, lim).await.unwrap_err();
            assert_eq!(e.status, 404, "{through}: {e:?}");
        }
        // A link by name: refused.
        for link in ["pw", "link", "link/", "d/h"] {
            let e = files(&b, link, lim).await.unwrap_err();
            assert!(e.message.contains("symbolic link"), "{link}: {e:?}");
        }
        // Directories: regular files only, relative to the directory.
        assert_eq!(
            names(files(&b, "", lim).await.unwrap()),
            ["d/e/y.txt", "d/x.txt", "top.txt"]
        );
        assert_eq!(
            names(files(&b, "d", lim).await.unwrap()),
            ["e/y.txt", "x.txt"]
        );
        let one = files(&b, "d/e/y.txt", lim).await.unwrap();
        assert_eq!(
            one,
            [Blob {
                path: "y.txt".into(),
                data: b"y".to_vec()
            }]
        );
        // Limits.
        let few = FileLimits {
            max_files: 2,
            ..lim
        };
        assert_eq!(files(&b, "", few).await.unwrap_err().status, 413);
        let small = FileLimits {
            max_bytes: 2,
            ..lim
        };
        assert_eq!(files(&b, "", small).await.unwrap_err().status, 413);
    }

    /// A tree made by hand with a `..` entry (git's fsck would refuse it; a bundle need not
    /// have been checked) is refused rather than published outside the workspace's directory.
    #[tokio::test]
    async fn a_hand_made_tree_with_dot_dot_is_not_published() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let out = |args: &[&str], input: &str| -> String {
            use std::io::Write;
            let mut c = std::process::Command::new("git")
                .args(args)
                .current_dir(p)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@t")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@t")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{args:?}");
            String::from_utf8(o.stdout).unwrap().trim().to_string()
        };
        sh(p, &["init", "-q", "-b", "main"]);
        let blob = out(&["hash-object", "-w", "--stdin"], "overwritten");
        let inner = out(&["mktree"], &format!("100644 blob {blob}\tindex.html\n"));
        let top = out(
            &["mktree"],
            &format!("040000 tree {inner}\t..\n100644 blob {blob}\tok.txt\n"),
        );
        let commit = out(&["commit-tree", &top, "-m", "evil"], "");
        sh(p, &["update-ref", "refs/heads/main", &commit]);
        sh(p, &["bundle", "create", "-q", "b.bundle", "--all"]);
        let b = std::fs::read(p.join("b.bundle")).unwrap();
        let lim = FileLimits {
            max_files: 10,
            max_bytes: 1 << 20,
        };
        match files(&b, "", lim).await {
            Err(e) => assert!(e.message.contains("cannot be published"), "{e:?}"),
            // This git refused the tree on the way in: nothing to publish either way.
            Ok(v) => panic!(
                "published {:?}",
                v.iter().map(|b| &b.path).collect::<Vec<_>>()
            ),
        }
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
