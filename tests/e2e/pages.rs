//! The pages over HTTP: sign-in walls, CSRF, other users' objects, the
//! login limiter. The browser itself is driven in tests/browser/.

use reqwest::redirect::Policy;
use reqwest::{Client, StatusCode};
use valet_core::{Granted, GrantedSet, ScopeSet, TokenScopes};

use crate::support::Server;

fn client() -> Client {
    Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .map(|i| i + marker.len())
        .expect("hidden field");
    html[start..start + html[start..].find('"').expect("end")].to_owned()
}

/// Signs in; returns the session cookie and the page's CSRF token.
async fn sign_in(server: &Server, user: &str, password: &str) -> (String, String) {
    let c = client();
    let form = c
        .get(format!("{}/login", server.url))
        .send()
        .await
        .expect("form");
    let pre = set_cookie(&form, "valet_login_csrf").expect("login csrf cookie");
    let csrf = hidden(&form.text().await.expect("html"), "csrf");
    let r = c
        .post(format!("{}/login", server.url))
        .header("cookie", &pre)
        .form(&[
            ("username", user),
            ("password", password),
            ("csrf", &csrf),
            ("next", "/settings/tokens"),
        ])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "sign-in redirects");
    let session = set_cookie(&r, "valet_session").expect("session cookie");
    let cookie_header = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        cookie_header.contains("HttpOnly") && cookie_header.contains("SameSite=Strict"),
        "{cookie_header}"
    );
    let page = c
        .get(format!("{}/settings/tokens", server.url))
        .header("cookie", &session)
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    let csrf = hidden(&page.text().await.expect("html"), "csrf");
    (session, csrf)
}

fn user_with_password(server: &Server, name: &str) -> valet_store::User {
    let user = server.user(name);
    let hash = valet_core::password::hash("a good password").expect("hash");
    server
        .store
        .set_password_hash(&user.id, &hash)
        .expect("set");
    user
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_need_a_session_and_forms_need_csrf() {
    let server = Server::start().await;
    let ada = user_with_password(&server, "ada");
    let c = client();
    for path in ["/settings/tokens", "/vals", "/vals/anything/settings"] {
        let r = c
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert!(
            r.headers()["location"]
                .to_str()
                .expect("loc")
                .starts_with("/login?next="),
            "{path}"
        );
    }
    let r = c
        .post(format!("{}/settings/tokens", server.url))
        .form(&[("name", "x")])
        .send()
        .await
        .expect("post");
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "a form without a session goes to sign-in"
    );
    // A forged cookie is no session.
    let r = c
        .get(format!("{}/settings/tokens", server.url))
        .header("cookie", "valet_session=abc.def")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    let (session, csrf) = sign_in(&server, "ada", "a good password").await;
    let create = |csrf: &str| {
        c.post(format!("{}/settings/tokens", server.url))
            .header("cookie", &session)
            .form(&[
                ("csrf", csrf),
                ("name", "from-form"),
                ("expiry", "never"),
                ("scope_blob", "read"),
            ])
            .send()
    };
    assert_eq!(
        create("").await.expect("post").status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        create("wrong").await.expect("post").status(),
        StatusCode::FORBIDDEN
    );
    assert!(
        server
            .store
            .list_tokens(&Granted::for_operator(&ada.id))
            .expect("list")
            .is_empty(),
        "refused forms created nothing"
    );
    let ok = create(&csrf).await.expect("post");
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.expect("html").contains("vlt_"));
    let tokens = server
        .store
        .list_tokens(&Granted::for_operator(&ada.id))
        .expect("list");
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        tokens[0].scopes,
        TokenScopes::Scoped(ScopeSet::parse("blob:read").expect("s"))
    );

    // Sign-out ends the session for good.
    let r = c
        .post(format!("{}/logout", server.url))
        .header("cookie", &session)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = c
        .get(format!("{}/settings/tokens", server.url))
        .header("cookie", &session)
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "the old cookie no longer works"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_cannot_reach_each_others_tokens_or_vals_by_url() {
    let server = Server::start().await;
    let ada = user_with_password(&server, "ada");
    user_with_password(&server, "bob");
    let (ada_token, _) = server
        .store
        .create_token(
            &Granted::for_operator(&ada.id),
            "adas",
            TokenScopes::Scoped(ScopeSet::all()),
            None,
        )
        .expect("t");
    let val = server
        .store
        .create_val(
            &Granted::for_operator(&ada.id),
            &GrantedSet::for_operator(&ada.id, ScopeSet::all()),
            valet_store::NewVal {
                name: "private".into(),
                kind: valet_store::ValKind::Script,
                code: "1".into(),
                scopes: ScopeSet::default_val(),
                env: [("SECRET".to_owned(), "hunter22".to_owned())].into(),
                timeout_ms: 5000,
                schedule: None,
            },
        )
        .expect("val");
    let (bob, csrf) = sign_in(&server, "bob", "a good password").await;
    let c = client();
    for path in [
        "/vals/private/settings".to_owned(),
        format!("/vals/{}/settings", val.id),
    ] {
        let r = c
            .get(format!("{}{path}", server.url))
            .header("cookie", &bob)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(!r.text().await.expect("html").contains("hunter22"));
    }
    let posts = [
        (format!("/settings/tokens/{}/revoke", ada_token.id), vec![]),
        (
            format!("/settings/tokens/{}/scopes", ada_token.id),
            vec![("scope_blob", "none")],
        ),
        (
            format!("/vals/{}/settings", val.id),
            vec![("scope_val", "write"), ("timeout_s", "9")],
        ),
        ("/vals/private/remove-unused".to_owned(), vec![]),
    ];
    for (path, mut form) in posts {
        form.push(("csrf", &csrf));
        let r = c
            .post(format!("{}{path}", server.url))
            .header("cookie", &bob)
            .form(&form)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let token = server
        .store
        .token_of_user(
            &Granted::<valet_core::grant::UserRead>::for_operator(&ada.id),
            &ada_token.id,
        )
        .expect("token");
    assert!(token.revoked_at.is_none());
    assert_eq!(token.scopes, TokenScopes::Scoped(ScopeSet::all()));
    let val = server
        .store
        .val_of_user(
            &Granted::<valet_core::grant::ValRead>::for_operator(&ada.id),
            &val.id,
        )
        .expect("val");
    assert_eq!(
        (val.scopes, val.timeout_ms),
        (ScopeSet::default_val(), 5000)
    );
    // Bob's own page lists none of Ada's tokens.
    let page = c
        .get(format!("{}/settings/tokens", server.url))
        .header("cookie", &bob)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("html");
    assert!(!page.contains("adas"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_rate_limited_and_say_nothing_about_users() {
    let server = Server::start().await;
    user_with_password(&server, "ada");
    let c = client();
    let attempt = |user: &'static str, password: &'static str| {
        let c = c.clone();
        let url = server.url.clone();
        async move {
            let form = c.get(format!("{url}/login")).send().await.expect("form");
            let pre = set_cookie(&form, "valet_login_csrf").expect("cookie");
            let csrf = hidden(&form.text().await.expect("html"), "csrf");
            let r = c
                .post(format!("{url}/login"))
                .header("cookie", &pre)
                .form(&[("username", user), ("password", password), ("csrf", &csrf)])
                .send()
                .await
                .expect("post");
            let status = r.status();
            (status, r.text().await.expect("html"))
        }
    };
    let (status, unknown) = attempt("nobody", "whatever").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, wrong) = attempt("ada", "wrong password").await;
    assert!(
        unknown.contains("Wrong username or password")
            && wrong.contains("Wrong username or password")
    );
    for _ in 0..4 {
        attempt("ada", "wrong password").await;
    }
    let (status, text) = attempt("ada", "a good password").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits out the window"
    );
    assert!(text.contains("Too many failed attempts"));
    // A login form posted without its CSRF cookie is refused.
    let r = c
        .post(format!("{}/login", server.url))
        .form(&[
            ("username", "ada"),
            ("password", "a good password"),
            ("csrf", "x"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    server.stop().await;
}
