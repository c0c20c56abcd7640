//! Blob keys are data, never paths: whatever a key holds, the blob lands
//! as a file in its user's directory; and the quota is a 413.

use serde_json::json;
use valet_api::ApiConfig;
use valet_core::ScopeSet;

use crate::support::{Api, Requests};

#[tokio::test]
async fn blob_keys_are_data_and_stay_in_the_users_directory() {
    let (api, ada, token) = Api::with_user("ada");
    let long_ok = "k".repeat(512);
    let long_bad = "k".repeat(513);
    let cases = [
        ("a%2Fb", 201),
        ("..%2F..%2Fetc%2Fpasswd", 201),
        ("%2E%2E%2F%2E%2E", 201),
        ("dir/sub/key", 201),
        ("%C3%BCn%C3%AFc%C3%B8d%C3%A9", 201),
        ("nul%00byte", 400),
        (long_ok.as_str(), 201),
        (long_bad.as_str(), 400),
    ];
    for (key, expected) in cases {
        let path = format!("/v1/blob/{key}");
        let r = api
            .post(&path)
            .token(&token)
            .body(key.to_owned())
            .send()
            .await;
        assert_eq!(r.status, expected, "{key}: {}", r.text());
        if expected == 201 {
            let body = api.get(&path).token(&token).send().await.text();
            assert_eq!(body, key, "round trip of {key}");
        } else {
            assert_eq!(r.error().1, "invalid_request", "{key}");
        }
    }
    let list = api
        .get("/v1/blob?prefix=..")
        .token(&token)
        .send()
        .await
        .json();
    let keys: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|b| b["key"].as_str())
        .collect();
    assert_eq!(keys, vec!["../..", "../../etc/passwd"]);
    assert!(
        list[0]["lastModified"]
            .as_str()
            .expect("iso")
            .ends_with('Z')
    );
    // Nothing landed outside the user's directory (blob files on SQLite's
    // store, objects beside PostgreSQL).
    let blobs = api.data_dir().join(if api.store.is_shared() {
        "objects"
    } else {
        "blobs"
    });
    let top: Vec<_> = std::fs::read_dir(&blobs)
        .expect("blobs")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(top, vec![std::ffi::OsString::from(&ada.id)]);
    for entry in std::fs::read_dir(blobs.join(&ada.id)).expect("user dir") {
        let entry = entry.expect("entry");
        assert!(entry.file_type().expect("type").is_file());
    }
    assert!(!api.data_dir().join("etc").exists());
    assert!(!api.data_dir().parent().expect("tmp").join("etc").exists());
}

#[tokio::test]
async fn blob_quota_gives_413() {
    let api = Api::with_config(ApiConfig {
        blob_quota: 1000,
        ..ApiConfig::default()
    });
    let ada = api.user("ada");
    let token = api.token(&ada, ScopeSet::all());
    let put = |key: &str, bytes: Vec<u8>| {
        api.post(&format!("/v1/blob/{key}"))
            .token(&token)
            .body(bytes)
            .send()
    };
    assert_eq!(put("a", vec![0u8; 800]).await.status, 201);
    let r = put("b", vec![0u8; 800]).await;
    assert_eq!(r.error(), (413, "quota_exceeded".into()));
    let r = api.get("/v1/blob/b").token(&token).send().await;
    assert_eq!(r.status, 404, "nothing stored past the quota");
    // Replacing a blob counts its new size, not both.
    let r = put("a", vec![1u8; 900]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let list = api.get("/v1/blob").token(&token).send().await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["key"], json!("a"));
}
