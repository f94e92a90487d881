//! Draining: the operator's way to empty a worker (`sage-agent drain`, run by `sagectl drain`
//! over SSH). The flag is a file, `draining`, in the worker's state directory, so it outlives
//! restarts (a drained worker stays drained until undrained) and needs no connection to the
//! running worker: the worker looks at it before each heartbeat and tells its backends, which
//! place no new session there and move the open ones to other workers.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The flag file of a worker whose state directory is `state_dir`.
pub fn flag(state_dir: &Path) -> PathBuf {
    state_dir.join("draining")
}

/// Whether the worker of `state_dir` is draining (the flag file exists).
pub fn is_draining(state_dir: &Path) -> bool {
    flag(state_dir).exists()
}

/// Sets (`on`) or clears the flag; returns whether that changed anything. Setting writes a
/// temporary file and renames it, and both are synced, so the flag is whole and survives a
/// crash or a restart.
pub fn set(state_dir: &Path, on: bool) -> std::io::Result<bool> {
    let path = flag(state_dir);
    if on == path.exists() {
        return Ok(false);
    }
    if on {
        std::fs::create_dir_all(state_dir)?;
        let tmp = state_dir.join(".draining.tmp");
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(
            f,
            "draining since {since} (unix time): no new sessions; `sage-agent drain --undo` ends it"
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            r => r?,
        }
    }
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_a_file_that_outlives_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(!is_draining(&state));
        assert!(set(&state, true).unwrap(), "a change");
        assert!(!set(&state, true).unwrap(), "already draining");
        // What a restarted worker sees: only the file.
        assert!(is_draining(&state));
        assert!(
            std::fs::read_to_string(flag(&state))
                .unwrap()
                .contains("draining since")
        );
        assert!(!state.join(".draining.tmp").exists());
        assert!(set(&state, false).unwrap());
        assert!(!set(&state, false).unwrap(), "already undrained");
        assert!(!is_draining(&state));
    }
}
