//! Spawning and reaping one Deno process: confined by the OS layer, its own
//! process group, killed with SIGKILL at the deadline, and never outliving
//! the supervisor.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use valet_store::Outcome;

use crate::control::Reported;
use crate::logs::{self, LogBuffer};
use crate::os_layer::Confinement;

/// A running Deno process and the tasks draining its output.
pub struct Process {
    child: Child,
    pgid: Option<i32>,
    readers: JoinSet<()>,
    /// Tell the readers to take what is in the pipes now and stop.
    drains: Vec<oneshot::Sender<()>>,
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

/// Makes the child its own process-group leader, asks the kernel to
/// SIGKILL it if the supervisor dies, and applies the OS layer.
#[allow(unsafe_code)]
fn confine(cmd: &mut Command, confinement: Confinement) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (prctl, setrlimit, set*id,
    // landlock_restrict_self); it does not allocate.
    unsafe {
        cmd.pre_exec(move || confinement.apply());
    }
}

pub fn spawn(
    mut cmd: Command,
    confinement: Confinement,
    logs: LogBuffer,
) -> std::io::Result<Process> {
    confine(&mut cmd, confinement);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pgid = child.id().map(|id| id as i32);
    let mut readers = JoinSet::new();
    let mut drains = Vec::new();
    if let Some(out) = child.stdout.take() {
        let (tx, rx) = oneshot::channel();
        readers.spawn(logs::collect_pipe(out, "out", logs.clone(), rx));
        drains.push(tx);
    }
    if let Some(err) = child.stderr.take() {
        let (tx, rx) = oneshot::channel();
        readers.spawn(logs::collect_pipe(err, "err", logs.clone(), rx));
        drains.push(tx);
    }
    Ok(Process {
        child,
        pgid,
        readers,
        drains,
        logs,
    })
}

impl Process {
    /// Waits for the process to end, or kills it at `deadline`, or when
    /// `stop` resolves. Returns once its logs are complete: a process that
    /// ended by itself is read to the end of its output; a killed one gives
    /// what it wrote before it was killed, without waiting for the kernel
    /// to tear it down ([`Process::reap`] waits for that).
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
        if matches!(exit, Exit::TimedOut | Exit::Stopped) {
            // Killed: nothing more can be written; take what is there.
            for drain in self.drains.drain(..) {
                let _ = drain.send(());
            }
        }
        // The pipes close when the process group is gone; bound the wait
        // anyway in case a grandchild held them (it cannot: --deny-run).
        let drain = async { while self.readers.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        exit
    }

    /// Kills the process group and waits until the kernel has torn the
    /// process down. After [`Process::wait`], off the run's critical path.
    pub async fn reap(mut self) {
        self.kill_group();
        let _ = self.child.wait().await;
    }

    /// SIGKILL to the whole process group.
    pub fn kill_group(&self) {
        if let Some(pgid) = self.pgid {
            // An already reaped group just returns ESRCH.
            kill_process_group(pgid);
        }
    }

    /// True once the process has ended (without waiting for it).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

#[allow(unsafe_code)]
fn kill_process_group(pgid: i32) {
    // A dying Deno tears down its threads and memory, milliseconds of CPU
    // that would otherwise preempt the supervisor's own work (on two cores,
    // the answer of the run it just ended): it dies at the lowest priority.
    // PRIO_PGRP reaches every thread of every process of the group.
    // SAFETY: setpriority and killpg have no memory-safety preconditions.
    unsafe {
        libc::setpriority(libc::PRIO_PGRP, pgid as libc::id_t, 19);
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// Maps how the process ended, and what its bootstrap reported over the
/// control channel, to a run outcome and a one-line detail. Never from the
/// val's output: a val that prints "out of memory" is not `oom`.
pub fn classify(
    exit: Exit,
    reported: &Reported,
    run_id: &str,
    timeout: Duration,
) -> (Outcome, String) {
    let handler_threw = reported.handler_errors.contains(run_id);
    match exit {
        Exit::TimedOut => (
            Outcome::TimedOut,
            format!("killed at its deadline ({} ms)", timeout.as_millis()),
        ),
        _ if reported.oom => (
            Outcome::Oom,
            "ran out of memory (an allocation beyond the run's memory cap failed)".into(),
        ),
        Exit::Stopped if reported.settled && !reported.uncaught => {
            (Outcome::Succeeded, "its work settled".into())
        }
        Exit::Stopped if handler_threw => (
            Outcome::Failed,
            "the handler threw; it answered 500 (the stack is in the logs)".into(),
        ),
        Exit::Stopped => (Outcome::Succeeded, "stopped after its response".into()),
        Exit::Code(0) => (Outcome::Succeeded, "exited with code 0".into()),
        Exit::Code(code) if reported.uncaught => (
            Outcome::Failed,
            format!("an uncaught error ended it (exit code {code}; the error is in the logs)"),
        ),
        Exit::Code(code) => (Outcome::Failed, format!("exited with code {code}")),
        Exit::Signal(sig) if sig == libc::SIGTRAP || sig == libc::SIGABRT => (
            Outcome::Oom,
            format!("aborted by V8 (signal {sig}): out of memory (heap or process cap)"),
        ),
        Exit::Signal(sig) => (Outcome::Killed, format!("killed by signal {sig}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_come_from_exit_and_control_never_from_output() {
        let t = Duration::from_secs(1);
        let none = Reported::default();
        let oom = Reported {
            oom: true,
            ..Reported::default()
        };
        assert_eq!(classify(Exit::Code(0), &none, "r", t).0, Outcome::Succeeded);
        assert_eq!(classify(Exit::Code(1), &none, "r", t).0, Outcome::Failed);
        assert_eq!(classify(Exit::Code(1), &oom, "r", t).0, Outcome::Oom);
        assert_eq!(
            classify(Exit::Signal(libc::SIGTRAP), &none, "r", t).0,
            Outcome::Oom
        );
        assert_eq!(
            classify(Exit::Signal(libc::SIGKILL), &none, "r", t).0,
            Outcome::Killed
        );
        assert_eq!(classify(Exit::TimedOut, &oom, "r", t).0, Outcome::TimedOut);
        let threw = Reported {
            handler_errors: ["r".to_owned()].into(),
            ..Reported::default()
        };
        assert_eq!(classify(Exit::Stopped, &threw, "r", t).0, Outcome::Failed);
        assert_eq!(
            classify(Exit::Stopped, &threw, "other", t).0,
            Outcome::Succeeded
        );
    }
}
