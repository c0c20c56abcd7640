//! The sandbox as an attacker meets it: each finding of the outside attack
//! on the old launch path (issue 12) and the trust boundary (issue 13) is a
//! test here, run against real Deno processes.

use std::time::Duration;

use valet_core::ScopeSet;
use valet_runtime::RunSpec;
use valet_store::{Outcome, ValKind};

use crate::runs::{spec, store_val};
use crate::support::{Options, Server};

/// Builds a shared library whose constructor writes a marker file.
fn evil_library(dir: &std::path::Path, marker: &std::path::Path) -> std::path::PathBuf {
    let source = dir.join("evil.c");
    std::fs::write(
        &source,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void pwn(void) {{\n  FILE *f = fopen(\"{}\", \"w\"); if (f) {{ fputs(\"PWNED\", f); fclose(f); }}\n  fputs(\"PWNED-CONSTRUCTOR\\n\", stderr);\n}}\n",
            marker.display()
        ),
    )
    .unwrap();
    let library = dir.join("evil.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("cc (build-essential) builds the test library");
    assert!(status.success());
    // Readable by anyone, as a blob file would be to a run's uid.
    let parent_mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(dir, parent_mode).unwrap();
    library
}

#[tokio::test]
async fn a_vals_env_never_reaches_the_process_environment() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("marker");
    let library = evil_library(scratch.path(), &marker);
    let mut val = store_val(
        &server,
        &ada,
        "preload",
        ValKind::Script,
        r#"console.log("env", JSON.stringify(Deno.env.toObject()));"#,
        ScopeSet::default_val(),
    );
    for (name, value) in [
        ("LD_PRELOAD", library.display().to_string()),
        ("LD_LIBRARY_PATH", scratch.path().display().to_string()),
        ("NODE_OPTIONS", "--require /etc/passwd".to_owned()),
    ] {
        val.env.insert(name.into(), value);
    }
    let out = server
        .supervisor()
        .run(RunSpec::for_val(&val, "test"))
        .await
        .unwrap();
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(!marker.exists(), "the library was loaded into the run");
    assert!(!out.logs.contains("PWNED"), "{}", out.logs);
    // The val still sees its variables in its frozen view.
    assert!(out.logs.contains(r#""LD_PRELOAD":"#), "{}", out.logs);
    server.stop().await;
}

const FILE_IMPORTS: &[(&str, &str)] = &[
    (
        "static text",
        r#"import t from "file:///etc/passwd" with { type: "text" }; console.log(t);"#,
    ),
    (
        "static json",
        r#"import t from "file:///etc/os-release" with { type: "text" }; console.log(t);"#,
    ),
    (
        "literal dynamic",
        r#"const t = await import("file:///etc/passwd", { with: { type: "text" } }); console.log(t.default);"#,
    ),
    ("plain module", r#"import "file:///etc/shadow";"#),
];

#[tokio::test]
async fn static_and_literal_file_imports_need_a_read_permission_cold_and_warm() {
    for warm_pool in [0, 2] {
        let server = Server::start_with(Options {
            warm_pool,
            ..Default::default()
        })
        .await;
        let ada = server.user("ada");
        for (what, code) in FILE_IMPORTS {
            let out = server
                .supervisor()
                .run(spec(&ada, code, ScopeSet::default_val(), 10_000))
                .await
                .unwrap();
            assert_eq!(
                out.outcome,
                Outcome::Failed,
                "{what} (warm {warm_pool}): {}",
                out.logs
            );
            assert!(
                !out.logs.contains("root:") && !out.logs.contains("PRETTY_NAME"),
                "{what} (warm {warm_pool}) read the file: {}",
                out.logs
            );
        }
        // The data dir's database, named literally.
        let db = server.data_dir().join("valet.db");
        let code = format!(
            r#"const t = await import("file://{}", {{ with: {{ type: "text" }} }}); console.log(t.default.length);"#,
            db.display()
        );
        let out = server
            .supervisor()
            .run(spec(&ada, &code, ScopeSet::default_val(), 10_000))
            .await
            .unwrap();
        assert_eq!(out.outcome, Outcome::Failed, "{}", out.logs);
        server.stop().await;
    }
}

#[tokio::test]
async fn the_os_layer_holds_without_deno() {
    let server = Server::start().await;
    let layer = server.supervisor().os_layer();
    assert!(
        layer.landlock_abi.is_some() || layer.uid.is_some(),
        "no OS layer on this machine: {layer}"
    );
    // A directory of another run, with a secret in it.
    let other = server.supervisor().run_root().join("another-run");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret"), "s3cret").unwrap();
    let db = server.data_dir().join("valet.db");
    let environ = format!("/proc/{}/environ", std::process::id());
    for target in [
        db.display().to_string(),
        other.join("secret").display().to_string(),
        environ,
    ] {
        let out = server
            .supervisor()
            .run_confined(
                std::path::Path::new("/bin/cat"),
                std::slice::from_ref(&target),
            )
            .await
            .unwrap();
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "a confined process read {target}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The same process can read what runs need (so the refusals above are
    // the layer's doing, not a broken probe).
    let out = server
        .supervisor()
        .run_confined(std::path::Path::new("/bin/cat"), &["/etc/hosts".into()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}

#[tokio::test]
async fn memory_outside_the_heap_is_capped_and_ends_oom() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let hog = r#"
const held = [];
for (let i = 0; i < 10; i++) held.push(new Uint8Array(100 * 1024 * 1024).fill(1));
console.log("held a gigabyte");
"#;
    let out = server
        .supervisor()
        .run(spec(&ada, hog, ScopeSet::default_val(), 30_000))
        .await
        .unwrap();
    assert_eq!(out.outcome, Outcome::Oom, "{}", out.logs);
    assert!(!out.logs.contains("held a gigabyte"), "{}", out.logs);
    server.stop().await;
}

#[tokio::test]
async fn printing_out_of_memory_does_not_make_a_run_oom() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let code = r#"console.error("Fatal JavaScript out of memory: Reached heap limit"); console.log("Uncaught error in http handler"); Deno.exit(1);"#;
    let out = server
        .supervisor()
        .run(spec(&ada, code, ScopeSet::default_val(), 10_000))
        .await
        .unwrap();
    assert_eq!(out.outcome, Outcome::Failed, "{}", out.logs);
    server.stop().await;
}

#[tokio::test]
async fn private_ipv6_and_mapped_addresses_are_refused() {
    let server = Server::start().await;
    let ada = server.user("ada");
    // A listener on one of this host's own non-loopback IPv6 addresses,
    // where it has one (a ULA or global address).
    let own = std::fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter_map(|h| u128::from_str_radix(&h, 16).ok())
        .map(std::net::Ipv6Addr::from)
        .find(|a| !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80);
    let listener = own.and_then(|a| std::net::TcpListener::bind((a, 0)).ok());
    let mut urls = vec![
        "http://[::ffff:127.0.0.1]:9/".to_owned(),
        "http://[::ffff:10.0.0.1]:9/".to_owned(),
        "http://[::ffff:169.254.169.254]/".to_owned(),
        "http://[fd12:3456::1]/".to_owned(),
        "http://[fe80::1]/".to_owned(),
        "http://[64:ff9b::a9fe:a9fe]/".to_owned(),
    ];
    if let Some(l) = &listener {
        urls.push(format!("http://{}/", l.local_addr().unwrap()));
    }
    for url in &urls {
        let code = format!(
            r#"try {{ const r = await fetch("{url}", {{ signal: AbortSignal.timeout(3000) }}); console.log("REACHED", r.status); }} catch (e) {{ console.log("refused", String(e)); }}"#
        );
        let out = server
            .supervisor()
            .run(spec(&ada, &code, ScopeSet::default_val(), 10_000))
            .await
            .unwrap();
        assert!(out.logs.contains("refused"), "{url}: {}", out.logs);
        assert!(!out.logs.contains("REACHED"), "{url}: {}", out.logs);
    }
    server.stop().await;
}

/// Deno's internals (deno_core and its raw ops, the exit code, the event
/// loop's state) are out of a val's reach, in a script run and in a hot
/// process alike, and the runtime works without them (timers, fetch,
/// node's async hooks, the std shims).
#[tokio::test]
async fn deno_internals_are_out_of_a_vals_reach() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let probe = r#"
const internal = (Deno as any).internal;
const reach = [
  typeof (Deno as any)[internal],
  typeof (Deno as any)[Symbol.for("Deno.internal")],
  typeof (globalThis as any).__bootstrap,
  typeof (Deno as any).core,
].join(",");
"#;
    let code = format!(
        r#"{probe}
import {{ blob }} from "https://esm.town/v/std/blob";
import {{ AsyncLocalStorage }} from "node:async_hooks";
await new Promise((r) => setTimeout(r, 5));
await blob.set("k", "v");
console.log("REACH", reach, await blob.get("k").then((r) => r?.text()), typeof AsyncLocalStorage);"#
    );
    let out = server
        .supervisor()
        .run(spec(&ada, &code, ScopeSet::default_val(), 10_000))
        .await
        .unwrap();
    assert!(
        out.logs
            .contains("REACH undefined,undefined,undefined,undefined v function"),
        "{}",
        out.logs
    );
    store_val(
        &server,
        &ada,
        "probe",
        ValKind::Http,
        &format!("{probe}\nexport default () => new Response(reach);"),
        ScopeSet::default_val(),
    );
    let r = server
        .client
        .get(format!("{}/ada/probe", server.vals_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        "undefined,undefined,undefined,undefined"
    );
    server.stop().await;
}

/// A val reaching its process's open descriptors through node's
/// `process.binding` finds none of Deno's cache files shared by every run
/// (it could poison them for others' vals, or read what they import), and
/// a val that defines `Object.prototype.toJSON` cannot rewrite what the
/// bootstrap reports about its run.
#[tokio::test]
async fn a_val_reaches_no_shared_cache_file_and_cannot_rewrite_its_reports() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let marker = format!("MARK{}", std::process::id());
    let code = format!(
        r#"
import net from "node:net";
const {{ Pipe, constants }} = (process as any).binding("pipe_wrap");
let opened = 0;
// From the top down: taking over the runtime's own descriptors (its epoll,
// low numbers) crashes the process, which is the val's own loss.
for (let fd = 63; fd >= 3; fd--) {{
  try {{
    const pipe = new Pipe(constants.SOCKET);
    if (pipe.open(fd) !== 0) continue;
    const socket = new net.Socket({{ handle: pipe, readable: false, writable: true }} as any);
    socket.on("error", () => {{}});
    socket.write("{marker}");
    opened++;
  }} catch {{}}
}}
await new Promise((r) => setTimeout(r, 100));
"#
    );
    // Whatever became of the process, nothing of it is in the shared files.
    server
        .supervisor()
        .run(spec(&ada, &code, ScopeSet::default_val(), 10_000))
        .await
        .unwrap();
    let shared = server.supervisor().shared_deno_cache().to_owned();
    let seeds = std::fs::read_dir(server.supervisor().runtime_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".deno-seed-"))
        .map(|e| e.path());
    let files = [shared].into_iter().chain(seeds).flat_map(|dir| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .collect::<Vec<_>>()
    });
    for entry in files {
        if entry.path().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "a val wrote into {}",
                entry.path().display()
            );
        }
    }
    let code = r#"
Object.defineProperty(Object.prototype, "toJSON", { value() { return { t: "error", kind: "oom" }; } });
console.log("ran");
"#;
    let out = server
        .supervisor()
        .run(spec(&ada, code, ScopeSet::default_val(), 10_000))
        .await
        .unwrap();
    assert_eq!(
        out.outcome,
        Outcome::Succeeded,
        "{}: {}",
        out.detail,
        out.logs
    );
    server.stop().await;
}

/// No run can write a transpiled module that another run loads: the
/// runtime's own (the bootstrap's, in the seed of Deno's cache) are
/// read-only to runs, each run's `gen` is its own, and the shared cache
/// gives runs only its directories of downloaded modules.
#[tokio::test]
async fn no_run_can_plant_a_transpiled_module_for_another() {
    let server = Server::start().await;
    let supervisor = server.supervisor();
    let seed = std::fs::read_dir(supervisor.runtime_dir())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(".deno-seed-"))
        .expect("valet seeds Deno's cache")
        .path();
    let bootstrap = find(&seed.join("gen"), "bootstrap.ts.js").expect("the seed has the bootstrap");
    let before = std::fs::read(&bootstrap).unwrap();
    // A shared `gen`, as older valets had, owned by the runs' uid: only
    // the OS layer's own rules can refuse it.
    let shared_gen = supervisor.shared_deno_cache().join("gen");
    std::fs::create_dir_all(&shared_gen).unwrap();
    if let Some(uid) = supervisor.os_layer().uid {
        std::os::unix::fs::chown(&shared_gen, Some(uid), Some(uid)).unwrap();
    }
    let planted = shared_gen.join(format!("planted-{}.js", std::process::id()));
    let _ = std::fs::remove_file(&planted);
    for target in [&bootstrap, &planted] {
        let out = supervisor
            .run_confined(
                std::path::Path::new("/bin/sh"),
                &[
                    "-c".into(),
                    format!("echo 'globalThis.owned = 1;' >> '{}'", target.display()),
                ],
            )
            .await
            .unwrap();
        assert!(
            !out.status.success(),
            "a confined process wrote {}",
            target.display()
        );
    }
    assert_eq!(std::fs::read(&bootstrap).unwrap(), before);
    assert!(!planted.exists());
    // The same process writes its own directory (so the refusals above
    // are the layer's doing, not a broken probe).
    let out = supervisor
        .run_confined(
            std::path::Path::new("/bin/sh"),
            &["-c".into(), "echo ok > ./own".into()],
        )
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And runs load the seed's bootstrap: a val runs as ever.
    let ada = server.user("ada");
    let out = supervisor
        .run(spec(
            &ada,
            "console.log(typeof (globalThis as any).owned)",
            ScopeSet::default_val(),
            10_000,
        ))
        .await
        .unwrap();
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(out.logs.contains("undefined"), "{}", out.logs);
    server.stop().await;
}

/// A val reads no file of its process's own directory but its code: not
/// its cache, whose links lead to modules other users' runs downloaded.
#[tokio::test]
async fn a_val_reads_nothing_of_its_cache_or_others_downloads() {
    let server = Server::start().await;
    let shared = server.supervisor().shared_deno_cache().to_owned();
    let private = shared.join("remote/https/private.example");
    std::fs::create_dir_all(&private).unwrap();
    let secret = format!("sk_live_{}", std::process::id());
    std::fs::write(private.join("abc123"), format!("const TOKEN = '{secret}';")).unwrap();
    let ada = server.user("ada");
    // The bootstrap's configuration names the process's directory.
    let code = r#"
const dir = JSON.parse(Deno.args[0]).control.replace(/\/control\.sock$/, "");
for (const path of [`${dir}/deno/remote/https/private.example/abc123`, `${dir}/deno/remote`, `${dir}/deno`, dir]) {
  try {
    const text = Deno.statSync(path).isDirectory
      ? [...Deno.readDirSync(path)].map((e) => e.name).join(",")
      : Deno.readTextFileSync(path);
    console.log("READ", path, text);
  } catch (e) {
    console.log("REFUSED", path, (e as Error).name);
  }
}
"#;
    let out = server
        .supervisor()
        .run(spec(&ada, code, ScopeSet::default_val(), 10_000))
        .await
        .unwrap();
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(!out.logs.contains(&secret), "{}", out.logs);
    assert!(!out.logs.contains("READ"), "{}", out.logs);
    assert_eq!(out.logs.matches("REFUSED").count(), 4, "{}", out.logs);
    let _ = std::fs::remove_dir_all(&private);
    server.stop().await;
}

fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_file() && entry.file_name() == name {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find(&path, name)
        {
            return Some(found);
        }
    }
    None
}

#[tokio::test]
async fn one_users_flood_never_holds_another_users_runs() {
    let server = Server::start_with(Options {
        slots: Some(valet_runtime::SlotLimits {
            total: 8,
            per_user: 3,
            per_val: 3,
            queue: 2,
            wait: Duration::from_secs(2),
        }),
        ..Default::default()
    })
    .await;
    let mallory = server.user("mallory");
    let ada = server.user("ada");
    store_val(
        &server,
        &mallory,
        "slow",
        ValKind::Http,
        "export default async () => { await new Promise(r => setTimeout(r, 8000)); return new Response('late'); }",
        ScopeSet::default_val(),
    );
    // Twelve anonymous requests: three run, two queue, the rest are refused
    // at once with 503 and Retry-After.
    let url = format!("{}/mallory/slow", server.vals_url);
    let (refused_tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let (c, url, tx) = (server.client.clone(), url.clone(), refused_tx.clone());
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                let answer = (r.status().as_u16(), r.headers().contains_key("retry-after"));
                let _ = tx.send(answer);
            })
        })
        .collect();
    // The first answer is a refusal: the flood has every slot it may have.
    let first = tokio::time::timeout(Duration::from_secs(60), refused.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, (503, true));
    // Ada's script still runs while mallory's requests hold their slots.
    let out = server
        .supervisor()
        .run(spec(
            &ada,
            "console.log('ada ran')",
            ScopeSet::default_val(),
            10_000,
        ))
        .await
        .unwrap();
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(
        flood.iter().any(|f| !f.is_finished()),
        "the flood should still be holding its slots while ada's run ended"
    );
    for f in flood {
        f.abort();
    }
    server.stop().await;
}

#[tokio::test]
async fn a_run_key_works_only_from_inside_its_run() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let code = r#"
import { blob } from "https://esm.town/v/std/blob";
const key = Deno.env.get("valtown");
await blob.set("leak", key);
// Our own calls, by hand and through the std shims, work.
const me = await fetch(`${Deno.env.get("VALTOWN_API_URL")}/v1/me`, { headers: { Authorization: `Bearer ${key}` } });
console.log("own call", me.status);
const login = await fetch(`${Deno.env.get("VALTOWN_API_URL")}/login`, { method: "POST", body: "username=ada&password=wrong" });
console.log("login through the channel", login.status);
const pages = await fetch(`${Deno.env.get("VALTOWN_API_URL")}/settings/tokens`);
console.log("pages through the channel", pages.status);
await new Promise(r => setTimeout(r, 4000));
console.log("still", (await blob.get("leak"))?.status);
"#;
    let supervisor = server.supervisor().clone();
    let run = {
        let ada = ada.clone();
        tokio::spawn(async move {
            supervisor
                .run(spec(&ada, code, ScopeSet::default_val(), 20_000))
                .await
                .unwrap()
        })
    };
    let reader = server.token(&ada, ScopeSet::all());
    let key = crate::support::eventually(
        || async {
            let r = server
                .client
                .get(format!("{}/v1/blob/leak", server.url))
                .bearer_auth(&reader)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                r.text().await.unwrap()
            } else {
                String::new()
            }
        },
        |k| !k.is_empty(),
    )
    .await;
    assert!(key.starts_with("eyJ"), "the val wrote its key: {key}");
    // Replayed from outside while the run still sleeps: refused.
    let r = server
        .client
        .get(format!("{}/v1/me", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let (status, code, _) = crate::support::error_code(r).await;
    assert_eq!((status, code.as_str()), (401, "run_key_elsewhere"));
    let out = run.await.unwrap();
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(out.logs.contains("own call 200"), "{}", out.logs);
    assert!(
        out.logs.contains("login through the channel 404"),
        "{}",
        out.logs
    );
    assert!(
        out.logs.contains("pages through the channel 404"),
        "{}",
        out.logs
    );
    assert!(out.logs.contains("still 200"), "{}", out.logs);
    server.stop().await;
}

#[tokio::test]
async fn http_vals_have_their_own_origin_and_never_see_valets_credentials() {
    let server = Server::start().await;
    let ada = server.user("ada");
    store_val(
        &server,
        &ada,
        "echo",
        ValKind::Http,
        r#"export default (req: Request) => Response.json({
  url: new URL(req.url).pathname + new URL(req.url).search,
  cookie: req.headers.get("cookie"),
  auth: req.headers.get("authorization"),
});"#,
        ScopeSet::default_val(),
    );
    let token = server.token(&ada, ScopeSet::all());
    let r = server
        .client
        .get(format!("{}/ada/echo/a%2Fb/c%20d?x=%41&y", server.vals_url))
        .header("cookie", "valet_session=abc.def; theirs=1")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["url"], "/a%2Fb/c%20d?x=%41&y", "byte for byte");
    assert_eq!(body["cookie"], "theirs=1");
    assert_eq!(body["auth"], serde_json::Value::Null);
    // The val's own Authorization scheme passes.
    let r = server
        .client
        .get(format!("{}/ada/echo", server.vals_url))
        .basic_auth("visitor", Some("pw"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["auth"].as_str().unwrap_or("").starts_with("Basic "));
    // The pages' origin serves no val content, and the vals origin no pages.
    let r = server
        .client
        .get(format!("{}/x/ada/echo", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = server
        .client
        .get(format!("{}/settings/tokens", server.vals_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn run_directories_are_removed_and_names_never_collide() {
    let server = Server::start_with(Options {
        warm_pool: 4,
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let root = server.supervisor().run_root().to_owned();
    let ready =
        crate::support::eventually(|| async { server.supervisor().warm_ready() }, |n| *n == 4)
            .await;
    assert_eq!(ready, 4, "the warm pool filled");
    for _ in 0..6 {
        let out = server
            .supervisor()
            .run(spec(
                &ada,
                "console.log(1)",
                ScopeSet::default_val(),
                10_000,
            ))
            .await
            .unwrap();
        assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    }
    server.stop().await;
    assert!(!root.exists(), "the run root outlived its supervisor");
}

/// A run outlives the thread that started it: the parent-death signal of
/// a run process fires when the *thread* that forked it exits, and the
/// blocking pool's idle threads exit after a keep-alive (10 s by default,
/// 100 ms here). Runs used to be killed by signal 9 that way.
#[test]
fn runs_outlive_the_thread_that_started_them() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(Duration::from_millis(100))
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = Server::start_with(Options {
            warm_pool: 1,
            ..Default::default()
        })
        .await;
        let ada = server.user("ada");
        let code = "await new Promise((r) => setTimeout(r, 1500)); console.log('woke');";
        for _ in 0..2 {
            let out = server
                .supervisor()
                .run(spec(&ada, code, ScopeSet::default_val(), 20_000))
                .await
                .unwrap();
            assert_eq!(
                out.outcome,
                Outcome::Succeeded,
                "{}: {}",
                out.detail,
                out.logs
            );
            assert!(out.logs.contains("woke"));
        }
        server.stop().await;
    });
}
