//! The conformance suite through the `valet` binary, with email delivered
//! to a real SMTP server.

use std::process::Command;

use crate::support::Smtp;

#[tokio::test(flavor = "multi_thread")]
async fn the_conformance_suite_passes_and_delivers_its_email() {
    let smtp = Smtp::start();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");
    let output = Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(["conformance", fixtures, "--smtp", &smtp.url()])
        .output()
        .expect("run valet conformance");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let passed: usize = last
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 60, "only {passed} cases");
    // Every email the cases expect in their outbox reached the SMTP server.
    let expected = expected_emails(fixtures);
    assert!(expected >= 7, "only {expected} emails expected");
    let messages = smtp.wait_for(expected).await;
    assert_eq!(messages.len(), expected, "{messages:#?}");
    assert!(
        messages.iter().any(|m| m.contains("notes.txt")),
        "the attachment arrived"
    );
    assert!(
        !messages.iter().any(|m| m.contains("victim@example.com")),
        "no injected header"
    );
    assert!(
        !messages.iter().any(|m| m.contains("paypal.com")),
        "no replaced sender"
    );
}

/// How many emails the cases expect, from their `case.json` files.
fn expected_emails(fixtures: &str) -> usize {
    std::fs::read_dir(fixtures)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("case.json")).ok())
        .map(|text| {
            let case: serde_json::Value = serde_json::from_str(&text).unwrap();
            case["expect"]["emails"].as_array().map_or(0, Vec::len)
        })
        .sum()
}
