//! Spawning and reaping one Deno process: its own process group, killed
//! with SIGKILL at the deadline, and never outliving the supervisor.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;
use valet_store::Outcome;

use crate::logs::{self, LogBuffer};

/// A running Deno process and the tasks draining its output.
pub struct Process {
    child: Child,
    /// A warm process's stdin, where its claim is written once.
    stdin: Option<tokio::process::ChildStdin>,
    pgid: Option<i32>,
    readers: JoinSet<()>,
    pub logs: LogBuffer,
}

/// How the process ended, as the supervisor saw it.
#[derive(Debug, Clone, Copy)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut,
    /// Ended by the supervisor on purpose (an http run whose response is done).
    Stopped,
}

/// Makes the child its own process-group leader and asks the kernel to
/// SIGKILL it if the supervisor dies.
#[allow(unsafe_code)]
fn confine(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn spawn(mut cmd: Command, logs: LogBuffer, warm: bool) -> std::io::Result<Process> {
    confine(&mut cmd);
    cmd.stdin(if warm { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pgid = child.id().map(|id| id as i32);
    let stdin = child.stdin.take();
    let mut readers = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(logs::collect(out, "out", logs.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(logs::collect(err, "err", logs.clone()));
    }
    Ok(Process {
        child,
        stdin,
        pgid,
        readers,
        logs,
    })
}

impl Process {
    /// Waits for the process to end, or kills it at `deadline`, or when
    /// `stop` resolves.
    pub async fn wait(
        &mut self,
        deadline: Instant,
        stop: impl std::future::Future<Output = ()>,
    ) -> Exit {
        let exit = tokio::select! {
            status = self.child.wait() => match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(code), _) => Exit::Code(code),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Code(-1),
                },
                Err(_) => Exit::Code(-1),
            },
            _ = tokio::time::sleep_until(deadline) => Exit::TimedOut,
            _ = stop => Exit::Stopped,
        };
        self.kill_group();
        let _ = self.child.wait().await;
        // The pipes close when the process group is gone; bound the wait
        // anyway in case a grandchild held them (it cannot: --deny-run).
        let drain = async { while self.readers.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        exit
    }

    /// SIGKILL to the whole process group.
    pub fn kill_group(&self) {
        if let Some(pgid) = self.pgid {
            // An already reaped group just returns ESRCH.
            kill_process_group(pgid);
        }
    }

    /// Writes a warm process's claim (one JSON line) without blocking:
    /// the line is far below the pipe's buffer size.
    pub fn send_claim(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        let stdin = self
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("this process was already claimed"))?;
        // Closing stdin after the line is fine: the claim is all it reads.
        let mut file = std::fs::File::from(stdin.into_owned_fd()?);
        file.write_all(format!("{line}\n").as_bytes())
    }

    /// True once the process has ended (without waiting for it).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

#[allow(unsafe_code)]
fn kill_process_group(pgid: i32) {
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// Maps how the process ended to a run outcome and a one-line detail.
pub fn classify(exit: Exit, logs: &LogBuffer, timeout: Duration) -> (Outcome, String) {
    match exit {
        Exit::Code(0) => (Outcome::Succeeded, "exited with code 0".into()),
        Exit::TimedOut => (
            Outcome::TimedOut,
            format!("killed at its deadline ({} ms)", timeout.as_millis()),
        ),
        Exit::Stopped if logs.saw_handler_error() => (
            Outcome::Failed,
            "the handler threw; it answered 500 (the stack is in the logs)".into(),
        ),
        Exit::Stopped => (Outcome::Succeeded, "stopped after its response".into()),
        _ if logs.saw_oom() => (
            Outcome::Oom,
            "ran out of memory (heap limit reached)".into(),
        ),
        Exit::Code(code) => (Outcome::Failed, format!("exited with code {code}")),
        Exit::Signal(sig) if sig == libc::SIGTRAP || sig == libc::SIGABRT => (
            Outcome::Oom,
            format!("aborted by V8 (signal {sig}), most likely out of memory"),
        ),
        Exit::Signal(sig) => (Outcome::Killed, format!("killed by signal {sig}")),
    }
}
