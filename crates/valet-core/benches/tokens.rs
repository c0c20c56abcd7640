//! Benchmarks: run-token mint and verify, API-token parse + hash.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use valet_core::{ApiToken, KeyRing, MintRequest, ScopeSet, SigningKey};

fn tokens(c: &mut Criterion) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ring = KeyRing::new(SigningKey::generate().unwrap()).unwrap();
    let grant = MintRequest {
        user_id: "u_0190f1a2b3c4",
        val_id: Some("val_0190f1a2b3c4"),
        run_id: "run_0190f1a2b3c4",
        scopes: ScopeSet::default_val(),
        start: now,
        deadline: now + 30,
    };
    c.bench_function("run_token_mint", |b| b.iter(|| ring.mint(&grant).unwrap()));
    let token = ring.mint(&grant).unwrap();
    c.bench_function("run_token_verify", |b| {
        b.iter(|| ring.verify(&token, now).unwrap())
    });
    let api = ApiToken::generate().unwrap();
    let text = api.expose().to_owned();
    c.bench_function("api_token_parse_hash", |b| {
        b.iter(|| ApiToken::parse(&text).unwrap().hash())
    });
}

criterion_group!(benches, tokens);
criterion_main!(benches);
