//! The runtime's JavaScript (bootstrap, std shims, import map) is compiled
//! into the binary and written out once per content hash, so a `valet`
//! binary is self-contained and never runs stale shims.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

macro_rules! runtime_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../../runtime-js/", $path)))),*]
    };
}

const FILES: &[(&str, &str)] = runtime_files!(
    "bootstrap.ts",
    "import_map.json",
    "std/_client.ts",
    "std/API_URL.ts",
    "std/blob.ts",
    "std/email.ts",
    "std/sqlite.ts",
    "esm/blob",
    "esm/sqlite",
    "esm/email",
    "esm/API_URL",
    "esm/ValTownBlobError",
    "esm/ValTownBlobNotFoundError",
    "esm/blob.d/main.ts",
    "esm/sqlite.d/main.ts",
    "esm/sqlite.d/global.ts",
    "esm/email.d/main.ts",
    "esm/API_URL.d/main.ts",
);

/// The runtime's directory: shared by every valet of this user at
/// `<tmp>/valet-runtime/runtime-js-<hash>` so Deno's transpile cache keeps
/// hitting across processes (a fresh path per process would make every
/// `valet run` transpile the bootstrap again), or under `fallback` when the
/// shared place is not safely ours (owned by another user, or writable by
/// others: someone could plant files there).
pub fn install_shared(fallback: &Path) -> std::io::Result<PathBuf> {
    let shared = std::env::temp_dir().join("valet-runtime");
    let safe = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.is_dir() && m.uid() == effective_uid() && m.mode() & 0o022 == 0)
    };
    if std::fs::create_dir(&shared).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755))?;
    }
    if safe(&shared)
        && let Ok(dir) = install(&shared)
        && safe(&dir)
    {
        return Ok(dir);
    }
    install(fallback)
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Writes the runtime files under `parent` and returns their directory.
pub fn install(parent: &Path) -> std::io::Result<PathBuf> {
    let mut hash = Sha256::new();
    for (path, text) in FILES {
        hash.update(path.as_bytes());
        hash.update(text.as_bytes());
    }
    let dir = parent.join(format!(
        "runtime-js-{}",
        &hex::encode(hash.finalize())[..12]
    ));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    // Write into a private temp dir, then rename, so two processes starting
    // at once never see a half-written tree.
    let tmp = parent.join(format!(".runtime-js-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (path, text) in FILES {
        let target = tmp.join(path);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(target, text)?;
    }
    std::fs::write(tmp.join(".complete"), b"")?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join(".complete").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}
