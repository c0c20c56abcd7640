//! The scope migration over a seeded store: exact counts, idempotence,
//! crash and resume, dry runs, revert, emails at a real SMTP server.

use std::collections::BTreeMap;

use valet_core::{Granted, Scope, ScopeSet, TokenScopes};
use valet_store::{AuditEvent, MigrationOptions, Principal, Store, time};

use crate::support::{Options, Server, Smtp, error_code};

const DAY: i64 = 86_400_000;

/// How many tokens of each kind `seed` makes, per owner.
struct Seeded {
    owners: Vec<String>,
    held_owners: usize,
}

/// Seeds `owners` users with legacy tokens: per owner, 200 plain legacy
/// tokens, 1 with recent val:write (owners 0..held), 1 with val:write
/// outside the window, 2 revoked, 2 expired, 3 already scoped. Audit rows
/// pad every token with blob reads.
fn seed(store: &Store, owners: usize, held: usize) -> Seeded {
    let now = time::now_ms();
    let mut names = Vec::new();
    let mut audit = Vec::new();
    for o in 0..owners {
        let user = store
            .create_user(&format!("owner{o}"), &format!("owner{o}@example.com"), None)
            .expect("user");
        for i in 0..200 {
            let (t, _) = store
                .create_token(
                    &Granted::for_operator(&user.id),
                    &format!("plain{i}"),
                    TokenScopes::Legacy,
                    None,
                )
                .expect("t");
            audit.push(event(&user.id, &t.id, Scope::BLOB_READ, now - DAY));
        }
        if o < held {
            let (t, _) = store
                .create_token(
                    &Granted::for_operator(&user.id),
                    "deployer",
                    TokenScopes::Legacy,
                    None,
                )
                .expect("t");
            audit.push(event(&user.id, &t.id, Scope::VAL_WRITE, now - 3 * DAY));
            audit.push(event(&user.id, &t.id, Scope::BLOB_READ, now - DAY));
        }
        let (old, _) = store
            .create_token(
                &Granted::for_operator(&user.id),
                "old-deployer",
                TokenScopes::Legacy,
                None,
            )
            .expect("t");
        audit.push(event(&user.id, &old.id, Scope::VAL_WRITE, now - 200 * DAY));
        for i in 0..2 {
            let (t, _) = store
                .create_token(
                    &Granted::for_operator(&user.id),
                    &format!("revoked{i}"),
                    TokenScopes::Legacy,
                    None,
                )
                .expect("t");
            audit.push(event(&user.id, &t.id, Scope::USER_WRITE, now - DAY));
            store
                .revoke_token(&Granted::for_operator(&user.id), &t.id, "test")
                .expect("revoke");
            store
                .create_token(
                    &Granted::for_operator(&user.id),
                    &format!("expired{i}"),
                    TokenScopes::Legacy,
                    Some(now - DAY),
                )
                .expect("t");
        }
        for i in 0..3 {
            store
                .create_token(
                    &Granted::for_operator(&user.id),
                    &format!("scoped{i}"),
                    TokenScopes::Scoped(ScopeSet::default_val()),
                    None,
                )
                .expect("t");
        }
        names.push(user.id);
    }
    store.insert_audit_rows(&audit).expect("audit");
    Seeded {
        owners: names,
        held_owners: held,
    }
}

fn event(user: &str, token: &str, scope: Scope, at: i64) -> AuditEvent {
    AuditEvent {
        principal: Principal::Token {
            user_id: user.into(),
            token_id: token.into(),
        },
        scope,
        route: "seed".into(),
        at,
    }
}

/// Everything the migration may change, by owner and token name.
fn state(store: &Store, owners: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for owner in owners {
        for t in store
            .list_tokens(&Granted::for_operator(owner))
            .expect("list")
        {
            out.insert(
                format!("{owner}/{}", t.name),
                format!("{:?} {:?}", t.scopes, t.migration_state),
            );
        }
        out.insert(
            format!("{owner}/emails"),
            store
                .list_emails(&Granted::for_operator(owner), 100)
                .expect("emails")
                .len()
                .to_string(),
        );
    }
    out
}

/// A logical dump of everything the migration can touch, for "changed
/// nothing" checks. (The store has no raw-SQL API on purpose.)
fn dump(path: &std::path::Path) -> String {
    let store = Store::open(path).expect("open");
    let mut out = String::new();
    for user in ["owner0", "owner1", "owner2", "owner3"] {
        let Some(u) = store.user_by_name(user).expect("q") else {
            continue;
        };
        for t in store
            .list_tokens(&Granted::for_operator(&u.id))
            .expect("list")
        {
            out.push_str(&format!(
                "{} {} {:?} {:?} {:?} {:?} {:?}\n",
                t.id,
                t.name,
                t.scopes,
                t.migration_state,
                t.migration_note,
                t.revoked_at,
                t.last_used_at
            ));
        }
        out.push_str(&format!(
            "emails {}\n",
            store
                .list_emails(&Granted::for_operator(&u.id), 1000)
                .expect("emails")
                .len()
        ));
    }
    out
}

#[test]
fn exact_counts_idempotent_and_resumable() {
    let a = tempfile::tempdir().expect("a");
    let b = tempfile::tempdir().expect("b");
    let store_a = Store::open(a.path()).expect("open a");
    let store_b = Store::open(b.path()).expect("open b");
    let seeded_a = seed(&store_a, 4, 3);
    let seeded_b = seed(&store_b, 4, 3);
    let options = MigrationOptions {
        batch_size: 97,
        ..Default::default()
    };

    let summary = store_a
        .migrate_scopes(&options, |_, _| {})
        .expect("migrate");
    // Per owner: 200 plain + 1 old-deployer migrated; 1 deployer held (3 owners).
    assert_eq!(summary.migrated, 4 * 201);
    assert_eq!(summary.held, 3);
    assert_eq!(summary.skipped_revoked, 8);
    assert_eq!(summary.skipped_expired, 8);
    assert_eq!(summary.already_scoped, 12);
    assert_eq!(summary.owners_emailed, 3);
    assert!(
        summary
            .headline()
            .starts_with("migrated 804 of 807 legacy tokens (99.6%); held 3"),
        "{}",
        summary.headline()
    );

    // A second run changes nothing and emails nobody.
    let before = state(&store_a, &seeded_a.owners);
    let again = store_a.migrate_scopes(&options, |_, _| {}).expect("again");
    assert_eq!(
        (
            again.migrated,
            again.held,
            again.owners_emailed,
            again.previously_held
        ),
        (0, 0, 0, 3)
    );
    assert_eq!(state(&store_a, &seeded_a.owners), before);

    // Crash after batch 3, then a re-run: the same end state.
    let crashed = store_b
        .migrate_scopes(
            &MigrationOptions {
                stop_after_batches: Some(3),
                ..options.clone()
            },
            |_, _| {},
        )
        .expect("partial");
    assert!(crashed.interrupted);
    assert!(crashed.migrated > 0 && crashed.migrated < 804);
    drop(store_b);
    let store_b = Store::open(b.path()).expect("reopen b");
    let resumed = store_b.migrate_scopes(&options, |_, _| {}).expect("resume");
    assert_eq!(crashed.migrated + resumed.migrated, 804);
    assert_eq!(resumed.owners_emailed, 3);
    let normalise = |m: BTreeMap<String, String>, owners: &[String]| -> Vec<String> {
        let mut v: Vec<String> = m
            .into_iter()
            .map(|(k, v)| {
                let idx = owners
                    .iter()
                    .position(|o| k.starts_with(o.as_str()))
                    .expect("owner");
                format!("{idx}{} {v}", &k[owners[idx].len()..])
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        normalise(state(&store_b, &seeded_b.owners), &seeded_b.owners),
        normalise(before, &seeded_a.owners)
    );
    assert_eq!(seeded_b.held_owners, 3);
}

#[test]
fn dry_run_changes_nothing_and_revert_restores_one_token() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::open(dir.path()).expect("open");
    seed(&store, 2, 1);
    drop(store);
    let before = dump(dir.path());
    let valet = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_valet"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("run")
    };
    let out = valet(&["migrate", "scopes", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would migrate 402 of 403 legacy tokens (99.8%); would hold 1"),
        "{text}"
    );
    assert!(
        text.contains("held ") && text.contains("\"deployer\""),
        "{text}"
    );
    assert_eq!(dump(dir.path()), before, "a dry run changed the database");

    let out = valet(&["migrate", "scopes", "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(summary["migrated"], 402);
    assert_eq!(summary["held"], 1);
    let store = Store::open(dir.path()).expect("open");
    let owner = store.user_by_name("owner0").expect("q").expect("owner");
    let token = store
        .list_tokens(&Granted::for_operator(&owner.id))
        .expect("list")
        .into_iter()
        .find(|t| t.name == "plain7")
        .expect("plain7");
    assert_eq!(token.scopes, TokenScopes::Scoped(ScopeSet::default_val()));
    let out = valet(&["migrate", "scopes", "--revert", &token.id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        store.token_by_id(&token.id).expect("t").scopes,
        TokenScopes::Legacy
    );
    let early = valet(&[
        "migrate",
        "scopes",
        "--finish-held",
        "--after",
        "2999-01-01",
    ]);
    assert!(
        !early.status.success(),
        "finish-held before the date is refused"
    );
    let done = valet(&[
        "migrate",
        "scopes",
        "--finish-held",
        "--after",
        "2020-01-01",
    ]);
    assert!(done.status.success());
    let deployer = store
        .list_tokens(&Granted::for_operator(&owner.id))
        .expect("list")
        .into_iter()
        .find(|t| t.name == "deployer")
        .expect("deployer");
    assert_eq!(
        deployer.scopes,
        TokenScopes::Scoped(ScopeSet::default_val())
    );
    assert_eq!(
        store
            .list_emails(&Granted::for_operator(&owner.id), 10)
            .expect("emails")
            .len(),
        2,
        "held email, then the finish email"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn held_owners_get_one_email_and_migrated_tokens_lose_val_write() {
    let smtp = Smtp::start();
    let server = Server::start_with(Options {
        smtp: Some(smtp.url()),
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let bob = server.user("bob");
    let (_, legacy) = server
        .store
        .create_token(
            &Granted::for_operator(&ada.id),
            "old",
            TokenScopes::Legacy,
            None,
        )
        .expect("t");
    let (deployer, _) = server
        .store
        .create_token(
            &Granted::for_operator(&bob.id),
            "deploy",
            TokenScopes::Legacy,
            None,
        )
        .expect("t");
    let (deployer2, _) = server
        .store
        .create_token(
            &Granted::for_operator(&bob.id),
            "deploy2",
            TokenScopes::Legacy,
            None,
        )
        .expect("t");
    let now = time::now_ms();
    server
        .store
        .insert_audit_rows(&[
            event(&bob.id, &deployer.id, Scope::VAL_WRITE, now - DAY),
            event(&bob.id, &deployer2.id, Scope::USER_WRITE, now - DAY),
        ])
        .expect("audit");
    let create = |token: String, name: &'static str| {
        let c = server.client.clone();
        let url = server.url.clone();
        async move {
            c.post(format!("{url}/v1/vals"))
                .bearer_auth(token)
                .json(&serde_json::json!({"name": name, "type": "script", "code": "1"}))
                .send()
                .await
                .expect("post")
        }
    };
    // Before: the legacy token holds every scope. (Using val:write with it
    // here would, rightly, get it held.)
    let me = server
        .client
        .get(format!("{}/v1/tokens", server.url))
        .bearer_auth(legacy.expose())
        .send()
        .await
        .expect("list");
    assert_eq!(me.status(), 200);
    let listed: serde_json::Value = me.json().await.expect("json");
    assert_eq!(listed[0]["legacy"], true);
    let summary = server
        .store
        .migrate_scopes(&MigrationOptions::default(), |_, _| {})
        .expect("migrate");
    assert_eq!(
        (summary.migrated, summary.held, summary.owners_emailed),
        (1, 2, 1)
    );
    let (status, code, required) =
        error_code(create(legacy.expose().to_owned(), "after").await).await;
    assert_eq!(
        (status, code.as_str(), required.as_deref()),
        (403, "missing_scope", Some("val:write"))
    );
    let r = server
        .client
        .get(format!("{}/v1/blob", server.url))
        .bearer_auth(legacy.expose())
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200, "a migrated token still reads blobs");
    // The outbox is what the mailer sends: one email, to bob.
    let queued = |user: &str| {
        server
            .store
            .list_emails(&valet_core::Granted::for_operator(user), 10)
            .expect("outbox")
            .len()
    };
    assert_eq!(
        (queued(&bob.id), queued(&ada.id)),
        (1, 0),
        "one email for bob's two held tokens"
    );
    let messages = smtp.wait_for(1).await;
    assert_eq!(messages.len(), 1, "one email for bob's two held tokens");
    assert!(messages[0].contains("To: bob@example.com"));
    assert!(messages[0].contains("deploy2"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_never_receive_legacy_or_full_scope_tokens() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let code = r#"const k = Deno.env.get("valtown")!;
const claims = JSON.parse(atob(k.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
console.log("legacy", k.startsWith("vlt_"), "scope", claims.scope);"#;
    for (scopes, has_val_write) in [
        (ScopeSet::default_val(), false),
        (ScopeSet::default_val().with(Scope::VAL_WRITE), true),
    ] {
        let out = server
            .supervisor()
            .run(valet_runtime::RunSpec {
                user_id: ada.id.clone(),
                val_id: None,
                kind: valet_store::ValKind::Script,
                source: valet_runtime::Source::Code(code.into()),
                scopes,
                env: Default::default(),
                timeout: std::time::Duration::from_secs(5),
                trigger: "test",
                last_run_at: None,
            })
            .await
            .expect("run");
        assert!(out.logs.contains("legacy false"), "{}", out.logs);
        assert_eq!(
            out.logs.contains("val:write"),
            has_val_write,
            "{}",
            out.logs
        );
        assert!(!out.logs.contains("user:write"), "{}", out.logs);
    }
    server.stop().await;
}
