// Vals written the way the hosted docs write them (tests/sdk/vals/*.ts),
// each run once with `valet run FILE` on a fresh data dir. A val checks its
// own results and throws on a mismatch, which fails its run.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { dataDir, valet } from "./valet.mjs";

const dir = join(import.meta.dirname, "vals");
const vals = readdirSync(dir).filter((f) => f.endsWith(".ts") && !f.startsWith("_")).sort();

test("there are vals to run", () => assert.ok(vals.length >= 4, vals.join(", ")));

for (const file of vals) {
  test(`valet run vals/${file}`, () => {
    const data = dataDir("valet-sdk-val-");
    try {
      const r = spawnSync(valet, ["--data-dir", data.dir, "run", join(dir, file), "--json"], {
        encoding: "utf8",
        timeout: 120_000,
      });
      assert.equal(r.error, undefined, `could not run valet: ${r.error}`);
      const run = JSON.parse(r.stdout);
      assert.equal(run.outcome, "succeeded", `${file} ${run.outcome}:\n${run.logs}\n${r.stderr}`);
      assert.equal(r.status, 0);
      assert.match(run.logs, /\[out\] ok /, "the val checked something");
    } finally {
      data.remove();
    }
  });
}
