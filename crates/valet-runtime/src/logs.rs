//! A run's logs: stdout and stderr lines with timestamps, bounded in size,
//! with the run's own token masked out.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

/// What a masked secret reads as.
const MASK: &str = "[valet key]";

/// Lines longer than this are split.
const MAX_LINE: usize = 16 * 1024;

#[derive(Clone)]
pub struct LogBuffer {
    /// A std `Mutex`: held only to append a line, never across an `.await`.
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    text: String,
    max_bytes: usize,
    dropped: usize,
    secrets: Vec<String>,
}

impl LogBuffer {
    pub fn new(max_bytes: usize, secrets: Vec<String>) -> LogBuffer {
        LogBuffer {
            inner: Arc::new(Mutex::new(Inner {
                text: String::new(),
                max_bytes,
                dropped: 0,
                secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
            })),
        }
    }

    /// Masks `secret` from now on (a warm process learns its key late).
    pub fn add_secret(&self, secret: &str) {
        if let Ok(mut inner) = self.inner.lock()
            && !secret.is_empty()
        {
            inner.secrets.push(secret.to_owned());
        }
    }

    pub fn push(&self, stream: &str, line: &str) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        // NUL is no text to a database (PostgreSQL refuses it): shown as
        // U+FFFD, like any byte that is not UTF-8.
        let mut line = line.trim_end_matches('\r').replace('\0', "\u{fffd}");
        for secret in &inner.secrets {
            if line.contains(secret.as_str()) {
                line = line.replace(secret.as_str(), MASK);
            }
        }
        let entry = format!(
            "{} [{stream}] {line}\n",
            valet_store::time::iso(valet_store::time::now_ms())
        );
        // Once full, drop everything after: the stored logs stay a
        // contiguous prefix of what the run printed.
        if inner.dropped > 0 || inner.text.len() + entry.len() > inner.max_bytes {
            inner.dropped += entry.len();
        } else {
            inner.text.push_str(&entry);
        }
    }

    /// Replaces every whole secret in `bytes`, and returns how many bytes
    /// at the end must be held back because a secret may continue there.
    fn mask(&self, bytes: &mut Vec<u8>) -> usize {
        let Ok(inner) = self.inner.lock() else {
            return 0;
        };
        let mut hold = 0;
        for secret in &inner.secrets {
            let secret = secret.as_bytes();
            while let Some(at) = bytes.windows(secret.len()).position(|w| w == secret) {
                bytes.splice(at..at + secret.len(), MASK.bytes());
            }
            hold = hold.max(secret.len() - 1);
        }
        hold
    }

    /// The logs, with a note when some were dropped.
    pub fn finish(&self) -> String {
        let Ok(inner) = self.inner.lock() else {
            return String::new();
        };
        let mut text = inner.text.clone();
        if inner.dropped > 0 {
            text.push_str(&format!(
                "[valet] logs truncated: {} bytes over the {}-byte limit were dropped\n",
                inner.dropped, inner.max_bytes
            ));
        }
        text
    }
}

/// Reads `reader` to its end, line by line, into `logs`. Keeps draining
/// after the limit so the child never blocks on a full pipe.
#[cfg(test)]
async fn collect(mut reader: impl AsyncRead + Unpin, stream: &'static str, logs: LogBuffer) {
    let mut lines = Lines::new(stream, logs);
    let mut chunk = vec![0u8; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.feed(&chunk[..n]),
        }
    }
    lines.end();
}

/// Reads a process's pipe to its end, line by line, into `logs`, draining
/// after the limit too so the child never blocks on a full pipe. It may be
/// told to stop early: when `drain` fires, what is in the pipe at that instant is read
/// without waiting (everything the process wrote before it said its work
/// had settled is there) and the collection ends, without waiting for the
/// end of file that comes only once the killed process is torn down.
pub async fn collect_pipe<R>(
    mut reader: R,
    stream: &'static str,
    logs: LogBuffer,
    drain: oneshot::Receiver<()>,
) where
    R: AsyncRead + AsFd + Unpin,
{
    let mut lines = Lines::new(stream, logs);
    let mut chunk = vec![0u8; 8192];
    let mut drain = std::pin::pin!(drain);
    // Whether the sender went away without asking: then read to the end.
    let mut unasked = false;
    loop {
        tokio::select! {
            read = reader.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => lines.feed(&chunk[..n]),
            },
            signal = &mut drain, if !unasked => {
                if signal.is_ok() {
                    // The pipe is non-blocking (tokio's): read until it
                    // would block or ends.
                    while let Ok(n @ 1..) = rustix::io::read(reader.as_fd(), &mut chunk[..]) {
                        lines.feed(&chunk[..n]);
                    }
                    break;
                }
                unasked = true;
            }
        }
    }
    lines.end();
}

/// Bytes of one stream cut into log lines: masked, and long lines split
/// so that no split leaves a key readable in two halves.
struct Lines {
    pending: Vec<u8>,
    stream: &'static str,
    logs: LogBuffer,
}

impl Lines {
    fn new(stream: &'static str, logs: LogBuffer) -> Lines {
        Lines {
            pending: Vec::new(),
            stream,
            logs,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let (pending, stream, logs) = (&mut self.pending, self.stream, &self.logs);
        pending.extend_from_slice(bytes);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            logs.push(stream, &String::from_utf8_lossy(&line[..line.len() - 1]));
        }
        if pending.len() > MAX_LINE {
            // Mask before splitting, and keep back what could be the start
            // of a secret, so no split leaves a key readable in two halves.
            let hold = logs.mask(pending);
            let mut cut = pending.len().saturating_sub(hold).clamp(1, MAX_LINE);
            // Nor split a mask itself.
            let from = cut.saturating_sub(MASK.len() - 1);
            if let Some(at) = pending[from..]
                .windows(MASK.len())
                .position(|w| w == MASK.as_bytes())
                .map(|p| p + from)
                .filter(|at| *at < cut && *at > 0)
            {
                cut = at;
            }
            let line: Vec<u8> = pending.drain(..cut).collect();
            logs.push(stream, &String::from_utf8_lossy(&line));
        }
    }

    fn end(self) {
        if !self.pending.is_empty() {
            self.logs
                .push(self.stream, &String::from_utf8_lossy(&self.pending));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secrets_and_bounds_size() {
        let logs = LogBuffer::new(200, vec!["s3cret".into()]);
        logs.push("out", "token=s3cret!");
        logs.push("out", "nul\0byte");
        for _ in 0..10 {
            logs.push("out", "0123456789012345678901234567890123456789");
        }
        let text = logs.finish();
        assert!(
            text.contains("nul\u{fffd}byte"),
            "a NUL is no text to a database"
        );
        assert!(text.contains("token=[valet key]!"));
        assert!(!text.contains("s3cret"));
        assert!(text.contains("logs truncated"));
        assert!(text.len() < 400);
    }

    #[tokio::test]
    async fn masks_secrets_across_every_split() {
        let secret = "eyJ".to_owned() + &"k".repeat(300) + "END";
        for offset in [
            0,
            1,
            150,
            299,
            305,
            MAX_LINE - 200,
            MAX_LINE - 3,
            MAX_LINE + 7,
        ] {
            let logs = LogBuffer::new(1 << 20, vec![secret.clone()]);
            let text = format!("{}{secret}{}", "a".repeat(offset), "b".repeat(2 * MAX_LINE));
            collect(std::io::Cursor::new(text.into_bytes()), "out", logs.clone()).await;
            let out = logs.finish();
            assert!(
                !out.contains("kkkkkkkkkk"),
                "offset {offset}: a piece of the key survived"
            );
            assert!(out.contains(MASK), "offset {offset}");
        }
    }
}
