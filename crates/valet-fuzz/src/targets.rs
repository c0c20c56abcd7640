//! The targets. Each returns quietly on input its parser refuses, and
//! panics only when a property valet relies on does not hold.

use std::sync::OnceLock;

use base64::Engine;
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey;
use valet_core::{
    ApiToken, KeyRing, MintRequest, Schedule, Scope, ScopeSet, SigningKey, TokenHash,
};
use valet_store::{BatchMode, BlobKey, SqlStatement, Store};

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// `ApiToken::parse`: whatever it accepts is exactly the text given, and
/// its hint and hash work.
pub fn api_token(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(token) = ApiToken::parse(text) {
        assert_eq!(token.expose(), text);
        let _ = token.hint();
        assert!(token.hash().ct_eq(&TokenHash::of(text)));
    }
}

/// Scope lists and single scopes round-trip through their text form.
pub fn scope(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(set) = ScopeSet::parse(text) {
        let again = ScopeSet::parse(&set.to_claim()).expect("a set's own claim parses");
        assert!(again == set, "{text:?} does not round-trip");
        for scope in set.iter() {
            assert!(set.contains(scope));
        }
    }
    if let Ok(scope) = text.parse::<Scope>() {
        assert_eq!(scope.to_string().parse::<Scope>().ok(), Some(scope));
    }
}

struct Minted {
    ring: KeyRing,
    token: String,
}

fn minted() -> &'static Minted {
    static MINTED: OnceLock<Minted> = OnceLock::new();
    MINTED.get_or_init(|| {
        let ring = KeyRing::new(SigningKey::from_secret([7; 32])).expect("ring");
        let now = unix_now();
        let token = ring
            .mint(&MintRequest {
                user_id: "usr_fuzz",
                val_id: Some("val_fuzz"),
                run_id: "run_fuzz",
                scopes: ScopeSet::default_val(),
                start: now,
                deadline: now + 24 * 3600,
            })
            .expect("mint");
        Minted { ring, token }
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run-token verification: nothing but the token the key signed verifies.
/// Input starting with `!` is a list of (position, xor) edits of a freshly
/// minted token; anything else is a token as is.
pub fn run_token(data: &[u8]) {
    let minted = minted();
    let token = match data.split_first() {
        Some((b'!', edits)) => {
            let mut bytes = minted.token.as_bytes().to_vec();
            for edit in edits.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % bytes.len();
                bytes[at] ^= edit[2];
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => match text(data) {
            Some(t) => t.to_owned(),
            None => return,
        },
    };
    if let Ok(claims) = minted.ring.verify(&token, unix_now()) {
        let signed = |t: &str| t.rsplit_once('.').map(|(head, _)| head.to_owned());
        assert_eq!(
            signed(&token),
            signed(&minted.token),
            "a token whose header or claims were changed still verifies"
        );
        assert_eq!(claims.jti, "run_fuzz");
    }
}

/// Blob keys: accepted exactly when 1 to 512 bytes without NUL.
pub fn blob_key(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let expected = (1..=512).contains(&text.len()) && !text.contains('\0');
    assert_eq!(BlobKey::parse(text).is_ok(), expected, "{text:?}");
}

struct Sql {
    _dir: tempfile::TempDir,
    store: Store,
    user: String,
}

fn sql_db() -> &'static Sql {
    static DB: OnceLock<Sql> = OnceLock::new();
    DB.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let user = store
            .create_user("fuzz", "fuzz@example.com", None)
            .expect("user")
            .id;
        let seed = [
            "CREATE TABLE seed (a INTEGER PRIMARY KEY, b TEXT)",
            "INSERT INTO seed (b) VALUES ('one'), ('two')",
            "CREATE INDEX seed_b ON seed(b)",
            "CREATE VIEW seed_view AS SELECT b FROM seed",
        ]
        .map(|s| SqlStatement::Text(s.into()));
        store
            .user_dbs()
            .execute(&mut grants(&user, true), &seed, BatchMode::Write)
            .expect("seed");
        Sql {
            _dir: dir,
            store,
            user,
        }
    })
}

/// What a read-only caller must not change: the schema, the rows, and the
/// files in the user databases' directory.
fn sql_snapshot(db: &Sql) -> (String, Vec<String>) {
    let reads = [
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name",
        "SELECT a, b FROM seed ORDER BY a",
        "PRAGMA user_version",
    ]
    .map(|s| SqlStatement::Text(s.into()));
    let (results, _) = db
        .store
        .user_dbs()
        .execute(&mut grants(&db.user, false), &reads, BatchMode::Read)
        .expect("snapshot");
    let rows = format!("{:?}", results.iter().map(|r| &r.rows).collect::<Vec<_>>());
    let dir = db
        .store
        .user_dbs()
        .path(&db.user)
        .expect("path")
        .parent()
        .map(std::path::Path::to_owned)
        .expect("dir");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
        .collect();
    files.sort();
    (rows, files)
}

/// Proofs for `user`: `sqlite:read`, and `sqlite:write` when `write`.
fn grants(user: &str, write: bool) -> valet_store::HeldSqliteGrants {
    valet_store::HeldSqliteGrants::new(
        Some(valet_core::Granted::for_operator(user)),
        write.then(|| valet_core::Granted::for_operator(user)),
    )
    .expect("proofs for one user")
}

/// SQL classification and the authorizer: a caller holding only
/// `sqlite:read` changes nothing, whatever it sends.
pub fn sql(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let db = sql_db();
    let before = sql_snapshot(db);
    let statements = [SqlStatement::Text(text.to_owned())];
    for mode in [BatchMode::Read, BatchMode::Deferred, BatchMode::Write] {
        let _ = db
            .store
            .user_dbs()
            .execute(&mut grants(&db.user, false), &statements, mode);
    }
    assert_eq!(
        sql_snapshot(db),
        before,
        "a read-only caller changed the database with {text:?}"
    );
}

/// Email addresses: what `validate_email` accepts, the mailer can send to.
/// Subjects and header values without line breaks stay one header line.
pub fn email(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if valet_store::validate_email(text).is_ok() {
        if let Err(e) = text.parse::<lettre::Address>() {
            panic!("validate_email accepts {text:?} but the mailer cannot send to it: {e}");
        }
        let message: valet_store::EmailMessage = serde_json::from_value(serde_json::json!({
            "from": "valet@valet.localhost",
            "to": [text],
            "subject": "s",
        }))
        .expect("message");
        if let Err(e) = valet_server::mailer::build(&message) {
            panic!(
                "validate_email accepts {text:?} but the mailer cannot build a message to it: {e}"
            );
        }
    }
    if !text.contains(['\r', '\n']) {
        // A subject EmailMessage refuses (control characters, say) never
        // reaches the mailer; the property is about the ones it takes.
        let Ok(message) = serde_json::from_value::<valet_store::EmailMessage>(serde_json::json!({
            "from": "valet@valet.localhost",
            "to": ["to@example.com"],
            "subject": text,
            "text": "body",
        })) else {
            return;
        };
        if let Ok(built) = valet_server::mailer::build(&message) {
            let raw = String::from_utf8_lossy(&built.formatted()).into_owned();
            let head = raw.split("\r\n\r\n").next().unwrap_or_default();
            let subjects = head.lines().filter(|l| l.starts_with("Subject:")).count();
            assert_eq!(
                subjects, 1,
                "subject {text:?} became {subjects} header lines"
            );
            assert!(
                !head.lines().any(|l| l.starts_with("Bcc:")),
                "subject {text:?} added a Bcc header"
            );
        }
    }
}

/// Cron schedules: a schedule that parses gives next times strictly after
/// the time asked about.
pub fn cron(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let Ok(schedule) = Schedule::parse(text) else {
        return;
    };
    for after in [0i64, 1_700_000_000_123, 4_102_444_800_000] {
        if let Some(next) = schedule.next_after(after) {
            assert!(next > after, "{text:?}: next {next} is not after {after}");
        }
    }
}

/// The fixture format: any `case.json` either parses or is refused, and a
/// parsed case's scopes resolve or are refused, without panicking.
pub fn fixture(data: &[u8]) {
    if let Ok(case) = serde_json::from_slice::<valet_conformance::Case>(data) {
        let _ = case.scopes.resolve();
    }
}

/// GitHub's published secret-scanning test key, body and signature.
const GITHUB_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYAGMWO8XgCamYKMJS6jc/qgvSlAdAjPuDPRcXU22YxgBrz+zoN19MzuRyW87qEt9/AmtoNP5GrobzUvQSyJFVw==";
const GITHUB_BODY: &str = r#"[{"source":"commit","token":"some_token","type":"some_type","url":"https://example.com/base-repo-url/"}]"#;
const GITHUB_SIGNATURE: &str = "MEQCIQDaMKqrGnE27S0kgMrEK0eYBmyG0LeZismAEz/BgZyt7AIfXt9fErtRS4XaeSt/AO1RtBY66YcAdjxji410VQV4xg==";

fn github_key() -> &'static VerifyingKey {
    static KEY: OnceLock<VerifyingKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let der = base64::engine::general_purpose::STANDARD
            .decode(GITHUB_KEY)
            .expect("b64");
        VerifyingKey::from_public_key_der(&der).expect("key")
    })
}

/// GitHub's secret-scanning reports: the first byte picks the part to
/// vary. 0: the signature header (only GitHub's signature verifies the
/// test body); anything else: the body (only GitHub's body verifies under
/// its signature; any body parses or is refused without panicking).
pub fn github(data: &[u8]) {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    if *which == 0 {
        let signature = String::from_utf8_lossy(rest);
        if valet_api::secret_scanning::verify_signature(
            github_key(),
            GITHUB_BODY.as_bytes(),
            &signature,
        ) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(signature.trim())
                .expect("a verifying signature is base64");
            let expected = base64::engine::general_purpose::STANDARD
                .decode(GITHUB_SIGNATURE)
                .expect("b64");
            assert_eq!(
                decoded, expected,
                "another signature verifies: {signature:?}"
            );
        }
    } else {
        if valet_api::secret_scanning::verify_signature(github_key(), rest, GITHUB_SIGNATURE) {
            assert_eq!(rest, GITHUB_BODY.as_bytes(), "another body verifies");
        }
        let _ = serde_json::from_slice::<Vec<valet_api::secret_scanning::Match>>(rest);
    }
}
