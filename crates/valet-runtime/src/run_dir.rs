//! Where runs keep their sockets and code: one root per supervisor
//! (`$TMPDIR/valet-<pid>-<random>`), one private directory per process under it,
//! named by 128 random bits. Each is removed when its owner drops it; the
//! roots of supervisors that died are swept at start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The parent of this supervisor's run directories. Removed on drop.
#[derive(Debug)]
pub struct RunRoot {
    path: PathBuf,
}

const PREFIX: &str = "valet-";

#[allow(unsafe_code)]
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for the process.
    let ret = unsafe { libc::kill(pid, 0) };
    ret == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl RunRoot {
    /// Creates `<parent>/valet-<pid>-<random>` (0711: runs may traverse
    /// it, nobody may list it). The roots of dead supervisors are removed
    /// by [`sweep`], off the way to the first run.
    pub fn create(parent: &Path) -> std::io::Result<RunRoot> {
        let mut bytes = [0u8; 4];
        getrandom(&mut bytes)?;
        let path = parent.join(format!("{PREFIX}{}-{}", std::process::id(), hex(&bytes)));
        std::fs::create_dir_all(parent)?;
        std::fs::create_dir(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711))?;
        Ok(RunRoot { path })
    }

    /// A fresh directory for one process, owned by `owner` when runs have
    /// a uid of their own.
    pub fn dir(&self, owner: Option<(u32, u32)>) -> std::io::Result<RunDir> {
        let mut bytes = [0u8; 16];
        getrandom(&mut bytes)?;
        let path = self.path.join(hex(&bytes));
        std::fs::create_dir(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the root and everything under it (at shutdown).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Drop for RunRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes `valet-<pid>[-…]` directories under `parent` whose process is gone.
pub(crate) fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 != std::process::id() && !process_alive(pid) {
            tracing::info!(dir = %entry.path().display(), "removing the run directory of a dead supervisor");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One process's private directory. Removed on drop.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The directory's name: random, so it doubles as the channel id.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub(crate) fn getrandom(bytes: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_are_unique_private_and_removed() {
        let parent = tempfile::tempdir().expect("tempdir");
        // A dead supervisor's root (pid far above pid_max) is swept.
        let stale = parent.path().join("valet-2147483646-abcd");
        std::fs::create_dir_all(stale.join("x")).expect("stale");
        let root = RunRoot::create(parent.path()).expect("root");
        sweep(parent.path());
        assert!(!stale.exists());
        assert!(
            root.path().exists(),
            "the live supervisor's own root was swept"
        );
        let (a, b) = (root.dir(None).expect("a"), root.dir(None).expect("b"));
        assert_ne!(a.path(), b.path());
        assert_eq!(a.name().len(), 32);
        let mode = std::fs::metadata(a.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
        let root_path = root.path().to_owned();
        drop(b);
        drop(root);
        assert!(!root_path.exists());
    }
}
