//! Finding the Deno binary: `VALET_DENO`, then the pinned install made by
//! `just setup`, then `PATH`.

use std::path::{Path, PathBuf};

use crate::RuntimeError;

/// The Deno release valet is tested with; `just setup` installs it.
pub const DENO_VERSION: &str = "2.9.6";

/// Where `just setup` puts the pinned Deno, relative to the repository root.
const PINNED: &str = "tools/deno/node_modules/@deno/linux-x64-glibc/deno";

pub fn find_deno() -> Result<PathBuf, RuntimeError> {
    if let Some(path) = std::env::var_os("VALET_DENO") {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(RuntimeError::DenoNotFound(format!(
                "VALET_DENO is set to '{}', which is not an executable file",
                path.display()
            )))
        };
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    // Next to the repository this binary was built from.
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(PINNED),
    );
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join(PINNED));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(PINNED));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("deno")));
    }
    candidates.into_iter().find(|p| is_executable(p)).ok_or_else(|| {
        RuntimeError::DenoNotFound(format!(
            "Deno was not found: run `just setup` (installs the pinned Deno {DENO_VERSION} into {PINNED}), \
             or set VALET_DENO=/path/to/deno"
        ))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
