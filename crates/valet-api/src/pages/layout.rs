//! The page shell: readable on a phone, no third-party assets. The style
//! sheet and the little script are served from valet itself
//! (`/assets/...`), so the pages' CSP allows no inline style or script.

use maud::{DOCTYPE, Markup, html};
use valet_store::User;

/// The pages' style sheet, served at [`CSS_PATH`].
pub const CSS: &str = r#"
*{box-sizing:border-box}body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:.6rem 1rem;display:flex;gap:1rem;align-items:center;flex-wrap:wrap}
header a{color:#fff}header form{margin-left:auto}main{max-width:64rem;margin:0 auto;padding:1rem}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:1rem;margin:1rem 0}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:0}table{border-collapse:collapse;width:100%}
.scroll{overflow-x:auto}th,td{text-align:left;padding:.4rem;border-bottom:1px solid #eee;vertical-align:top}
.chip{display:inline-block;border-radius:1rem;padding:0 .5rem;margin:.1rem;font-size:.85rem;background:#e8eefc}
.chip.write{background:#fde8c8}.risky{color:#a33;font-weight:600}.muted{color:#667}
.status-active{color:#176f2c}.status-revoked,.status-expired{color:#a33}
fieldset{border:1px solid #dde1e6;border-radius:6px;margin:.4rem 0}legend{font-weight:600}
label{margin-right:.8rem;white-space:nowrap}input[type=text],input[type=password],input[type=number],input[type=date],select{font:inherit;padding:.3rem;max-width:100%}
button{font:inherit;padding:.35rem .8rem;border-radius:6px;border:1px solid #8894a8;background:#fff;cursor:pointer}
button.primary{background:#2456d6;color:#fff;border-color:#2456d6}button.danger{color:#a33;border-color:#a33}
.secret{font-family:monospace;background:#fffbe6;border:1px solid #e6c200;padding:.6rem;word-break:break-all}
.notice{background:#fffbe6;border:1px solid #e6c200;border-radius:6px;padding:.6rem}.grid{display:grid;gap:.5rem}
pre{white-space:pre-wrap;background:#f3f4f6;padding:.5rem;font-size:.85rem;max-height:20rem;overflow:auto}
.narrow{max-width:24rem;margin:2rem auto}.inline{display:inline}
"#;

/// Progressive enhancement only: "copy" and "are you sure?". Every page
/// works without it.
pub const JS: &str = r#"// valet pages: copy buttons and confirmations, wired by data attributes.
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  navigator.clipboard.writeText(source.textContent).then(() => { button.textContent = "Copied"; });
});
document.addEventListener("submit", (event) => {
  const message = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (message && !confirm(message)) event.preventDefault();
});
"#;

pub const CSS_PATH: &str = "/assets/valet.css";
pub const JS_PATH: &str = "/assets/valet.js";

pub fn page(title: &str, user: Option<(&User, &str)>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · valet" }
                link rel="stylesheet" href=(CSS_PATH);
                script src=(JS_PATH) defer {}
            }
            body {
                header {
                    strong { "valet" }
                    @if let Some((user, csrf)) = user {
                        a href="/settings/tokens" { "API tokens" }
                        a href="/vals" { "Vals" }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            span.muted { (user.username) " " }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn time(ms: Option<i64>) -> String {
    match ms {
        Some(ms) => valet_store::time::iso(ms)
            .replace('T', " ")
            .trim_end_matches(".000Z")
            .trim_end_matches('Z')
            .chars()
            .take(16)
            .collect(),
        None => "never".into(),
    }
}
