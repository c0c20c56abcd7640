// Counts visits in a blob, records each in SQLite, emails a summary, and
// shows that its valet key cannot write vals (the safe defaults).
import { blob } from "https://esm.town/v/std/blob";
import { sqlite } from "https://esm.town/v/std/sqlite";
import { email } from "https://esm.town/v/std/email";

export default async function () {
  const count = ((await blob.getJSON("visits")) ?? 0) + 1;
  await blob.setJSON("visits", count);
  console.log(`blob: visit number ${count}`);

  await sqlite.execute(
    "CREATE TABLE IF NOT EXISTS visits (n INTEGER PRIMARY KEY, at TEXT NOT NULL)",
  );
  await sqlite.execute({ sql: "INSERT INTO visits (n, at) VALUES (?, ?)", args: [count, new Date().toISOString()] });
  const { rows } = await sqlite.execute("SELECT count(*), min(at) FROM visits");
  console.log(`sqlite: ${rows[0][0]} visits recorded since ${rows[0][1]}`);

  const sent = await email({ subject: `Visit summary: ${count}`, text: `There have been ${count} visits.` });
  console.log(`email: summary ${sent.status} (outbox id ${sent.id})`);

  // The valet key of this run has the default scopes: no val:write.
  const res = await fetch(`${Deno.env.get("VALTOWN_API_URL")}/v1/vals`, {
    method: "POST",
    headers: { Authorization: `Bearer ${Deno.env.get("valtown")}`, "Content-Type": "application/json" },
    body: JSON.stringify({ name: "sneaky", type: "script", code: "console.log('pwned')" }),
  });
  const { error } = await res.json();
  console.log(`val:write: refused with ${res.status} ${error.code} (${error.required})`);
}
