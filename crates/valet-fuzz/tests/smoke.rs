//! The fuzz smoke run of `cargo test` (and `just fuzz-smoke`): every
//! target replays its corpus (`fuzz/corpus/<target>`) and every input a
//! fuzzer ever broke it with (`fuzz/regressions/<target>`), then runs a
//! bounded number of mutations of them. Deterministic: the same seed
//! every run unless `VALET_FUZZ_SEED` says otherwise; `just fuzz` is the
//! long, coverage-guided run.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = root().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).expect("read corpus file"))
        .collect()
}

/// xorshift64*: enough randomness for mutations, and reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\r\n",
    b"\n",
    b"@",
    b".",
    b"<",
    b">",
    b"\"",
    b"\\",
    b"%",
    b" ",
    b"*",
    b"/",
    b",",
    b":",
    b";",
    b"'",
    b"=",
    b"..",
    b"\xc3\xa9",
    b"\xe2\x80\xae",
    b"-1",
    b"99999999999",
    b"vlt_",
    b"blob:",
    b"read",
    b"write",
    b"ATTACH ",
    b"PRAGMA ",
    b"VACUUM ",
    b" INTO ",
];

fn mutate(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                data[at] = rng.next() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                data.insert(at, rng.next() as u8);
            }
            3 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(8)).min(len);
                data.drain(from..to);
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(16)).min(len);
                let copy = data[from..to].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, copy);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(data.len() + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

/// Runs one input; a panic is reported with the input, saved where
/// `fuzz/regressions/<target>/` can take it.
fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        let dir = std::env::temp_dir().join("valet-fuzz-failures").join(name);
        std::fs::create_dir_all(&dir).expect("failure dir");
        let path = dir.join(format!("input-{}", input.len()));
        std::fs::write(&path, input).expect("save input");
        panic!(
            "fuzz target {name} failed on {:?}; saved to {} (copy it into fuzz/regressions/{name}/ with the fix)",
            String::from_utf8_lossy(input),
            path.display()
        );
    }
}

fn smoke(name: &str, iterations: usize) {
    let target = valet_fuzz::target(name).expect("target");
    let corpus = inputs("corpus", name);
    assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
    let regressions = inputs("regressions", name);
    for input in corpus.iter().chain(&regressions) {
        run(name, target, input);
    }
    let seed = std::env::var("VALET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0000_0000_0001u64)
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut rng = Rng(seed | 1);
    let seeds: Vec<Vec<u8>> = corpus.into_iter().chain(regressions).collect();
    for _ in 0..iterations {
        let input = mutate(&seeds, &mut rng);
        run(name, target, &input);
    }
}

#[test]
fn api_token() {
    smoke("api_token", 60_000);
}

#[test]
fn scope() {
    smoke("scope", 60_000);
}

#[test]
fn run_token() {
    smoke("run_token", 15_000);
}

#[test]
fn blob_key() {
    smoke("blob_key", 60_000);
}

#[test]
fn sql() {
    smoke("sql", 2_000);
}

#[test]
fn email() {
    smoke("email", 30_000);
}

#[test]
fn cron() {
    smoke("cron", 15_000);
}

#[test]
fn fixture() {
    smoke("fixture", 30_000);
}

#[test]
fn github() {
    smoke("github", 9_000);
}

#[test]
fn every_target_has_a_smoke_test_and_a_corpus() {
    for (name, _) in valet_fuzz::TARGETS {
        assert!(
            !inputs("corpus", name).is_empty(),
            "fuzz/corpus/{name} is missing"
        );
    }
    assert_eq!(
        valet_fuzz::TARGETS.len(),
        9,
        "add a #[test] for the new target"
    );
}
