// The first module of every run. It locks the environment, routes the API
// origin (and any explicitly allowed egress) through the run's private Unix
// sockets, then, when the entry module calls `start`, runs the val: serves
// one HTTP request, calls a script's default export, or calls a cron val
// with `{ lastRunAt }`.
//
// Runs before the val's own module is evaluated (it is imported first), so
// the val never sees an unpatched `fetch` or a writable `Deno.env`.

interface Route {
  origin: string;
  socket: string;
  /** Host the request is sent with: the allowed address is loopback, which
   * the sandbox denies by name, so the URL is rewritten to this host. */
  alias?: string;
}

interface Config {
  kind: "http" | "script" | "cron";
  /** A warm process: started before its val is known; the claim (val,
   * env, kind) arrives as one JSON line on stdin. */
  warm?: boolean;
  api: Route;
  egress: Route[];
  httpSocket?: string;
  lastRunAt?: string | null;
  envNames: string[];
}

const config: Config = JSON.parse(Deno.args[0] ?? "{}");

// --- Environment: read-only, and only the injected names. ---
const env = Deno.env;
const frozenEnv: Record<string, string> = {};
for (const name of config.envNames ?? []) {
  const value = env.get(name);
  if (value !== undefined) frozenEnv[name] = value;
}
const readOnly = () => {
  throw new TypeError("the environment of a valet run is read-only");
};
for (const [name, value] of [
  ["set", readOnly],
  ["delete", readOnly],
  ["toObject", () => ({ ...frozenEnv })],
  ["has", (key: string) => Object.hasOwn(frozenEnv, key)],
  ["get", (key: string) => (Object.hasOwn(frozenEnv, key) ? frozenEnv[key] : undefined)],
] as const) {
  Object.defineProperty(env, name, { value, writable: false, configurable: false });
}
// `process.env` (node compat) is left alone on purpose: touching the
// `process` global loads the node compatibility layer, which costs ~35 ms
// per run. The std shims read the frozen view above, so a val that writes
// `process.env` changes nothing but its own process.

// --- Network: the API and allowed egress go through private sockets. ---
const originalFetch = globalThis.fetch;
// Clients are made on first use: most runs that never call the API should
// not pay for one.
const routes = new Map<string, { socket: string; alias?: string; client?: Deno.HttpClient }>();
for (const route of [config.api, ...(config.egress ?? [])]) {
  if (route) routes.set(route.origin, { socket: route.socket, alias: route.alias });
}

function routed(input: RequestInfo | URL, init?: RequestInit): Promise<Response> {
  const url = new URL(input instanceof Request ? input.url : String(input));
  const route = routes.get(url.origin);
  if (!route) return originalFetch(input, init);
  let target: RequestInfo | URL = input;
  if (route.alias) {
    const aliased = new URL(url);
    aliased.host = route.alias;
    target = input instanceof Request ? new Request(aliased, input) : aliased;
  }
  route.client ??= Deno.createHttpClient({ proxy: { transport: "unix", path: route.socket } });
  return originalFetch(target, { ...init, client: route.client } as RequestInit);
}
Object.defineProperty(globalThis, "fetch", { value: routed, writable: false, configurable: false });

function logError(prefix: string, error: unknown) {
  const text = error instanceof Error ? (error.stack ?? String(error)) : String(error);
  console.error(`${prefix}: ${text}`);
}

/** Called by the entry module with the val's namespace. */
export async function start(val: Record<string, unknown>): Promise<void> {
  const main = val.default;
  switch (config.kind) {
    case "script":
      if (typeof main === "function") await main();
      return;
    case "cron": {
      if (typeof main !== "function") {
        throw new TypeError("a cron val must export a default function");
      }
      const lastRunAt = config.lastRunAt ? new Date(config.lastRunAt) : undefined;
      await main({ lastRunAt });
      return;
    }
    case "http": {
      const handler = typeof main === "function"
        ? main
        : (main as { fetch?: unknown })?.fetch;
      if (typeof handler !== "function") {
        throw new TypeError("an http val must export a default function (req: Request) => Response");
      }
      Deno.serve({
        path: config.httpSocket!,
        transport: "unix",
        onListen() {},
        onError(error) {
          logError("Uncaught error in http handler", error);
          return new Response("Internal Server Error", { status: 500 });
        },
      }, (req) => handler.call(main, req));
      return;
    }
  }
}

/** The claim a warm process waits for. */
interface Claim {
  kind: Config["kind"];
  valUrl: string;
  env: Record<string, string>;
  lastRunAt?: string | null;
}

async function readLine(stream: ReadableStream<Uint8Array>): Promise<string> {
  const decoder = new TextDecoder();
  let text = "";
  for await (const chunk of stream) {
    text += decoder.decode(chunk, { stream: true });
    const end = text.indexOf("\n");
    if (end >= 0) return text.slice(0, end);
  }
  return text;
}

/** Entry of a warm process: wait for the claim, then run the val. */
export async function warmMain(): Promise<void> {
  const claim: Claim = JSON.parse(await readLine(Deno.stdin.readable));
  // The run's env exists only in the frozen view; the process env is empty.
  Object.assign(frozenEnv, claim.env);
  config.kind = claim.kind;
  config.lastRunAt = claim.lastRunAt;
  const val = await import(claim.valUrl);
  await start(val);
}
