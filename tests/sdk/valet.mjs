// The real valet the compatibility tests drive: the built binary on a temp
// data dir, its CLI for users and tokens, and `valet serve` on a free port.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import net from "node:net";

export const root = resolve(import.meta.dirname, "../..");
export const valet = process.env.VALET_BIN ?? join(root, "target/debug/valet");

/** A fresh data dir; `cli` runs `valet` on it and answers its stdout. */
export function dataDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const cli = (args, options = {}) => {
    const r = spawnSync(valet, ["--data-dir", dir, ...args], {
      encoding: "utf8",
      timeout: 120_000,
      ...options,
    });
    assert.equal(r.status, 0, `valet ${args.join(" ")} exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
    return r.stdout.trim();
  };
  return { dir, cli, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

async function freePort() {
  return await new Promise((ok, fail) => {
    const s = net.createServer().once("error", fail).listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** `valet serve` on `dir`; resolves once it answers, with its base URL. */
export async function serve(dir) {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const server = spawn(
    valet,
    ["--data-dir", dir, "serve", "--listen", `127.0.0.1:${port}`, "--vals-listen", "127.0.0.1:0", "--public-url", base],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let log = "";
  server.stderr.on("data", (chunk) => (log += chunk));
  const exited = new Promise((ok) => server.once("exit", ok));
  // A generous deadline: a slow machine is not a failure.
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (server.exitCode !== null) break;
    try {
      if ((await fetch(`${base}/.well-known/jwks.json`)).ok) {
        return {
          base,
          stop: async () => {
            server.kill("SIGTERM");
            await exited;
          },
        };
      }
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  server.kill("SIGKILL");
  throw new Error(`valet serve did not start on ${base}:\n${log}`);
}
