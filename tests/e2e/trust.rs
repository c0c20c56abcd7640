//! The API's trust boundary (issue 13): proofs and their audit, code
//! changes that never exceed their maker, email that cannot spoof its
//! sender or flood, SQLite results that cannot cost gigabytes, and the
//! sign-in pages (redirects, cookies, framing, CSP).

use reqwest::redirect::Policy;
use serde_json::json;
use valet_core::ScopeSet;

use crate::support::{Options, Server, Smtp, error_code};

fn scopes(list: &str) -> ScopeSet {
    ScopeSet::parse(list).expect("scopes")
}

/// Issue 17, item 5: two credentials in one request are refused, never
/// "first wins".
#[tokio::test(flavor = "multi_thread")]
async fn two_authorization_headers_are_ambiguous() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let full = server.token(&ada, ScopeSet::all());
    let weak = server.token(&ada, ScopeSet::EMPTY);
    for (first, second) in [(&full, &weak), (&weak, &full), (&full, &full)] {
        let r = server
            .client
            .get(format!("{}/v1/me", server.url))
            .header("authorization", format!("Bearer {first}"))
            .header("authorization", format!("Bearer {second}"))
            .send()
            .await
            .expect("me");
        let (status, code, _) = error_code(r).await;
        assert_eq!((status, code.as_str()), (400, "ambiguous_credentials"));
    }
    server.stop().await;
}

/// Issue 13: `require_all` (what a token or a val may be handed) audited
/// nothing; the check that grants now records every scope it checked.
#[tokio::test(flavor = "multi_thread")]
async fn checks_that_hand_scopes_on_are_audited() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let before = server.store.audit_count().expect("count");
    let r = server
        .client
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(&token)
        .json(&json!({"name": "ci", "scopes": ["blob:read", "email:write"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    // user:write for the route, and each scope handed on.
    assert_eq!(server.store.audit_count().expect("count"), before + 3);
    server.stop().await;
}

/// Issue 13, finding 2: a token with only `val:read val:write` rewrote the
/// code of a val whose runs hold blob scopes and an env secret.
#[tokio::test(flavor = "multi_thread")]
async fn changing_what_a_val_runs_needs_every_scope_its_runs_hold() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let owner = server.token(&ada, ScopeSet::all());
    let c = &server.client;
    let r = c
        .post(format!("{}/v1/vals", server.url))
        .bearer_auth(&owner)
        .json(
            &json!({"name": "vault", "type": "script", "code": "console.log('safe')",
                      "scopes": ["blob:read"], "env": {"SECRET": "hunter2"}}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let patch = |token: String, body: serde_json::Value| {
        let url = format!("{}/v1/vals/{id}", server.url);
        async move {
            c.patch(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("patch")
        }
    };

    let vals_only = server.token(&ada, scopes("val:read val:write"));
    for body in [
        json!({"code": "console.log(Deno.env.get('SECRET'))"}),
        json!({"env": {"SECRET": "changed"}}),
        json!({"type": "http"}),
    ] {
        let (status, code, required) =
            error_code(patch(vals_only.clone(), body.clone()).await).await;
        assert_eq!(
            (status, code.as_str(), required.as_deref()),
            (403, "missing_scope", Some("blob:read")),
            "{body}"
        );
    }
    // Nothing changed.
    let val: serde_json::Value = c
        .get(format!("{}/v1/vals/{id}", server.url))
        .bearer_auth(&owner)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(val["code"], "console.log('safe')");
    assert_eq!(val["type"], "script");
    let stored = server.store.val_by_id(&id).expect("lookup").expect("val");
    assert_eq!(stored.env["SECRET"], "hunter2");

    // What does not change what runs stays open to val:write alone.
    let r = patch(
        vals_only.clone(),
        json!({"name": "vault2", "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(r.status(), 200);
    // A maker who holds the val's scopes may change its code.
    let enough = server.token(&ada, scopes("val:read val:write blob:read"));
    let r = patch(enough, json!({"code": "console.log('new')"})).await;
    assert_eq!(r.status(), 200);
    server.stop().await;
}

fn email_server_options(smtp: &Smtp) -> Options {
    Options {
        smtp: Some(smtp.url()),
        email_from: Some("mail@valet.example".into()),
        ..Default::default()
    }
}

/// Issue 13, finding 3: `headers` replaced valet's From (and Sender,
/// Message-ID, Content-Type) at the SMTP server.
#[tokio::test(flavor = "multi_thread")]
async fn email_headers_cannot_replace_the_sender_the_recipients_or_the_structure() {
    let smtp = Smtp::start();
    let server = Server::start_with(email_server_options(&smtp)).await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let send = |body: serde_json::Value| {
        server
            .client
            .post(format!("{}/v1/email", server.url))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    for header in [
        "From",
        "Sender",
        "Reply-To",
        "To",
        "Cc",
        "bcc",
        "Message-ID",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Received",
    ] {
        let r = send(json!({"subject": "x", "text": "x",
                            "headers": {header: "\"PayPal Security\" <security@paypal.com>"}}))
        .await
        .expect("send");
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("header_not_allowed")),
            "{header}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("'{header}'")), "{message}");
    }
    // Hosted shape: 202 with the message the hosted std checks for;
    // replyToList accepted; no subject gets the hosted default.
    let r = send(json!({"text": "body text", "headers": {"X-Val": "demo", "List-Unsubscribe": "<https://example.com/u>"},
                        "replyToList": [{"email": "list@example.com", "name": "The List"}]}))
    .await
    .expect("send");
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["message"], "Email accepted to be sent");
    assert_eq!(body["status"], "queued");
    assert!(body["id"].is_i64(), "{body}");
    let messages = smtp.wait_for(1).await;
    assert_eq!(
        messages.len(),
        1,
        "one message delivered, none of the refused"
    );
    let m = &messages[0];
    for needle in [
        "Subject: Message from @ada on Val Town",
        "X-Val: demo",
        "List-Unsubscribe: <https://example.com/u>",
        "Reply-To: \"The List\" <list@example.com>",
        "<mail@valet.example>",
    ] {
        assert!(m.contains(needle), "{needle} missing in:\n{m}");
    }
    let froms: Vec<&str> = m.lines().filter(|l| l.starts_with("From:")).collect();
    assert_eq!(froms.len(), 1, "{m}");
    assert!(froms[0].contains("<mail@valet.example>"), "{}", froms[0]);
    assert!(!m.contains("paypal"), "{m}");
    server.stop().await;
}

/// Issue 13, finding 3: system mail came from hard-coded addresses.
#[tokio::test(flavor = "multi_thread")]
async fn valets_own_mail_comes_from_the_configured_sender() {
    let smtp = Smtp::start();
    let server = Server::start_with(email_server_options(&smtp)).await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    // What the GitHub endpoint and `valet token revoke-leaked` call, with
    // the host's configured sender.
    let outcome = valet_store::report_leak(
        &server.store,
        &token,
        "https://example.com/leak",
        &server.host.as_ref().expect("host").state.config.email_from,
        &server.url,
    )
    .expect("report");
    assert_eq!(outcome, valet_store::LeakOutcome::Revoked);
    let messages = smtp.wait_for(1).await;
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].contains("From: \"valet security\" <mail@valet.example>"),
        "{}",
        messages[0]
    );
    server.stop().await;
}

/// Issue 13, finding 7: five 9 MB emails were accepted in a row.
#[tokio::test(flavor = "multi_thread")]
async fn email_has_a_daily_quota_of_messages_and_bytes() {
    let server = Server::start_with(Options {
        email_quota: Some(valet_store::EmailQuota {
            messages_per_day: 3,
            bytes_per_day: 3 << 20,
        }),
        ..Default::default()
    })
    .await;
    let (ada, bob) = (server.user("ada"), server.user("bob"));
    let send = |token: String, body: serde_json::Value| {
        let url = format!("{}/v1/email", server.url);
        let client = server.client.clone();
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("send")
        }
    };
    let token = server.token(&ada, ScopeSet::all());
    for _ in 0..3 {
        let r = send(token.clone(), json!({"subject": "hi", "text": "x"})).await;
        assert_eq!(r.status(), 202);
    }
    let r = send(token.clone(), json!({"subject": "hi", "text": "x"})).await;
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("email_quota_exceeded"))
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("3 messages per day") && message.contains("resets at"),
        "{message}"
    );
    // Bytes: a 1.7 MB attachment (as base64) fits in 3 MiB only once.
    let token = server.token(&bob, ScopeSet::all());
    let big = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        vec![7u8; 1_300_000],
    );
    let body = json!({"subject": "big", "attachments": [{"filename": "a.bin", "content": big}]});
    assert_eq!(send(token.clone(), body.clone()).await.status(), 202);
    let r = send(token.clone(), body).await;
    let (status, code, _) = error_code(r).await;
    assert_eq!((status, code.as_str()), (429, "email_quota_exceeded"));
    server.stop().await;
}

/// The peak resident memory of this process, in bytes (Linux).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Issue 13, finding 4: with only `sqlite:read`, four 250 MB blobs came
/// back as 1.33 GB and the server peaked at 2.58 GB.
#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_read_cannot_cost_gigabytes() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let token = server.token(&ada, scopes("sqlite:read"));
    let exec = |sql: &str| {
        server
            .client
            .post(format!("{}/v1/sqlite/execute", server.url))
            .bearer_auth(&token)
            .json(&json!({"statement": sql}))
            .send()
    };
    let before = peak_rss();
    let r = exec("SELECT randomblob(250000000) FROM (VALUES (1),(2),(3),(4))")
        .await
        .expect("execute");
    let after = peak_rss();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("result_too_large")),
        "{body}"
    );
    if let (Some(before), Some(after)) = (before, after) {
        let grew = after.saturating_sub(before);
        eprintln!(
            "peak RSS of the test process (server in-process): {} MiB before, {} MiB after (+{} MiB)",
            before >> 20,
            after >> 20,
            grew >> 20
        );
        assert!(grew < 256 << 20, "the peak grew by {} MiB", grew >> 20);
    }
    // Many small rows stop at the row cap, while they are read.
    let r = exec(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) SELECT i FROM n",
    )
    .await
    .expect("execute");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("result_too_large"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rows"),
        "{body}"
    );
    // A result within the caps still comes back whole.
    let r = exec("SELECT length(randomblob(1000000))")
        .await
        .expect("execute");
    assert_eq!(r.status(), 200);
    server.stop().await;
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .map(|i| i + marker.len())
        .expect("hidden field");
    html[start..start + html[start..].find('"').expect("end")].to_owned()
}

fn cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn with_password(server: &Server, name: &str) {
    let user = server.user(name);
    let hash = valet_core::password::hash("a good password").expect("hash");
    server
        .store
        .set_password_hash(&user.id, &hash)
        .expect("password");
}

/// Signs in through `/login?next=...`; returns where it sent us and the
/// session's Set-Cookie line.
async fn sign_in_to(server: &Server, next: &str) -> (String, String) {
    let c = no_redirects();
    let form = c
        .get(format!("{}/login", server.url))
        .query(&[("next", next)])
        .send()
        .await
        .expect("form");
    let pre = cookie(&form, "valet_login_csrf").expect("login csrf cookie");
    let pre = pre.split(';').next().unwrap_or_default().to_owned();
    let html = form.text().await.expect("html");
    let (csrf, next_field) = (hidden(&html, "csrf"), hidden(&html, "next"));
    // The form's hidden field, and a forged one posted directly.
    let mut places = Vec::new();
    for next in [next_field.as_str(), next] {
        let r = c
            .post(format!("{}/login", server.url))
            .header("cookie", &pre)
            .form(&[
                ("username", "ada"),
                ("password", "a good password"),
                ("csrf", csrf.as_str()),
                ("next", next),
            ])
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 303, "sign-in redirects");
        let location = r.headers()["location"].to_str().expect("text").to_owned();
        places.push((location, cookie(&r, "valet_session").expect("session")));
    }
    assert_eq!(places[0].0, places[1].0, "form and direct post agree");
    places.swap_remove(0)
}

/// Issue 13, finding 6: `/login?next=/%09/evil.example` ended on the other
/// site (browsers drop the tab).
#[tokio::test(flavor = "multi_thread")]
async fn sign_in_only_returns_to_a_path_on_this_site() {
    let server = Server::start().await;
    with_password(&server, "ada");
    for next in [
        "/\t/evil.example",
        "//evil",
        "/\\evil",
        "https://evil",
        "/\n/evil",
    ] {
        let (location, _) = sign_in_to(&server, next).await;
        assert_eq!(location, "/", "{next:?}");
    }
    let (location, session) = sign_in_to(&server, "/vals").await;
    assert_eq!(location, "/vals");
    assert!(
        !session.contains("Secure"),
        "no Secure flag over plain http: {session}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cookies_are_secure_when_people_reach_valet_over_https() {
    let server = Server::start_with(Options {
        public_url: Some("https://valet.example".into()),
        ..Default::default()
    })
    .await;
    with_password(&server, "ada");
    let form = no_redirects()
        .get(format!("{}/login", server.url))
        .send()
        .await
        .expect("form");
    let login = cookie(&form, "valet_login_csrf").expect("cookie");
    assert!(login.contains("; Secure"), "{login}");
    let (_, session) = sign_in_to(&server, "/").await;
    assert!(
        session.contains("; Secure") && session.contains("HttpOnly"),
        "{session}"
    );
    server.stop().await;
}

/// Issue 13: the pages sent no frame or CSP headers.
#[tokio::test(flavor = "multi_thread")]
async fn every_page_forbids_framing_and_inline_script() {
    let server = Server::start().await;
    with_password(&server, "ada");
    let (_, session) = sign_in_to(&server, "/").await;
    let session = session.split(';').next().unwrap_or_default().to_owned();
    let c = no_redirects();
    // A token exists, so the page has its revoke form (with a confirmation).
    let form = c
        .get(format!("{}/settings/tokens", server.url))
        .header("cookie", &session)
        .send()
        .await
        .expect("page");
    let csrf = hidden(&form.text().await.expect("html"), "csrf");
    let created = c
        .post(format!("{}/settings/tokens", server.url))
        .header("cookie", &session)
        .form(&[
            ("csrf", csrf.as_str()),
            ("name", "x"),
            ("expiry", "never"),
            ("scope_blob", "read"),
        ])
        .send()
        .await
        .expect("create");
    let mut responses = vec![("POST /settings/tokens".to_owned(), created)];
    for (path, signed_in) in [
        ("/login", false),
        ("/login?next=/vals", false),
        ("/", false),
        ("/settings/tokens", false),
        ("/settings/tokens", true),
        ("/vals", true),
        ("/vals/nope/settings", true),
    ] {
        let mut request = c.get(format!("{}{path}", server.url));
        if signed_in {
            request = request.header("cookie", &session);
        }
        responses.push((
            format!("GET {path} ({signed_in})"),
            request.send().await.expect("get"),
        ));
    }
    for (what, r) in responses {
        let headers = r.headers().clone();
        let csp = headers
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            headers.get("x-frame-options").map(|v| v.as_bytes()),
            Some(&b"DENY"[..]),
            "{what}"
        );
        for part in [
            "frame-ancestors 'none'",
            "default-src 'none'",
            "script-src 'self'",
        ] {
            assert!(csp.contains(part), "{what}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{what}: {csp}");
        let html = r.text().await.expect("body");
        for inline in [" onclick=", " onsubmit=", " style=", "<style", "<script>"] {
            assert!(!html.contains(inline), "{what} has {inline}");
        }
    }
    // The style sheet and script the pages load are valet's own.
    for (path, kind) in [
        ("/assets/valet.css", "text/css"),
        ("/assets/valet.js", "text/javascript"),
    ] {
        let r = c
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap_or_default()
                .starts_with(kind)
        );
    }
    server.stop().await;
}
