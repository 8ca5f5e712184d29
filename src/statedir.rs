//! One process at a time in a state directory (`[purge] dir`).
//!
//! The directory holds append-only logs (the purge queue, the fleet outbox) that a process
//! replays when it opens them and appends to afterwards; two processes appending to and
//! compacting the same logs would lose each other's records. [`DirLock`] is an exclusive
//! `flock` on `<dir>/aisle.lock`, taken before the logs are opened and held until the process
//! exits or hands the directory over: during a graceful upgrade (`aisle run --upgrade`) the new
//! process waits for the lock while the old one still serves, and the old one releases it
//! (after closing its logs) when its shutdown starts. The file names the holder's pid so the
//! error for a second instance on one directory can say who holds it. A leaf: only `std`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "aisle.lock";

/// Held exclusively while this process owns the directory; released on drop.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing), waiting up to `wait` for another process
    /// to release it. The error says which directory, which process holds it, and what to do.
    pub fn acquire(dir: &Path, wait: Duration) -> Result<DirLock, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(format!(
                        "{} is in use by another aisle process{} (waited {wait:?}): each \
                         instance needs its own [purge] dir; during an upgrade the old process \
                         releases it when its shutdown starts",
                        dir.display(),
                        if holder.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {holder})")
                        }
                    ));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(format!("cannot lock {}: {e}", path.display()));
                }
            }
        }
        // Whoever holds the lock writes its pid (for the message above); a failure here only
        // makes that message less precise.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.sync_all();
        Ok(DirLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let err = DirLock::acquire(dir.path(), Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("in use by another aisle process"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DirLock::acquire(dir.path(), Duration::ZERO).expect("free again after release");
    }

    #[test]
    fn a_waiting_holder_gets_the_lock_once_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || DirLock::acquire(&path, Duration::from_secs(10)));
        drop(first);
        let second = waiter.join().unwrap().expect("the waiter takes over");
        assert!(second.path().ends_with(LOCK_FILE));
    }
}
