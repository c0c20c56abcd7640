// The official Val Town SDK (@valtown/sdk 2.1.0, unchanged, from npm)
// against a real `valet serve`: every call for me, blobs, sqlite, emails and
// vals, checking the values it answers and the error classes it throws.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import ValTown, {
  AuthenticationError,
  BadRequestError,
  ConflictError,
  NotFoundError,
  PermissionDeniedError,
  UnprocessableEntityError,
} from "@valtown/sdk";
import { dataDir, serve } from "./valet.mjs";

const ALL = "val:read val:write user:read user:write blob:read blob:write sqlite:read sqlite:write email:read email:write";
const PASSWORD = "a long password for the pages";
const data = dataDir("valet-sdk-");
let server, base, token, client, reader, blobOnly, stranger, bob;

const sdk = (bearerToken, options = {}) => new ValTown({ bearerToken, baseURL: base, ...options });
const get = async (path, bearer = token) =>
  await (await fetch(base + path, { headers: { Authorization: `Bearer ${bearer}` } })).json();

/** Asserts that `promise` rejects with the SDK's `Class`, and answers the
 * JSON error body valet sent. */
async function refused(promise, Class, status) {
  let error;
  await assert.rejects(promise, (e) => {
    error = e;
    return e instanceof Class && e.status === status;
  });
  return error.error?.error;
}

before(async () => {
  data.cli(["user", "create", "ada", "--email", "ada@example.com", "--tier", "pro", "--password-stdin"], {
    input: `${PASSWORD}\n`,
  });
  data.cli(["user", "create", "bob", "--email", "bob@example.com"]);
  const mint = (user, name, scopes) => data.cli(["token", "create", "--user", user, "--name", name, "--scopes", scopes]);
  token = mint("ada", "sdk", ALL);
  const readOnly = mint("ada", "reader", "val:read user:read blob:read sqlite:read email:read");
  const blobRead = mint("ada", "blob-reader", "blob:read");
  const bobToken = mint("bob", "bob", ALL);
  server = await serve(data.dir);
  base = server.base;
  client = sdk(token);
  reader = sdk(readOnly);
  blobOnly = sdk(blobRead);
  bob = sdk(bobToken);
  // A well-formed token that does not exist; no retries to wait through.
  stranger = sdk("vlt_" + "0".repeat(38), { maxRetries: 0 });
});

after(async () => {
  await server?.stop();
  data.remove();
});

test("me.profile.retrieve answers the hosted profile shape", async () => {
  const me = await client.me.profile.retrieve();
  assert.equal(me.username, "ada");
  assert.equal(me.email, "ada@example.com");
  assert.equal(me.tier, "pro");
  assert.equal(me.type, "user");
  assert.equal(me.bio, null);
  assert.equal(me.profileImageUrl, null);
  assert.match(me.id, /^\S+$/);
  assert.equal(me.url, `${base}/vals`);
  assert.equal(me.links.self, `${base}/v1/me`);
  assert.deepEqual(await get(new URL(me.links.self).pathname), me, "the self link answers the same profile");
});

test("me without user:read is PermissionDeniedError; an unknown token AuthenticationError", async () => {
  const body = await refused(blobOnly.me.profile.retrieve(), PermissionDeniedError, 403);
  assert.equal(body.code, "missing_scope");
  assert.equal(body.required, "user:read");
  assert.equal((await refused(stranger.me.profile.retrieve(), AuthenticationError, 401)).code, "invalid_token");
});

test("blobs: store text and bytes, get, list by prefix, delete", async () => {
  await client.blobs.store("notes/today", "hello");
  // A Uint8Array, not a small Buffer: SDK 2.1.0 sends a pooled Buffer's
  // whole 8 KiB backing store (docs/COMPATIBILITY.md).
  await client.blobs.store("notes/bytes", new Uint8Array([0, 1, 2, 255]));
  await client.blobs.store("elsewhere", "x");
  assert.equal(await (await client.blobs.get("notes/today")).text(), "hello");
  const bytes = Buffer.from(await (await client.blobs.get("notes/bytes")).arrayBuffer());
  assert.deepEqual([...bytes], [0, 1, 2, 255]);

  const notes = await client.blobs.list({ prefix: "notes/" });
  assert.deepEqual(notes.map((b) => [b.key, b.size]), [["notes/bytes", 4], ["notes/today", 5]]);
  for (const b of notes) assert.match(b.lastModified, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.ok((await client.blobs.list()).some((b) => b.key === "elsewhere"), "list() with no prefix lists all");

  await client.blobs.delete("notes/today");
  assert.deepEqual((await client.blobs.list({ prefix: "notes/" })).map((b) => b.key), ["notes/bytes"]);
  await client.blobs.delete("notes/today"); // deleting a missing blob is not an error
});

test("blobs: keys with spaces, unicode and slashes round-trip", async () => {
  const key = "dir/a key ü/✓";
  await client.blobs.store(key, "odd key");
  assert.equal(await (await client.blobs.get(key)).text(), "odd key");
  assert.ok((await client.blobs.list({ prefix: "dir/" })).some((b) => b.key === key));
});

test("blobs: a missing blob is NotFoundError; a write without blob:write PermissionDeniedError", async () => {
  assert.equal((await refused(client.blobs.get("never-stored"), NotFoundError, 404)).code, "not_found");
  const body = await refused(reader.blobs.store("k", "v"), PermissionDeniedError, 403);
  assert.equal(body.required, "blob:write");
  assert.equal((await refused(stranger.blobs.list(), AuthenticationError, 401)).code, "invalid_token");
});

test("sqlite: execute and batch answer ResultSets", async () => {
  const created = await client.sqlite.execute({ statement: "CREATE TABLE books (title TEXT, year INTEGER)" });
  assert.deepEqual([created.columns, created.rows, created.rowsAffected], [[], [], 0]);
  const results = await client.sqlite.batch({
    statements: [
      { sql: "INSERT INTO books VALUES (?, ?)", args: ["Dune", 1965] },
      { sql: "INSERT INTO books VALUES (:title, :year)", args: { title: "Emma", year: 1815 } },
      "SELECT title, year FROM books ORDER BY year",
    ],
    mode: "write",
  });
  assert.equal(results.length, 3);
  assert.deepEqual([results[0].rowsAffected, results[0].lastInsertRowid], [1, 1]);
  assert.deepEqual([results[1].rowsAffected, results[1].lastInsertRowid], [1, 2]);
  assert.deepEqual(results[2].columns, ["title", "year"]);
  assert.deepEqual(results[2].columnTypes, ["TEXT", "INTEGER"]);
  assert.deepEqual(results[2].rows, [["Emma", 1815], ["Dune", 1965]]);
  const count = await client.sqlite.execute({
    statement: { sql: "SELECT count(*) AS n FROM books WHERE year > ?", args: [1900] },
  });
  assert.deepEqual([count.columns, count.rows], [["n"], [[1]]]);
  assert.deepEqual((await reader.sqlite.execute({ statement: "SELECT title FROM books WHERE year < 1900" })).rows, [["Emma"]]);
});

test("sqlite: SQL SQLite refuses is BadRequestError; a write without sqlite:write PermissionDeniedError", async () => {
  const syntax = await refused(client.sqlite.execute({ statement: "SELEC 1" }), BadRequestError, 400);
  assert.equal(syntax.code, "sqlite_error");
  assert.match(syntax.message, /near "SELEC": syntax error/);
  const readMode = await refused(
    client.sqlite.batch({ statements: ["INSERT INTO books VALUES ('x', 1)"], mode: "read" }),
    BadRequestError,
    400,
  );
  assert.match(readMode.message, /read mode/);
  const body = await refused(reader.sqlite.execute({ statement: "DELETE FROM books" }), PermissionDeniedError, 403);
  assert.equal(body.required, "sqlite:write");
  assert.equal((await client.sqlite.execute({ statement: "SELECT count(*) FROM books" })).rows[0][0], 2, "nothing was deleted");
});

test("emails.send is accepted as on the hosted API and lands in the outbox", async () => {
  const answer = await client.emails.send({
    to: "ada@example.com",
    cc: [{ email: "cc@example.com", name: "Cee" }],
    replyToList: [{ email: "reply@example.com" }],
    subject: "From the SDK",
    text: "hello",
    html: "<p>hello</p>",
    headers: { "X-Sent-By": "sdk" },
  });
  assert.equal(answer.message, "Email accepted to be sent");
  const sent = (await get("/v1/email")).find((e) => e.message.subject === "From the SDK");
  assert.ok(sent, "the email is in the outbox");
  assert.deepEqual(sent.message.to, ["ada@example.com"]);
  assert.deepEqual(sent.message.cc, ['"Cee" <cc@example.com>']);
  assert.deepEqual(sent.message.replyTo, ["reply@example.com"]);
  assert.equal(sent.message.headers["X-Sent-By"], "sdk");
});

test("emails.send with no subject or recipient gets the hosted defaults", async () => {
  await client.emails.send({ text: "no subject given" });
  const sent = (await get("/v1/email")).find((e) => e.message.text === "no subject given");
  assert.deepEqual(sent.message.to, ["ada@example.com"]);
  assert.equal(sent.message.subject, "Message from @ada on Val Town");
});

test("emails.send without email:write is PermissionDeniedError", async () => {
  const body = await refused(reader.emails.send({ text: "x" }), PermissionDeniedError, 403);
  assert.equal(body.required, "email:write");
});

test("vals: create, retrieve, list through every page, me.vals, delete", async () => {
  const me = await client.me.profile.retrieve();
  const made = [];
  for (const name of ["alpha", "beta", "gamma"]) {
    made.push(await client.vals.create({ name, privacy: "private", description: "made by the SDK" }));
  }
  const [alpha] = made;
  assert.equal(alpha.name, "alpha");
  assert.equal(alpha.privacy, "private");
  assert.deepEqual(alpha.author, { type: "user", id: me.id, username: "ada" });
  assert.equal(alpha.description, null, "valet keeps no descriptions");
  assert.equal(alpha.imageUrl, null);
  assert.match(alpha.createdAt, /^\d{4}-\d\d-\d\dT.*Z$/);
  assert.equal(alpha.links.self, `${base}/v2/vals/${alpha.id}`);
  assert.equal(alpha.links.html, `${base}/vals/alpha/settings`);
  assert.deepEqual(await client.vals.retrieve(alpha.id), alpha);

  // One val a page: the SDK follows links.next through all of them.
  const listed = [];
  for await (const val of client.vals.list({ limit: 1 })) listed.push(val.name);
  assert.deepEqual(listed, ["alpha", "beta", "gamma"]);
  const firstPage = await client.vals.list({ limit: 2 });
  assert.deepEqual(firstPage.data.map((v) => v.name), ["alpha", "beta"]);
  assert.ok(firstPage.hasNextPage());
  assert.deepEqual((await firstPage.getNextPage()).data.map((v) => v.name), ["gamma"]);

  const mine = [];
  for await (const val of client.me.vals.list({ limit: 2, offset: 0 })) mine.push(val.name);
  assert.deepEqual(mine, ["alpha", "beta", "gamma"]);
  assert.deepEqual((await client.me.vals.list({ limit: 2, offset: 2 })).data.map((v) => v.name), ["gamma"]);

  // Filters for what valet does not have find nothing.
  assert.deepEqual((await client.vals.list({ limit: 10, privacy: "public" })).data, []);
  assert.deepEqual((await client.vals.list({ limit: 10, user_id: "someone-else" })).data, []);
  assert.equal((await client.vals.list({ limit: 10, user_id: me.id })).data.length, 3);

  await client.vals.delete(alpha.id);
  await refused(client.vals.retrieve(alpha.id), NotFoundError, 404);
  await refused(client.vals.delete(alpha.id), NotFoundError, 404);
  assert.deepEqual((await client.vals.list({ limit: 10 })).data.map((v) => v.name), ["beta", "gamma"]);
});

test("vals: a taken name, an org, a bad name, a missing scope, another user's val", async () => {
  const taken = client.vals.create({ name: "beta", privacy: "public" }, { maxRetries: 0 });
  assert.equal((await refused(taken, ConflictError, 409)).code, "conflict");
  const org = client.vals.create({ name: "orgval", privacy: "private", orgId: "00000000-0000-0000-0000-000000000000" });
  assert.match((await refused(org, UnprocessableEntityError, 422)).message, /organizations/);
  await refused(client.vals.create({ name: "1-starts-with-a-digit", privacy: "private" }), UnprocessableEntityError, 422);
  const body = await refused(reader.vals.create({ name: "nope", privacy: "private" }), PermissionDeniedError, 403);
  assert.equal(body.required, "val:write");
  await refused(client.vals.list({ limit: 0 }), BadRequestError, 400);

  const beta = (await client.vals.list({ limit: 10 })).data.find((v) => v.name === "beta");
  await refused(bob.vals.retrieve(beta.id), NotFoundError, 404);
  await refused(bob.vals.delete(beta.id), NotFoundError, 404);
  assert.deepEqual((await bob.vals.list({ limit: 10 })).data, []);
  assert.equal((await client.vals.retrieve(beta.id)).name, "beta", "bob's delete changed nothing");
});

test("a val created through the SDK is a real valet val: given code, it runs", async () => {
  const val = await client.vals.create({ name: "runs", privacy: "private" });
  const stored = await get(`/v1/vals/${val.id}`);
  assert.deepEqual([stored.type, stored.code], ["script", ""]);
  assert.ok(!stored.scopes.includes("val:write"), "the usual defaults, not every scope");
  const auth = { Authorization: `Bearer ${token}`, "Content-Type": "application/json" };
  const patched = await fetch(`${base}/v1/vals/${val.id}`, {
    method: "PATCH",
    headers: auth,
    body: JSON.stringify({ code: 'export default () => console.log("ran from the SDK");' }),
  });
  assert.equal(patched.status, 200);
  const run = await (await fetch(`${base}/v1/vals/${val.id}/run`, { method: "POST", headers: auth })).json();
  assert.equal(run.outcome, "succeeded", JSON.stringify(run));
  assert.match(run.logs, /ran from the SDK/);
});

test("a val made through the SDK never gets more scopes than the token that made it", async () => {
  const narrow = data.cli(["token", "create", "--user", "ada", "--name", "narrow", "--scopes", "val:read val:write blob:read"]);
  const val = await sdk(narrow).vals.create({ name: "narrow", privacy: "private" });
  const stored = await get(`/v1/vals/${val.id}`, narrow);
  assert.deepEqual([...stored.scopes].sort(), ["blob:read", "val:read"]);
});

test("JSON bodies need no JSON content type, as on the hosted API; forms still get 415", async () => {
  const post = (body, headers = {}) =>
    fetch(`${base}/v1/sqlite/execute`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, ...headers },
      body,
    });
  const statement = JSON.stringify({ statement: "SELECT 41 + 1" });
  // Bytes go with no Content-Type at all; a string as text/plain (what the
  // hosted std/sqlite sends).
  const cases = [
    [new TextEncoder().encode(statement), {}],
    [statement, {}],
    [statement, { "Content-Type": "application/json" }],
  ];
  for (const [body, headers] of cases) {
    const res = await post(body, headers);
    assert.equal(res.status, 200, `${typeof body} with ${JSON.stringify(headers)}`);
    assert.deepEqual((await res.json()).rows, [[42]]);
  }
  const form = await post(new URLSearchParams({ statement: "SELECT 1" }));
  assert.equal(form.status, 415);
  assert.equal((await form.json()).error.code, "unsupported_media_type");
  const bad = await post("{not json", { "Content-Type": "text/plain" });
  assert.equal(bad.status, 400);
});

test("a signed-in browser's cookie opens no API route, so a text/plain cross-site post cannot use it", async () => {
  const form = await fetch(`${base}/login`);
  const csrfCookie = form.headers.get("set-cookie").split(";")[0];
  const csrf = csrfCookie.slice(csrfCookie.indexOf("=") + 1);
  const login = await fetch(`${base}/login`, {
    method: "POST",
    redirect: "manual",
    headers: { Cookie: csrfCookie },
    body: new URLSearchParams({ username: "ada", password: PASSWORD, csrf, next: "/settings/tokens" }),
  });
  assert.equal(login.status, 303, "signed in");
  const session = login.headers.get("set-cookie").split(";")[0];
  assert.equal((await fetch(`${base}/settings/tokens`, { headers: { Cookie: session } })).status, 200);

  const forged = await fetch(`${base}/v1/sqlite/execute`, {
    method: "POST",
    headers: { Cookie: session, "Content-Type": "text/plain" },
    body: JSON.stringify({ statement: "CREATE TABLE forged (a)" }),
  });
  assert.equal(forged.status, 401);
  assert.equal((await forged.json()).error.code, "missing_token");
  const tables = await client.sqlite.execute({ statement: "SELECT count(*) FROM sqlite_master WHERE name = 'forged'" });
  assert.deepEqual(tables.rows, [[0]]);
});
