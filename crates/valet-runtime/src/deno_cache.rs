//! Deno's cache as a run process sees it: a directory of its own,
//! `<run dir>/deno`, made before the process starts and gone with it.
//!
//! - Its analysis databases (dependency and node analysis) are private
//!   copies of a *seed* that valet makes once from its own runtime files,
//!   so a new process finds the bootstrap and the std shims analysed
//!   without sharing a database file with any other run.
//! - Its transpiled modules (`gen`) are private too. The runtime's own are
//!   a link into the seed, which runs can read but not write; a val's are
//!   written next to them and go with the run. (One `gen` shared by every
//!   run would let a val plant a transpiled bootstrap, with a valid cache
//!   footer, that every later process runs.)
//! - Downloaded modules and npm packages ([`SHARED`]) are links to the
//!   shared cache, so a package is fetched once for all runs.
//!
//! The seed is made by running the bootstrap in its seed mode, with the
//! run processes' own command line, as valet's own user: nothing of a val
//! or its owner is involved. It sits in the runtime's directory, keyed by
//! the Deno binary; a seed that cannot be made leaves runs correct but
//! slower (each analyses and transpiles the bootstrap again).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

/// The directories of the shared cache a run reaches through its own:
/// remote modules, their older layout, registry metadata, npm packages.
pub const SHARED: [&str; 4] = ["npm", "remote", "deps", "registries"];

/// The seed's files a run gets a private copy of: its databases (whose
/// write-ahead logs are folded into them when the seed is made).
fn is_database(name: &str) -> bool {
    name.ends_with("_v2")
}

/// The shared cache, and the seed every run's cache starts from.
#[derive(Debug)]
pub struct DenoCache {
    shared: PathBuf,
    /// [`SHARED`]'s directories, opened when they were checked (not
    /// following links): what Landlock grants is what was checked.
    shared_fds: Vec<Arc<OwnedFd>>,
    seed: Option<Seed>,
}

#[derive(Debug)]
struct Seed {
    dir: PathBuf,
    /// Names of the files copied into each run's cache.
    copied: Vec<OsString>,
    /// Where the runtime's transpiled files sit under `gen` (e.g.
    /// `file/tmp/valet-runtime/runtime-js-<hash>`), linked from each run's.
    runtime_gen: Option<PathBuf>,
}

impl DenoCache {
    /// The shared cache at `shared`, with its directories made (and owned
    /// by the runs, which write them); no seed.
    ///
    /// valet (often root) works on these paths, and Landlock grants what
    /// they name: so `shared` must be valet's own and writable by nobody
    /// else, and neither it nor its directories may be links (a planted
    /// `npm -> /etc` would have root hand `/etc` to the runs' uid, and
    /// Landlock open it to every run). Anything else is refused, never
    /// repaired.
    pub fn open(shared: &Path, owner: Option<(u32, u32)>) -> std::io::Result<DenoCache> {
        make_dir_if_missing(shared)?;
        check_own_dir(shared, effective_uid())?;
        // Its directories are the runs' uid's (they write them), writable
        // by no one else; the first time (a cache made before runs had this
        // uid) their contents too, never through a link.
        let want = owner.map_or_else(effective_uid, |(uid, _)| uid);
        let mut shared_fds = Vec::new();
        for sub in SHARED {
            let dir = shared.join(sub);
            make_dir_if_missing(&dir)?;
            let meta = std::fs::symlink_metadata(&dir)?;
            if let Some(owner) = owner
                && meta.file_type().is_dir()
                && meta.uid() != want
            {
                lchown_tree(&dir, owner)?;
            }
            let checked = check_own_dir(&dir, want)?;
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = rustix::fs::openat(CWD, &dir, flags, Mode::empty())?;
            let opened = rustix::fs::fstat(&fd)?;
            if (opened.st_dev, opened.st_ino) != (checked.dev(), checked.ino()) {
                return Err(std::io::Error::other(format!(
                    "Deno's cache directory {} changed while valet checked it",
                    dir.display()
                )));
            }
            shared_fds.push(Arc::new(fd));
        }
        Ok(DenoCache {
            shared: shared.to_owned(),
            shared_fds,
            seed: None,
        })
    }

    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// The shared directories runs write (through the links in their own),
    /// as opened when they were checked.
    pub fn shared_dirs(&self) -> Vec<Arc<OwnedFd>> {
        self.shared_fds.clone()
    }

    /// Uses the seed at `<runtime_dir>/.deno-seed-<id of deno>`, making it
    /// first with `seed_command` (the bootstrap in seed mode; its
    /// `DENO_DIR` is set here) when it is not there.
    pub fn seed(
        &mut self,
        deno: &Path,
        runtime_dir: &Path,
        seed_command: impl FnOnce() -> std::process::Command,
    ) -> Result<(), String> {
        let dir = runtime_dir.join(format!(".deno-seed-{}", binary_id(deno)?));
        if !dir.is_dir() {
            make_seed(&dir, seed_command)?;
        }
        let mut copied = Vec::new();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot read Deno's seed cache {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(is_database) && entry.path().is_file() {
                copied.push(name);
            }
        }
        let runtime_gen = find_file(&dir.join("gen"), "bootstrap.ts.js").and_then(|path| {
            path.parent()?
                .strip_prefix(dir.join("gen"))
                .ok()
                .map(PathBuf::from)
        });
        self.seed = Some(Seed {
            dir,
            copied,
            runtime_gen,
        });
        Ok(())
    }

    /// Makes the cache of a process whose private directory is `run_dir`
    /// and returns its path: `DENO_DIR` for that process.
    pub fn for_run(&self, run_dir: &Path, owner: Option<(u32, u32)>) -> std::io::Result<PathBuf> {
        let own = run_dir.join("deno");
        make_dir(&own, owner)?;
        for sub in SHARED {
            std::os::unix::fs::symlink(self.shared.join(sub), own.join(sub))?;
        }
        let Some(seed) = &self.seed else {
            return Ok(own);
        };
        for name in &seed.copied {
            let to = own.join(name);
            std::fs::copy(seed.dir.join(name), &to)?;
            crate::launcher::chown(&to, owner)?;
        }
        if let Some(runtime_gen) = &seed.runtime_gen {
            // The directories down to the runtime's are the run's (its
            // val's transpiled files go under them); the last step is a
            // link into the seed, which the run cannot write.
            let mut at = own.join("gen");
            make_dir(&at, owner)?;
            let mut steps = runtime_gen.components().peekable();
            while let Some(step) = steps.next() {
                at.push(step);
                if steps.peek().is_none() {
                    std::os::unix::fs::symlink(seed.dir.join("gen").join(runtime_gen), &at)?;
                } else {
                    make_dir(&at, owner)?;
                }
            }
        }
        Ok(own)
    }
}

/// Makes `path` (mode 0755) unless something is there already.
fn make_dir_if_missing(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Refuses `path` unless it is a directory (not a link) owned by `uid`
/// and writable by no one else.
fn check_own_dir(path: &Path, uid: u32) -> std::io::Result<std::fs::Metadata> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "Deno's cache directory {} must be a directory (not a link) owned by uid {uid} \
             and writable by no one else (it is {}, uid {}, mode {:o}): remove it, or give \
             valet another cache directory",
            path.display(),
            if meta.file_type().is_symlink() {
                "a link"
            } else if meta.is_dir() {
                "a directory"
            } else {
                "a file"
            },
            meta.uid(),
            meta.mode() & 0o7777,
        )));
    }
    Ok(meta)
}

/// Gives the directory `path` and everything under it to `owner`, through
/// directory descriptors opened without following links: a link is
/// changed itself, never what it points to, and a directory swapped for a
/// link while the walk runs is not entered. Entries that vanish meanwhile
/// (Deno renames its temporary files into place) are skipped.
fn lchown_tree(path: &Path, owner: (u32, u32)) -> std::io::Result<()> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
    let dir = rustix::fs::openat(CWD, path, flags, Mode::empty())?;
    chown_dir(&dir, owner)?;
    fn chown_dir(dir: &OwnedFd, (uid, gid): (u32, u32)) -> std::io::Result<()> {
        let ids = (
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        );
        rustix::fs::fchown(dir, ids.0, ids.1)?;
        for entry in rustix::fs::Dir::read_from(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            // A file with other names may be someone else's, linked in
            // (where the kernel lets anyone link what they do not own).
            match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat)
                    if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                        == rustix::fs::FileType::RegularFile
                        && stat.st_nlink > 1 =>
                {
                    continue;
                }
                Err(rustix::io::Errno::NOENT) => continue,
                _ => {}
            }
            match rustix::fs::chownat(dir, name, ids.0, ids.1, AtFlags::SYMLINK_NOFOLLOW) {
                Err(rustix::io::Errno::NOENT) => continue,
                other => other?,
            }
            if matches!(
                entry.file_type(),
                rustix::fs::FileType::Directory | rustix::fs::FileType::Unknown
            ) {
                let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
                match rustix::fs::openat(dir, name, flags, Mode::empty()) {
                    Ok(sub) => chown_dir(&sub, (uid, gid))?,
                    // Gone, or swapped for a link or a file: not entered.
                    Err(
                        rustix::io::Errno::NOENT
                        | rustix::io::Errno::LOOP
                        | rustix::io::Errno::NOTDIR,
                    ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
    Ok(())
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn make_dir(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::create_dir(path)?;
    crate::launcher::chown(path, owner)
}

/// Names a Deno binary by its path, size and modification time: a new
/// Deno gets a new seed.
fn binary_id(deno: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let meta =
        std::fs::metadata(deno).map_err(|e| format!("cannot read {}: {e}", deno.display()))?;
    let mut hash = Sha256::new();
    hash.update(deno.as_os_str().as_encoded_bytes());
    hash.update(meta.len().to_le_bytes());
    hash.update(meta.mtime().to_le_bytes());
    hash.update(meta.mtime_nsec().to_le_bytes());
    Ok(hex::encode(hash.finalize())[..12].to_owned())
}

/// Runs the bootstrap in seed mode with a fresh cache, then moves that
/// cache into place in one rename (a valet racing to do the same keeps
/// whichever landed first).
fn make_seed(
    dir: &Path,
    seed_command: impl FnOnce() -> std::process::Command,
) -> Result<(), String> {
    let mut suffix = [0u8; 6];
    crate::run_dir::getrandom(&mut suffix)
        .map_err(|e| format!("no randomness for the seed's name: {e}"))?;
    let mut name = dir.as_os_str().to_owned();
    name.push(format!(".{}-{}", std::process::id(), hex::encode(suffix)));
    let tmp = PathBuf::from(name);
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(|e| format!("cannot make {}: {e}", tmp.display()))?;
        let output = seed_command()
            .env("DENO_DIR", &tmp)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot start Deno to seed its cache: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "Deno could not seed its cache ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        fold_logs(&tmp)?;
        match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            Err(_) if dir.is_dir() => Ok(()),
            Err(e) => Err(format!("cannot move the seed into {}: {e}", dir.display())),
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Folds each database's write-ahead log into it: a run's copy is then one
/// file, opened without replaying a log (and still in the log's mode,
/// which Deno asks for).
fn fold_logs(dir: &Path) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        if !entry.file_name().to_str().is_some_and(is_database) {
            continue;
        }
        let path = entry.path();
        let fold = || -> rusqlite::Result<()> {
            let db = rusqlite::Connection::open(&path)?;
            db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            db.close().map_err(|(_, e)| e)
        };
        fold().map_err(|e| format!("cannot fold the log of {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The first file named `name` under `dir`, depth first.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let kind = entry.file_type().ok()?;
        if kind.is_file() && entry.file_name() == name {
            return Some(entry.path());
        }
        if kind.is_dir()
            && let Some(found) = find_file(&entry.path(), name)
        {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for Deno: leaves what a seeding run leaves behind, a
    /// transpiled bootstrap and a database whose last write is still in
    /// its write-ahead log (`template` holds it open).
    fn fake_seed(runtime: &Path, template: &Path) -> impl FnOnce() -> std::process::Command {
        let script = format!(
            "mkdir -p \"$DENO_DIR/gen/file{r}\" && echo js > \"$DENO_DIR/gen/file{r}/bootstrap.ts.js\" \
             && cp {t} \"$DENO_DIR/dep_analysis_cache_v2\" && cp {t}-wal \"$DENO_DIR/dep_analysis_cache_v2-wal\"",
            r = runtime.display(),
            t = template.display(),
        );
        move || {
            let mut cmd = std::process::Command::new("/bin/sh");
            cmd.arg("-c").arg(script);
            cmd
        }
    }

    #[test]
    fn a_runs_cache_copies_the_seeds_databases_and_links_its_runtime_files() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tmp.path().join("runtime-js-abc");
        std::fs::create_dir(&runtime).unwrap();
        let deno = tmp.path().join("deno");
        std::fs::write(&deno, "").unwrap();
        let template = tmp.path().join("template");
        let open = rusqlite::Connection::open(&template).unwrap();
        open.pragma_update(None, "journal_mode", "WAL").unwrap();
        open.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        open.execute_batch("create table t (v text); insert into t values ('analysed')")
            .unwrap();
        assert!(
            std::fs::metadata(tmp.path().join("template-wal"))
                .unwrap()
                .len()
                > 0
        );

        let mut cache = DenoCache::open(&tmp.path().join("shared"), None).unwrap();
        cache
            .seed(&deno, &runtime, fake_seed(&runtime, &template))
            .unwrap();
        drop(open);

        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let own = cache.for_run(&run, None).unwrap();
        // One file, with the log's write in it.
        assert!(!own.join("dep_analysis_cache_v2-wal").exists());
        let copy = rusqlite::Connection::open(own.join("dep_analysis_cache_v2")).unwrap();
        let v: String = copy.query_row("select v from t", [], |r| r.get(0)).unwrap();
        assert_eq!(v, "analysed");
        // A copy, not the seed's file.
        copy.execute("update t set v = 'changed'", []).unwrap();
        drop(copy);
        let seed = std::fs::read_dir(&runtime)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(".deno-seed-"))
            .unwrap()
            .path();
        let original = rusqlite::Connection::open(seed.join("dep_analysis_cache_v2")).unwrap();
        let v: String = original
            .query_row("select v from t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, "analysed");
        // The runtime's transpiled files are the seed's, through a link.
        let linked = own
            .join("gen/file")
            .join(runtime.strip_prefix("/").unwrap());
        assert!(linked.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(
            std::fs::read_to_string(linked.join("bootstrap.ts.js")).unwrap(),
            "js\n"
        );
        for sub in SHARED {
            assert_eq!(
                std::fs::read_link(own.join(sub)).unwrap(),
                cache.shared().join(sub)
            );
        }
        // A second seeding finds the first.
        let mut again = DenoCache::open(&tmp.path().join("shared"), None).unwrap();
        again
            .seed(&deno, &runtime, || std::process::Command::new("/bin/false"))
            .unwrap();
    }

    #[test]
    fn a_failed_seeding_says_why_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let deno = tmp.path().join("deno");
        std::fs::write(&deno, "").unwrap();
        let mut cache = DenoCache::open(&tmp.path().join("shared"), None).unwrap();
        let err = cache
            .seed(&deno, tmp.path(), || {
                let mut cmd = std::process::Command::new("/bin/sh");
                cmd.arg("-c").arg("echo no module >&2; exit 3");
                cmd
            })
            .unwrap_err();
        assert!(err.contains("no module"), "{err}");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(".deno-seed"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Runs still get a cache of their own.
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let own = cache.for_run(&run, None).unwrap();
        assert!(own.join("npm").symlink_metadata().is_ok());
    }

    #[test]
    fn a_shared_cache_that_is_a_link_or_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        // A directory writable by others.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DenoCache::open(&open, None).unwrap_err().to_string();
        assert!(err.contains("writable by no one else"), "{err}");
        // A link, at the top or for one of its directories.
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let linked = tmp.path().join("linked");
        std::os::unix::fs::symlink(&victim, &linked).unwrap();
        let err = DenoCache::open(&linked, None).unwrap_err().to_string();
        assert!(err.contains("a link"), "{err}");
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::os::unix::fs::symlink(&victim, shared.join("npm")).unwrap();
        let err = DenoCache::open(&shared, None).unwrap_err().to_string();
        assert!(err.contains("a link"), "{err}");
        // What is right is taken as it is.
        let fine = tmp.path().join("fine");
        DenoCache::open(&fine, None).unwrap();
        DenoCache::open(&fine, None).unwrap();
    }

    /// As root (the only way to test it), handing an older cache to the
    /// runs' uid changes links themselves, never what they point to.
    #[test]
    fn handing_a_cache_to_the_runs_never_follows_a_link() {
        if effective_uid() != 0 {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("file"), "x").unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir_all(shared.join("npm/pkg")).unwrap();
        std::os::unix::fs::symlink(&victim, shared.join("npm/pkg/escape")).unwrap();
        std::os::unix::fs::symlink(victim.join("file"), shared.join("npm/file-link")).unwrap();
        DenoCache::open(&shared, Some((65533, 65533))).unwrap();
        assert_eq!(
            std::fs::metadata(shared.join("npm/pkg")).unwrap().uid(),
            65533
        );
        assert_eq!(
            std::fs::symlink_metadata(shared.join("npm/pkg/escape"))
                .unwrap()
                .uid(),
            65533
        );
        assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
        assert_eq!(std::fs::metadata(victim.join("file")).unwrap().uid(), 0);
        // The top stays valet's own.
        assert_eq!(std::fs::metadata(&shared).unwrap().uid(), 0);
    }
}
