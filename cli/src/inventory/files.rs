//! Reading the user's files (inventory, includes, the site certificate): regular files only,
//! and at most a size cap of each. A FIFO would block `open` or `read` forever, `/dev/zero`
//! would fill memory; both are refused with an error naming what the path is.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opening a FIFO with O_NONBLOCK returns at once, and a file that blocks on read
/// (`/proc/kmsg`) fails instead of hanging.
const O_NONBLOCK: i32 = libc::O_NONBLOCK;

/// The most sagectl reads of one inventory file: far more than any inventory needs.
pub const MAX_INVENTORY_FILE: u64 = 1 << 20;

/// What a path that is not a regular file is, for messages.
fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn refuse(m: &Metadata) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}, not a regular file", kind(m)),
    )
}

/// The bytes of the regular file at `path` (symlinks followed), refusing anything else and
/// anything larger than `cap` bytes.
pub fn read_regular(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    let before = std::fs::metadata(path)?;
    if !before.is_file() {
        return Err(refuse(&before));
    }
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)?;
    // And again on what was opened, in case the path was swapped in between.
    let opened = file.metadata()?;
    if !opened.is_file() {
        return Err(refuse(&opened));
    }
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            if cap % (1 << 20) == 0 {
                format!("larger than {} MiB", cap >> 20)
            } else {
                format!("larger than {} KiB", cap >> 10)
            },
        )
    };
    if opened.len() > cap {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    // The length can change while reading (a file being written): read one byte past the cap.
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(bytes)
}

/// A regular file as UTF-8 text, as `read_regular` reads it.
pub fn read_text(path: &Path, cap: u64) -> io::Result<String> {
    String::from_utf8(read_regular(path, cap)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let e = read_text(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(e.to_string(), "a character device, not a regular file");
        let e = read_text(Path::new("/"), 1024).unwrap_err();
        assert_eq!(e.to_string(), "a directory, not a regular file");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("pipe.yaml");
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let e = read_text(&p, 1024).unwrap_err();
        assert_eq!(e.to_string(), "a FIFO (named pipe), not a regular file");
        // Through a symlink too.
        let l = tmp.path().join("link.yaml");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(read_text(&l, 1024).is_err());
    }

    #[test]
    fn caps_the_size() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("big.yaml");
        std::fs::write(&p, vec![b'a'; 2048]).unwrap();
        assert_eq!(read_text(&p, 2048).unwrap().len(), 2048);
        let e = read_text(&p, 2047).unwrap_err();
        assert_eq!(e.to_string(), "larger than 1 KiB");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_text(&p, 2048).unwrap_err().to_string(),
            "not UTF-8 text (byte 0)"
        );
    }
}
