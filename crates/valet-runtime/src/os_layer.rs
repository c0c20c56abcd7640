//! The operating system's layer under Deno's permissions, so that a bug in
//! Deno's checks (or native code loaded by one) does not expose the data
//! dir, other runs, or the supervisor.
//!
//! Applied in the child between fork and exec, in this order:
//! - resource limits: a whole-process data cap (`RLIMIT_DATA`: heap,
//!   `ArrayBuffer`s, everything writable and private), no core dumps, a
//!   bounded file size and number of open files;
//! - when valet runs as root, an unprivileged uid and gid of the runs' own
//!   (no supplementary groups), so the process has no capabilities and
//!   cannot read the supervisor's `/proc/<pid>/environ`;
//! - `no_new_privs`, then a Landlock domain: the file system is read-only
//!   and limited to what Deno needs (its binary, system libraries, a few
//!   files of `/etc`, the runtime's JavaScript, Deno's cache) plus the run's
//!   own directory; binding TCP ports is refused; signals and abstract Unix
//!   sockets outside the domain are unreachable.

use std::os::fd::{AsRawFd, OwnedFd};

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope,
};

/// The newest Landlock ABI valet asks for; older kernels get what they have.
const ABI_WANTED: ABI = ABI::V6;

/// Read-only system paths Deno and glibc need.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/dev/urandom",
    "/dev/random",
    "/dev/null",
];

/// Which layer is active, for `valet serve` to say at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    /// Landlock ABI version in force, or `None` when the kernel has none.
    pub landlock_abi: Option<i32>,
    /// The uid runs get, when valet runs as root.
    pub uid: Option<u32>,
}

impl std::fmt::Display for LayerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.landlock_abi {
            Some(abi) => write!(f, "Landlock ABI {abi}")?,
            None => write!(f, "no Landlock (kernel without it)")?,
        }
        match self.uid {
            Some(uid) => write!(f, ", runs as uid {uid}"),
            None => write!(f, ", runs as valet's own uid"),
        }
    }
}

/// What confines every run process.
#[derive(Debug, Clone)]
pub struct OsLayer {
    /// Read-only paths besides the system's (the Deno binary, the
    /// runtime's JavaScript).
    read: Vec<PathBuf>,
    /// The directories of Deno's shared cache that runs write: downloaded
    /// modules and npm packages (reached through each run's own cache),
    /// opened once, without following links, when the cache was checked.
    cache: Vec<std::sync::Arc<OwnedFd>>,
    /// Whole-process data cap, in bytes.
    memory_bytes: u64,
    /// Uid and gid of runs (valet running as root), or `None`.
    ids: Option<(u32, u32)>,
    landlock_abi: Option<i32>,
}

/// The run's own confinement, prepared in the parent (opening paths is not
/// safe after fork) and applied in the child.
#[derive(Debug)]
pub struct Confinement {
    ruleset: Option<OwnedFd>,
    memory_bytes: u64,
    ids: Option<(u32, u32)>,
}

fn kernel_landlock_abi() -> Option<i32> {
    // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    #[allow(unsafe_code)]
    // SAFETY: with a null attribute pointer and size 0 the call only
    // returns the ABI version; no memory is read or written.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    (abi > 0).then_some(abi as i32)
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl OsLayer {
    /// `sandbox_uid`: the uid (and gid) runs get when valet runs as root.
    pub fn new(
        deno: &Path,
        runtime_dir: &Path,
        cache: Vec<std::sync::Arc<OwnedFd>>,
        memory_mb: u64,
        sandbox_uid: u32,
    ) -> OsLayer {
        OsLayer {
            read: vec![deno.to_owned(), runtime_dir.to_owned()],
            cache,
            memory_bytes: memory_mb.saturating_mul(1 << 20),
            ids: OsLayer::runs_owner(sandbox_uid),
            landlock_abi: kernel_landlock_abi(),
        }
    }

    /// The uid and gid runs get: `sandbox_uid`'s when valet runs as root,
    /// none (valet's own) otherwise.
    pub fn runs_owner(sandbox_uid: u32) -> Option<(u32, u32)> {
        (effective_uid() == 0).then_some((sandbox_uid, sandbox_uid))
    }

    pub fn report(&self) -> LayerReport {
        LayerReport {
            landlock_abi: self.landlock_abi,
            uid: self.ids.map(|(uid, _)| uid),
        }
    }

    /// The uid and gid that must own what a run writes (its directory,
    /// the sockets it connects to, Deno's cache), when runs get their own.
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.ids
    }

    /// Prepares the confinement of a run whose private directory is `dir`.
    /// `read`: more paths it may read (for `valet run FILE`, the file's
    /// directory).
    pub fn confinement(&self, dir: &Path, read: &[PathBuf]) -> std::io::Result<Confinement> {
        let ruleset = match self.landlock_abi {
            Some(_) => Some(self.ruleset(dir, read).map_err(std::io::Error::other)?),
            None => None,
        };
        Ok(Confinement {
            ruleset,
            memory_bytes: self.memory_bytes,
            ids: self.ids,
        })
    }

    fn ruleset(&self, dir: &Path, read: &[PathBuf]) -> Result<OwnedFd, String> {
        self.build_ruleset(dir, read)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the kernel returned no Landlock ruleset".to_owned())
    }

    fn build_ruleset(
        &self,
        dir: &Path,
        extra: &[PathBuf],
    ) -> Result<Option<OwnedFd>, Box<dyn std::error::Error>> {
        let read = AccessFs::from_read(ABI_WANTED);
        let all = AccessFs::from_all(ABI_WANTED);
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(all)?
            .handle_access(AccessNet::BindTcp)?
            .scope(Scope::AbstractUnixSocket | Scope::Signal)?
            .create()?;
        let readable = SYSTEM_READ
            .iter()
            .map(PathBuf::from)
            .chain(self.read.iter().cloned())
            .chain(extra.iter().cloned());
        for path in readable {
            // Paths this system lacks (no /lib64, say) are skipped.
            if let Ok(fd) = landlock::PathFd::new(&path) {
                let access = if path.is_dir() {
                    read
                } else {
                    read & AccessFs::from_file(ABI_WANTED)
                };
                ruleset = ruleset.add_rule(landlock::PathBeneath::new(fd, access))?;
            }
        }
        // The run's own directory (with its own view of Deno's cache: its
        // analysis databases and transpiled files), and of the shared cache
        // only the directories of downloaded modules: no file shared by
        // every run is held open by one, where a val could reach it through
        // a descriptor (node's `process.binding`), and no transpiled file
        // another run loads can be written by one.
        let fd = landlock::PathFd::new(dir)?;
        ruleset = ruleset.add_rule(landlock::PathBeneath::new(fd, all))?;
        for sub in &self.cache {
            ruleset = ruleset.add_rule(landlock::PathBeneath::new(sub.as_ref(), all))?;
        }
        // /dev/null is written to as well.
        if let Ok(fd) = landlock::PathFd::new("/dev/null") {
            ruleset = ruleset.add_rule(landlock::PathBeneath::new(
                fd,
                AccessFs::from_file(ABI_WANTED),
            ))?;
        }
        Ok(ruleset.into())
    }
}

impl Confinement {
    /// Applies the confinement to the calling process. Runs in the child
    /// between fork and exec: only async-signal-safe system calls, no
    /// allocation.
    #[allow(unsafe_code)]
    pub fn apply(&self) -> std::io::Result<()> {
        let check = |ret: libc::c_long| {
            if ret < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let limit = |resource, value: u64| {
            let rlim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit reads the struct we pass and nothing else.
            check(unsafe { libc::setrlimit(resource, &rlim) } as libc::c_long)
        };
        limit(libc::RLIMIT_DATA, self.memory_bytes)?;
        limit(libc::RLIMIT_CORE, 0)?;
        limit(libc::RLIMIT_FSIZE, 1 << 30)?;
        limit(libc::RLIMIT_NOFILE, 4096)?;
        if let Some((uid, gid)) = self.ids {
            // SAFETY: plain system calls on integers; order matters: groups
            // and gid while still root, uid last.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()) as libc::c_long)?;
                check(libc::setresgid(gid, gid, gid) as libc::c_long)?;
                check(libc::setresuid(uid, uid, uid) as libc::c_long)?;
            }
        }
        // SAFETY: prctl with integer arguments. The parent-death signal is
        // set after the uid change, which would clear it.
        unsafe {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as libc::c_long)?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
        }
        if let Some(fd) = &self.ruleset {
            // SAFETY: landlock_restrict_self takes a ruleset fd we own and
            // flags 0.
            check(unsafe {
                libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32)
            })?;
        }
        Ok(())
    }
}
