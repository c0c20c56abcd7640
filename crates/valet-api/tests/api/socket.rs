//! The API over a real socket (`valet_api::serve` on 127.0.0.1:0): what
//! only a socket shows: a real HTTP client, a connection the server closes
//! after an oversized body, the peer address the sign-in limiter keys on,
//! and graceful shutdown.

use serde_json::json;
use tokio::net::TcpListener;

use crate::support::{Api, scopes};

/// `serve` on an ephemeral port until the returned sender fires.
struct Served {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn serve(api: &Api) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(valet_api::serve(listener, api.state.clone(), async {
        let _ = stopped.await;
    }));
    Served { url, stop, task }
}

impl Served {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.expect("join").expect("serve ended cleanly");
    }
}

#[tokio::test]
async fn the_api_answers_real_http_and_shuts_down_gracefully() {
    let api = Api::start();
    let ada = api.user("ada");
    let token = api.token(&ada, scopes("user:read blob:write"));
    let served = serve(&api).await;
    let client = reqwest::Client::new();
    let me: serde_json::Value = client
        .get(format!("{}/v1/me", served.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["username"], "ada");
    let r = client
        .get(format!("{}/v1/blob", served.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 403);
    let error: serde_json::Value = r.json().await.expect("json");
    assert_eq!(error["error"]["required"], "blob:read");
    // An oversized body is refused whole; the server may close that
    // connection, so the next call uses a fresh client.
    let r = client
        .post(format!("{}/v1/blob/big", served.url))
        .bearer_auth(&token)
        .body(vec![0u8; 11 << 20])
        .send()
        .await
        .expect("an answer to the oversized body");
    assert_eq!(r.status(), 413);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/blob/small", served.url))
        .bearer_auth(&token)
        .body("ok")
        .send()
        .await
        .expect("set");
    assert_eq!(r.status(), 201);

    let url = served.url.clone();
    served.shutdown().await;
    let after = reqwest::Client::new()
        .get(format!("{url}/v1/me"))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(after.is_err(), "the listener is closed after shutdown");
}

/// Sign-in reads the peer address (`ConnectInfo`), which only `serve`
/// provides: a wrong password is a 401 page, never a 500.
#[tokio::test]
async fn sign_in_sees_the_peer_address() {
    let api = Api::start();
    api.user("ada");
    let served = serve(&api).await;
    let client = reqwest::Client::new();
    let form = client
        .get(format!("{}/login", served.url))
        .send()
        .await
        .expect("form");
    assert_eq!(form.status(), 200);
    let cookie = form
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.split(';').next().filter(|kv| kv.contains('=')))
        .expect("a CSRF cookie")
        .to_owned();
    let csrf = cookie
        .split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let r = client
        .post(format!("{}/login", served.url))
        .header(reqwest::header::COOKIE, &cookie)
        .form(&json!({"username": "ada", "password": "wrong", "csrf": csrf}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 401);
    served.shutdown().await;
}
