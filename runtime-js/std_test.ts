// Tests of the std shims' own logic: how they encode arguments, decode
// results and explain errors. End-to-end behaviour against a real valet is
// covered by the Rust tests and the conformance fixtures.
import { failure } from "./std/_client.ts";
import { ValTownBlobError, ValTownBlobNotFoundError } from "./std/blob.ts";
import { LibsqlError } from "./std/sqlite.ts";
import * as errorModule from "./esm/ValTownBlobError";
import * as notFoundModule from "./esm/ValTownBlobNotFoundError";

function assertEquals(actual: unknown, expected: unknown) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`expected ${e}, got ${a}`);
}

function assert(condition: unknown, message: string) {
  if (!condition) throw new Error(message);
}

Deno.test("a missing scope names the scope and how to grant it", async () => {
  const res = Response.json(
    { error: { code: "missing_scope", message: "nope", required: "blob:write" } },
    { status: 403 },
  );
  const error = await failure(res);
  assertEquals(error.status, 403);
  assertEquals(error.code, "missing_scope");
  assertEquals(error.required, "blob:write");
  assert(error.message.includes("missing scope 'blob:write'"), error.message);
  assert(error.message.includes("/scope-requests/blob:write/allow"), error.message);
});

Deno.test("a non-JSON error still gives a useful message", async () => {
  const error = await failure(new Response("bad gateway", { status: 502, statusText: "Bad Gateway" }));
  assertEquals(error.code, "error");
  assert(error.message.includes("502"), error.message);
});

Deno.test("blob errors keep the hosted class hierarchy", () => {
  const e = new ValTownBlobNotFoundError("k");
  assert(e instanceof ValTownBlobError, "not-found is a blob error");
  assertEquals(e.name, "ValTownBlobNotFoundError");
  assert(e.message.includes("k"), e.message);
});

Deno.test("the hosted error modules export the very classes std/blob throws", () => {
  assert(errorModule.ValTownBlobError === ValTownBlobError, "std/ValTownBlobError");
  assert(notFoundModule.ValTownBlobNotFoundError === ValTownBlobNotFoundError, "std/ValTownBlobNotFoundError");
  assertEquals(new ValTownBlobNotFoundError().message, "blob not found");
});

Deno.test("sqlite errors read like libsql's: the code leads the message", () => {
  const e = new LibsqlError('near "SELEC": syntax error', "SQLITE_ERROR", 1);
  assert(e instanceof Error, "an Error");
  assertEquals([e.name, e.code, e.rawCode], ["LibsqlError", "SQLITE_ERROR", 1]);
  assertEquals(e.message, 'SQLITE_ERROR: near "SELEC": syntax error');
});

Deno.test("calls without a valet key explain how to get one", async () => {
  const { token } = await import("./std/_client.ts");
  const saved = Deno.env.get("valtown");
  Deno.env.delete("valtown");
  try {
    let message = "";
    try {
      token();
    } catch (e) {
      message = (e as Error).message;
    }
    assert(message.includes("valet run"), message);
  } finally {
    if (saved !== undefined) Deno.env.set("valtown", saved);
  }
});
