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
    // Seven cases send one email each; all reached the SMTP server.
    let messages = smtp.wait_for(7).await;
    assert_eq!(messages.len(), 7, "{messages:#?}");
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
