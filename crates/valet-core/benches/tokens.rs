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
criterion_main!(benches, raw);

/// The two Ed25519 implementations at hand, on a JWT-sized message: the
/// signer of run keys is the faster one (their signatures are the same).
fn raw_sign(c: &mut criterion::Criterion) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    use ed25519_dalek::Signer;
    let secret = [7u8; 32];
    let msg = vec![b'x'; 300];
    let dalek = ed25519_dalek::SigningKey::from_bytes(&secret);
    c.bench_function("raw_sign_dalek", |b| b.iter(|| dalek.sign(&msg)));
    let lc = Ed25519KeyPair::from_seed_unchecked(&secret).unwrap();
    assert_eq!(lc.public_key().as_ref(), dalek.verifying_key().as_bytes());
    assert_eq!(
        lc.sign(&msg).as_ref(),
        dalek.sign(&msg).to_bytes().as_slice()
    );
    c.bench_function("raw_sign_aws_lc", |b| b.iter(|| lc.sign(&msg)));
}
criterion::criterion_group!(raw, raw_sign);
