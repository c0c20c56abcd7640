//! The conformance suite: fixtures (a val plus a declarative `case.json`)
//! that pin down what a val may and may not do. Each case runs in a fresh
//! data dir with a real host, real Deno and the real stores.

mod case;
mod check;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

pub use case::Case;

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only cases whose name contains this.
    pub filter: Option<String>,
    /// Deliver email through this relay and wait for delivery.
    pub smtp: Option<String>,
    /// Cases at once; default: the number of cores.
    pub parallel: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub expected: String,
    pub got: String,
    pub failures: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub results: Vec<CaseResult>,
    pub passed: usize,
    pub failed: usize,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error("could not read fixtures in {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("no fixtures found in {0} (each case is a directory with case.json and val.ts)")]
    Empty(PathBuf),
}

/// Case directories under `dir`, sorted by name.
pub fn discover(dir: &Path, filter: Option<&str>) -> Result<Vec<PathBuf>, ConformanceError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ConformanceError::Read(dir.to_owned(), e))?;
    let mut cases: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("case.json").is_file())
        .filter(|p| {
            filter.is_none_or(|f| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(f))
            })
        })
        .collect();
    cases.sort();
    if cases.is_empty() {
        return Err(ConformanceError::Empty(dir.to_owned()));
    }
    Ok(cases)
}

/// Runs every case, `parallel` at a time, and reports in name order.
pub async fn run(dir: &Path, options: Options) -> Result<Report, ConformanceError> {
    let started = Instant::now();
    let cases = discover(dir, options.filter.as_deref())?;
    // One Deno cache for the whole suite: each case still gets its own data dir.
    let cache =
        std::env::temp_dir().join(format!("valet-conformance-cache-{}", std::process::id()));
    let permits = Arc::new(Semaphore::new(options.parallel.max(1)));
    let mut tasks = Vec::new();
    for path in cases {
        let permits = permits.clone();
        let smtp = options.smtp.clone();
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            check::run_case(&path, smtp, cache).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        match task.await {
            Ok(result) => results.push(result),
            Err(e) => results.push(CaseResult {
                name: "?".into(),
                passed: false,
                expected: String::new(),
                got: format!("the case panicked: {e}"),
                failures: vec![e.to_string()],
                duration_ms: 0,
            }),
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    let passed = results.iter().filter(|r| r.passed).count();
    Ok(Report {
        failed: results.len() - passed,
        passed,
        results,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

impl Report {
    /// The table for people, ending with `N passed, N failed`.
    pub fn table(&self) -> String {
        let width = self
            .results
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = format!(
            "{:<6} {:<width$} {:<12} {:<12} {:>8}\n",
            "", "case", "expected", "got", "time"
        );
        for r in &self.results {
            out.push_str(&format!(
                "{:<6} {:<width$} {:<12} {:<12} {:>6}ms\n",
                if r.passed { "PASS" } else { "FAIL" },
                r.name,
                r.expected,
                r.got,
                r.duration_ms
            ));
            for failure in &r.failures {
                out.push_str(&format!("         - {failure}\n"));
            }
        }
        let slowest = self.results.iter().max_by_key(|r| r.duration_ms);
        if let Some(s) = slowest {
            out.push_str(&format!(
                "suite took {:.1}s; slowest case {} ({} ms)\n",
                Duration::from_millis(self.duration_ms).as_secs_f64(),
                s.name,
                s.duration_ms
            ));
        }
        out.push_str(&format!("{} passed, {} failed\n", self.passed, self.failed));
        out
    }
}
