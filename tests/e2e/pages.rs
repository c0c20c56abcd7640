//! The pages over HTTP: sign-in walls, CSRF, other users' objects, the
//! login limiter. The browser itself is driven in tests/browser/.

use reqwest::redirect::Policy;
use valet_core::{Granted, GrantedSet, ScopeSet, TokenScopes};

use crate::support::{Http, Requests, Server};

/// The server's pages, seen by a client that does not follow redirects.
fn pages(server: &Server) -> Http {
    Http {
        url: server.url.clone(),
        client: reqwest::Client::builder()
            .redirect(Policy::none())
            .build()
            .expect("client"),
    }
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .map(|i| i + marker.len())
        .expect("hidden field");
    html[start..start + html[start..].find('"').expect("end")].to_owned()
}

/// The sign-in form's CSRF cookie and hidden field.
async fn login_form(c: &Http) -> (String, String) {
    let form = c.get("/login").send().await;
    let cookie = form.cookie("valet_login_csrf").expect("login csrf cookie");
    (cookie, hidden(&form.text(), "csrf"))
}

/// Signs in; returns the session cookie and the page's CSRF token.
async fn sign_in(server: &Server, user: &str, password: &str) -> (String, String) {
    let c = pages(server);
    let (pre, csrf) = login_form(&c).await;
    let r = c
        .post("/login")
        .header("cookie", &pre)
        .form(&[
            ("username", user),
            ("password", password),
            ("csrf", &csrf),
            ("next", "/settings/tokens"),
        ])
        .send()
        .await;
    assert_eq!(r.status, 303, "sign-in redirects");
    let session = r.cookie("valet_session").expect("session cookie");
    let cookie_header = r
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        cookie_header.contains("HttpOnly") && cookie_header.contains("SameSite=Strict"),
        "{cookie_header}"
    );
    let page = c
        .get("/settings/tokens")
        .header("cookie", &session)
        .send()
        .await;
    assert_eq!(page.status, 200);
    (session, hidden(&page.text(), "csrf"))
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
    let c = pages(&server);
    for path in ["/settings/tokens", "/vals", "/vals/anything/settings"] {
        let r = c.get(path).send().await;
        assert_eq!(r.status, 303, "{path}");
        assert!(
            r.headers["location"]
                .to_str()
                .expect("loc")
                .starts_with("/login?next="),
            "{path}"
        );
    }
    let r = c
        .post("/settings/tokens")
        .form(&[("name", "x")])
        .send()
        .await;
    assert_eq!(r.status, 303, "a form without a session goes to sign-in");
    // A forged cookie is no session.
    let r = c
        .get("/settings/tokens")
        .header("cookie", "valet_session=abc.def")
        .send()
        .await;
    assert_eq!(r.status, 303);

    let (session, csrf) = sign_in(&server, "ada", "a good password").await;
    let create = |csrf: &str| {
        c.post("/settings/tokens")
            .header("cookie", &session)
            .form(&[
                ("csrf", csrf),
                ("name", "from-form"),
                ("expiry", "never"),
                ("scope_blob", "read"),
            ])
            .send()
    };
    assert_eq!(create("").await.status, 403);
    assert_eq!(create("wrong").await.status, 403);
    assert!(
        server
            .store
            .list_tokens(&Granted::for_operator(&ada.id))
            .expect("list")
            .is_empty(),
        "refused forms created nothing"
    );
    let ok = create(&csrf).await;
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("vlt_"));
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
        .post("/logout")
        .header("cookie", &session)
        .form(&[("csrf", &csrf)])
        .send()
        .await;
    assert_eq!(r.status, 303);
    let r = c
        .get("/settings/tokens")
        .header("cookie", &session)
        .send()
        .await;
    assert_eq!(r.status, 303, "the old cookie no longer works");
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
    let c = pages(&server);
    for path in [
        "/vals/private/settings".to_owned(),
        format!("/vals/{}/settings", val.id),
    ] {
        let r = c.get(&path).header("cookie", &bob).send().await;
        assert_eq!(r.status, 404, "{path}");
        assert!(!r.text().contains("hunter22"));
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
            .post(&path)
            .header("cookie", &bob)
            .form(&form)
            .send()
            .await;
        assert_eq!(r.status, 404, "{path}");
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
        .get("/settings/tokens")
        .header("cookie", &bob)
        .send()
        .await;
    assert!(!page.text().contains("adas"));
    server.stop().await;
}

/// Issue #11, item 8: "a revoked token cannot be changed" is the store's
/// rule, so the pages' "accept the safe defaults" (which once skipped the
/// check) and the scope form refuse a revoked token, and say why.
#[tokio::test(flavor = "multi_thread")]
async fn the_pages_cannot_change_a_revoked_token() {
    let server = Server::start().await;
    let ada = user_with_password(&server, "ada");
    let (legacy, _) = server
        .store
        .create_token(
            &Granted::for_operator(&ada.id),
            "old",
            TokenScopes::Legacy,
            None,
        )
        .expect("token");
    server
        .store
        .revoke_token(&Granted::for_operator(&ada.id), &legacy.id, "by its owner")
        .expect("revoke");
    let (session, csrf) = sign_in(&server, "ada", "a good password").await;
    let c = pages(&server);
    let posts = [
        (
            format!("/settings/tokens/{}/accept-defaults", legacy.id),
            vec![],
        ),
        (
            format!("/settings/tokens/{}/scopes", legacy.id),
            vec![("scope_blob", "read")],
        ),
    ];
    for (path, mut form) in posts {
        form.push(("csrf", &csrf));
        let r = c
            .post(&path)
            .header("cookie", &session)
            .form(&form)
            .send()
            .await;
        assert_eq!(r.status, 422, "{path}");
        assert!(
            r.text().contains("a revoked token cannot be changed"),
            "{path}: {}",
            r.text()
        );
    }
    let token = server
        .store
        .token_of_user(
            &Granted::<valet_core::grant::UserRead>::for_operator(&ada.id),
            &legacy.id,
        )
        .expect("token");
    assert_eq!(token.scopes, TokenScopes::Legacy, "nothing was changed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_rate_limited_and_say_nothing_about_users() {
    let server = Server::start().await;
    user_with_password(&server, "ada");
    let c = pages(&server);
    let attempt = |user: &'static str, password: &'static str| {
        let c = &c;
        async move {
            let (pre, csrf) = login_form(c).await;
            let r = c
                .post("/login")
                .header("cookie", &pre)
                .form(&[("username", user), ("password", password), ("csrf", &csrf)])
                .send()
                .await;
            (r.status, r.text())
        }
    };
    let (status, unknown) = attempt("nobody", "whatever").await;
    assert_eq!(status, 401);
    let (_, wrong) = attempt("ada", "wrong password").await;
    assert!(
        unknown.contains("Wrong username or password")
            && wrong.contains("Wrong username or password")
    );
    for _ in 0..4 {
        attempt("ada", "wrong password").await;
    }
    let (status, text) = attempt("ada", "a good password").await;
    assert_eq!(status, 429, "even the right password waits out the window");
    assert!(text.contains("Too many failed attempts"));
    // A login form posted without its CSRF cookie is refused.
    let r = c
        .post("/login")
        .form(&[
            ("username", "ada"),
            ("password", "a good password"),
            ("csrf", "x"),
        ])
        .send()
        .await;
    assert_eq!(r.status, 403);
    server.stop().await;
}
