// The std/API_URL example of the hosted docs: call the API directly with the
// run's key, as std modules and many vals do.
import { API_URL } from "https://esm.town/v/std/API_URL";
import { expect } from "./_expect.ts";

const response = await fetch(`${API_URL}/v1/me`, {
  headers: {
    Authorization: `Bearer ${Deno.env.get("valtown")}`,
    Accept: "application/json",
  },
});
const data = await response.json();
expect("status", response.status, 200);
expect("profile", [data.username, data.type, data.tier], ["dev", "user", "pro"]);
expect("fields", Object.keys(data).sort(), [
  "bio", "email", "id", "links", "profileImageUrl", "tier", "type", "url", "username",
]);

// A JSON body posted as the hosted std/sqlite posts it: no Content-Type.
const res = await fetch(`${API_URL}/v1/sqlite/execute`, {
  method: "POST",
  headers: { Authorization: `Bearer ${Deno.env.get("valtown")}` },
  body: JSON.stringify({ statement: "SELECT 6 * 7" }),
});
expect("a text/plain JSON body", (await res.json()).rows, [[42]]);
