// The entry of every run process. The process starts with no val, no key
// and an empty environment; the bootstrap connects to its private control
// channel, locks the environment, routes the API origin (and any explicitly
// allowed egress) through the run's own Unix sockets, refuses private IPv6
// addresses, then waits for its claim (the val, its env and key, its kind)
// and loads the val with a dynamic import, so every file the val reaches
// needs a read permission it does not have.
//
// Outcomes are reported over the control channel, which the val cannot
// reach: the connection is made before the val exists, the supervisor
// accepts no other, and the socket file is gone once it is accepted.

interface Route {
  origin: string;
  socket: string;
  /** Host the request is sent with: the allowed address is loopback, which
   * the sandbox denies by name, so the URL is rewritten to this host. */
  alias?: string;
  /** Other origins that lead to the same place (the hosted API's). */
  aliases?: string[];
}

interface Config {
  api: Route;
  egress: Route[];
  control: string;
  httpSocket: string;
  /** Compile the std shims before the claim (a process started ahead). */
  preloadStd?: boolean;
  /** Seed Deno's cache (valet does, once, as itself): analyse and
   * transpile the bootstrap and the std shims, then exit. */
  seed?: boolean;
}

interface Claim {
  kind: "http" | "script" | "cron";
  valUrl: string;
  env: Record<string, string>;
  lastRunAt?: string | null;
  runId: string;
  /** A hot http process: many requests, each its own run, whose key
   * arrives before the request. */
  hot?: boolean;
  /** A hot process's own value of the quiet-end header. */
  quietEnd?: string;
}

const config: Config = JSON.parse(Deno.args[0] ?? "{}");
const encoder = new TextEncoder();

if (config.seed) {
  // Loading them is what caches them; running them (they read the
  // environment, which is not set up here) is not needed.
  await Promise.all(
    ["blob", "sqlite", "email"].map((name) => import(`https://esm.town/v/std/${name}`).catch(() => {})),
  );
  Deno.exit(0);
}

// --- The control channel: connected first, before any val exists. ---
// (Connecting while the rest of the bootstrap sets up; it is awaited
// before the claim is read, and every report waits for it.)
const connecting = Deno.connect({ transport: "unix", path: config.control });
// What `report` uses, taken now: a val that replaces `JSON.stringify` or a
// prototype's method later cannot make the bootstrap say something else.
const apply = Reflect.apply;
const stringify = JSON.stringify;
const encode = encoder.encode.bind(encoder);
const subarray = Uint8Array.prototype.subarray;
const then = Promise.prototype.then;
let write!: (p: Uint8Array) => Promise<number>;
let read!: (p: Uint8Array) => Promise<number | null>;
const connected = apply(then, connecting, [(control: Deno.UnixConn) => {
  write = control.write.bind(control);
  read = control.read.bind(control);
}]) as Promise<void>;
// A failed connect is the claim's to report (the bootstrap then exits).
let sending: Promise<unknown> = apply(then, connected, [undefined, () => {}]);
const assign = Object.assign;
function report(event: Record<string, unknown>): Promise<unknown> {
  // Its own fields copied onto an object without a prototype: a val that
  // defines `Object.prototype.toJSON` (which `JSON.stringify` consults)
  // cannot rewrite the event. Its values are strings and booleans.
  const own = assign({ __proto__: null }, event);
  const line = encode(stringify(own) + "\n");
  const send = async () => {
    try {
      let written = 0;
      while (written < line.length) written += await write(apply(subarray, line, [written]));
    } catch {
      // The supervisor is gone; nothing to tell.
    }
  };
  sending = apply(then, sending, [send]);
  return sending;
}

// What the paths that run after the val has loaded use (reading the
// supervisor's lines, a hot request's key), taken now: a val that replaces
// a prototype's method cannot make the bootstrap misread its lines. (The
// http ones are taken once the claim says the val is an http val, before
// it loads: touching `Deno.serve` or `Headers` makes Deno load its http
// and fetch code, 1-3 ms that a script run does not need.)
const indexOf = String.prototype.indexOf;
const slice = String.prototype.slice;
const mapGet = Map.prototype.get;
const mapSet = Map.prototype.set;
const mapDelete = Map.prototype.delete;
const mapKeys = Map.prototype.keys;
const iteratorNext = Object.getPrototypeOf(new Map().keys()).next;
const mapSize = Object.getOwnPropertyDescriptor(Map.prototype, "size")!.get!;
const PromiseOf = Promise;
const MapOf = Map;
interface HttpPrimordials {
  serve: typeof Deno.serve;
  headersGet: typeof Headers.prototype.get;
  headersSet: typeof Headers.prototype.set;
  headersDelete: typeof Headers.prototype.delete;
  responseHeaders: () => Headers;
}
let http!: HttpPrimordials;
function takeHttpPrimordials(): HttpPrimordials {
  return {
    serve: Deno.serve,
    headersGet: Headers.prototype.get,
    headersSet: Headers.prototype.set,
    headersDelete: Headers.prototype.delete,
    responseHeaders: Object.getOwnPropertyDescriptor(Response.prototype, "headers")!.get!,
  };
}

// Lines from the supervisor: the claim, then (a hot process) each
// request's key, sent before the request.
const parse = JSON.parse;
const decoder = new TextDecoder();
const decode = decoder.decode.bind(decoder);
const readBuffer = new Uint8Array(64 * 1024);
let unread = "";
async function nextLine(): Promise<string | null> {
  while (true) {
    const end = apply(indexOf, unread, ["\n"]) as number;
    if (end >= 0) {
      const line = apply(slice, unread, [0, end]) as string;
      unread = apply(slice, unread, [end + 1]) as string;
      return line;
    }
    const n = await read(readBuffer);
    if (n === null) return null;
    unread += decode(apply(subarray, readBuffer, [0, n]), { stream: true });
  }
}

async function readClaim(): Promise<Claim> {
  await connected;
  const line = await nextLine();
  if (line === null) throw new Error("the supervisor closed the control channel");
  return parse(line);
}

// --- Environment: read-only; the run's variables arrive in the claim. ---
const env = Deno.env;
const frozenEnv: Record<string, string> = {};
/** The current request's own variables (its key), in a hot process. */
let requestEnv: () => Record<string, string> | undefined = () => undefined;
const lookup = (key: string): string | undefined => {
  const own = requestEnv();
  if (own && Object.hasOwn(own, key)) return own[key];
  return Object.hasOwn(frozenEnv, key) ? frozenEnv[key] : undefined;
};
const readOnly = () => {
  throw new TypeError("the environment of a valet run is read-only");
};
for (const [name, value] of [
  ["set", readOnly],
  ["delete", readOnly],
  ["toObject", () => ({ ...frozenEnv, ...requestEnv() })],
  ["has", (key: string) => lookup(key) !== undefined],
  ["get", lookup],
] as const) {
  Object.defineProperty(env, name, { value, writable: false, configurable: false });
}
// `process.env` (node compat) is left alone on purpose: touching the
// `process` global loads the node compatibility layer, which costs ~35 ms
// per run. The process environment is empty, and the std shims read the
// frozen view above.

// --- Network: the API and allowed egress go through private sockets. ---
const originalFetch = globalThis.fetch;
interface Socket {
  socket: string;
  alias?: string;
  /** Rewrite the request to this origin (a hosted-API alias). */
  rewrite?: string;
  client?: Deno.HttpClient;
}
const routes = new Map<string, Socket>();
for (const route of [config.api, ...(config.egress ?? [])]) {
  if (!route) continue;
  routes.set(route.origin, { socket: route.socket, alias: route.alias });
  for (const alias of route.aliases ?? []) {
    routes.set(alias, { socket: route.socket, rewrite: route.origin });
  }
}

// Private IPv6 ranges Deno's --deny-net cannot express (it takes single
// IPv6 addresses): unique local fc00::/7, link-local fe80::/10, site-local
// fec0::/10, multicast ff00::/8, and IPv4 embedded in IPv6 (mapped
// ::ffff:0:0/96, NAT64 64:ff9b::/96, compatible ::/96), whose IPv4 part must
// pass the IPv4 check.
function parseIpv6(text: string): number[] | undefined {
  const host = text.replace(/^\[|\]$/g, "").split("%")[0];
  if (!host.includes(":")) return undefined;
  let tail: number[] = [];
  let main = host;
  const v4 = host.match(/^(.*:)(\d+\.\d+\.\d+\.\d+)$/);
  if (v4) {
    const parts = v4[2].split(".").map(Number);
    tail = [(parts[0] << 8) | parts[1], (parts[2] << 8) | parts[3]];
    main = v4[1].endsWith("::") ? v4[1] : v4[1].slice(0, -1);
  }
  const [head, rest] = main.split("::");
  const parse = (s: string) => (s ? s.split(":").map((h) => parseInt(h, 16)) : []);
  const left = parse(head);
  const right = rest === undefined ? [] : parse(rest);
  const missing = 8 - left.length - right.length - tail.length;
  if (missing < 0 || (rest === undefined && missing !== 0)) return undefined;
  const words = [...left, ...new Array(missing).fill(0), ...right, ...tail];
  return words.some((w) => Number.isNaN(w) || w < 0 || w > 0xffff) ? undefined : words;
}

function privateIpv4(a: number, b: number): boolean {
  return a === 0 || a === 10 || a === 127 || (a === 100 && b >= 64 && b < 128) ||
    (a === 169 && b === 254) || (a === 172 && b >= 16 && b < 32) || (a === 192 && b === 168) ||
    (a === 192 && b === 0) || (a === 198 && (b === 18 || b === 19)) || a >= 224;
}

export function deniedIpv6(text: string): boolean {
  const w = parseIpv6(text);
  if (!w) return false;
  if ((w[0] & 0xfe00) === 0xfc00) return true; // fc00::/7
  if ((w[0] & 0xffc0) === 0xfe80 || (w[0] & 0xffc0) === 0xfec0) return true;
  if ((w[0] & 0xff00) === 0xff00) return true; // multicast
  const embedded = (w[0] === 0 && w[1] === 0 && w[2] === 0 && w[3] === 0 && w[4] === 0 &&
    (w[5] === 0xffff || w[5] === 0)) || (w[0] === 0x64 && w[1] === 0xff9b);
  if (embedded) {
    if (w.slice(0, 7).every((x) => x === 0) && w[7] <= 1) return true; // :: and ::1
    return privateIpv4(w[6] >> 8, w[6] & 0xff);
  }
  return false;
}

const checked = new Map<string, number>();
async function checkHost(hostname: string): Promise<void> {
  const host = hostname.replace(/^\[|\]$/g, "");
  if (host.includes(":")) {
    if (deniedIpv6(host)) throw new TypeError(`valet: ${hostname} is a private address`);
    return;
  }
  if (/^[\d.]+$/.test(host)) return; // IPv4: Deno's --deny-net decides.
  const until = checked.get(host);
  if (until !== undefined && until > Date.now()) return;
  let addresses: string[] = [];
  try {
    addresses = await Deno.resolveDns(host, "AAAA");
  } catch { /* no AAAA records */ }
  const bad = addresses.find(deniedIpv6);
  if (bad) throw new TypeError(`valet: ${hostname} resolves to the private address ${bad}`);
  checked.set(host, Date.now() + 30_000);
}

async function routed(input: RequestInfo | URL, init?: RequestInit): Promise<Response> {
  const url = new URL(input instanceof Request ? input.url : String(input));
  const route = routes.get(url.origin);
  if (!route) {
    await checkHost(url.hostname);
    return originalFetch(input, init);
  }
  let target: RequestInfo | URL = input;
  const rewritten = route.rewrite ? new URL(url.pathname + url.search, route.rewrite) : undefined;
  if (route.alias) {
    const aliased = new URL(url);
    aliased.host = route.alias;
    target = input instanceof Request ? new Request(aliased, input) : aliased;
  } else if (rewritten) {
    target = input instanceof Request ? new Request(rewritten, input) : rewritten;
  }
  route.client ??= Deno.createHttpClient({ proxy: { transport: "unix", path: route.socket } });
  return originalFetch(target, { ...init, client: route.client } as RequestInit);
}
Object.defineProperty(globalThis, "fetch", { value: routed, writable: false, configurable: false });

for (const name of ["connect", "connectTls"] as const) {
  const original = Deno[name] as (options: { hostname?: string }) => Promise<unknown>;
  const guarded = async (options: { hostname?: string; transport?: string }) => {
    if (options?.transport !== "unix") await checkHost(options?.hostname ?? "127.0.0.1");
    return original.call(Deno, options);
  };
  Object.defineProperty(Deno, name, { value: guarded, writable: false, configurable: false });
}

// --- Outcomes, as the bootstrap sees them. ---
function isOutOfMemory(error: unknown): boolean {
  return error instanceof RangeError &&
    /allocation failed|Out of memory|could not allocate/i.test(error.message);
}

function logError(prefix: string, error: unknown) {
  const text = error instanceof Error ? (error.stack ?? String(error)) : String(error);
  console.error(`${prefix} ${text}`);
}

async function fail(error: unknown): Promise<never> {
  logError("error: Uncaught", error);
  await report({ t: "error", kind: isOutOfMemory(error) ? "oom" : "uncaught" });
  Deno.exit(1);
}

globalThis.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  void fail(event.reason);
});
globalThis.addEventListener("error", (event) => {
  event.preventDefault();
  void fail(event.error);
});

// A script's or cron val's work has settled when Deno's event loop has
// nothing left to do: Deno then dispatches `beforeunload`. Saying so lets
// the supervisor end the run at once instead of waiting for the process to
// tear down; the process still exits on its own.
let mainSettled = false;
let settledSent = false;
globalThis.addEventListener("beforeunload", (event) => {
  // (A val can dispatch a `beforeunload` of its own, Deno's is not marked
  // trusted: that only ends the val's own run early.)
  if (mainSettled && !settledSent) {
    settledSent = true;
    // Deno exits right after `beforeunload` unless a listener asks for one
    // more turn of the event loop: the report is a write, which needs it.
    event.preventDefault();
    void report({ t: "settled" });
  }
});

// --- The std shims, compiled while the process waits for its claim. ---
// A val that imports them finds them loaded (the same module instances).
// They are valet's code; nothing of a val or its owner is known yet. The
// API's URL is fixed, so it is known before the claim too.
frozenEnv.VALTOWN_API_URL = config.api.origin;
if (config.preloadStd) {
  await Promise.all(
    ["blob", "sqlite", "email"].map((name) =>
      import(`https://esm.town/v/std/${name}`).catch(() => {
        // The val's own import reports what went wrong, if it needs the shim.
      })
    ),
  );
}

// --- Deno's own internals: no val's business. ---
// `Deno[Deno.internal]` holds deno_core itself (`core.ops`: raw ops, the
// exit code, the event loop's state). Deno's runtime keeps references of
// its own; the property goes before any val exists.
{
  const internal = (Deno as unknown as { internal?: symbol }).internal;
  if (internal !== undefined) delete (Deno as unknown as Record<symbol, unknown>)[internal];
}

// --- The claim, then the val. ---
const claim = await readClaim();
if (claim.kind === "http") http = takeHttpPrimordials();
Object.assign(frozenEnv, claim.env);
let val: Record<string, unknown>;
try {
  val = await import(claim.valUrl);
} catch (error) {
  await fail(error);
  throw error;
}
try {
  await start(val, claim);
} catch (error) {
  await fail(error);
}

async function start(val: Record<string, unknown>, claim: Claim): Promise<void> {
  const main = val.default;
  switch (claim.kind) {
    case "script":
      if (typeof main === "function") await main();
      await report({ t: "done" });
      mainSettled = true;
      return;
    case "cron": {
      if (typeof main !== "function") {
        throw new TypeError("a cron val must export a default function");
      }
      const lastRunAt = claim.lastRunAt ? new Date(claim.lastRunAt) : undefined;
      await main({ lastRunAt });
      await report({ t: "done" });
      mainSettled = true;
      return;
    }
    case "http": {
      const handler = typeof main === "function" ? main : (main as { fetch?: unknown })?.fetch;
      if (typeof handler !== "function") {
        throw new TypeError(
          "an http val must export a default function (req: Request) => Response",
        );
      }
      const onRequest = claim.hot
        ? await hotHandler(handler, main, claim.quietEnd ?? "")
        : (req: Request) => handler.call(main, req);
      apply(http.serve, Deno, [{
        path: config.httpSocket,
        transport: "unix",
        onListen() {
          void report({ t: "listening" });
        },
        onError(error) {
          logError("Uncaught error in http handler:", error);
          void report({ t: "handler_error", run: claim.runId });
          return new Response("Internal Server Error", { status: 500 });
        },
      }, onRequest]);
      return;
    }
  }
}

interface RequestRun {
  run: string;
  key: string;
  /** Whether anything was reported for the request (a log line). */
  said?: boolean;
}

/** Set on a hot response whose request reported nothing on the control
 * channel: its handler's end rides on the response (one write fewer per
 * request); the supervisor removes it before the visitor sees it. */
const QUIET_END = "x-valet-quiet-end";

/** A hot process's handler: each request runs in its own context, so its
 * key (`Deno.env.get("valtown")`), its logs and its errors are its own. */
async function hotHandler(
  handler: (req: Request) => unknown,
  main: unknown,
  quietEnd: string,
): Promise<(req: Request) => Promise<Response>> {
  const { AsyncLocalStorage } = await import("node:async_hooks");
  // A val that ends its process: no new request is sent to it.
  const exit = Deno.exit;
  Object.defineProperty(Deno, "exit", {
    value: (code?: number) => {
      void report({ t: "exiting" }).then(() => exit(code));
      throw new Error("the process is exiting");
    },
  });
  const context = new AsyncLocalStorage<RequestRun>();
  // Each request's key comes down the control channel before the
  // request (as it is signed ahead, or just before), which names its run in a header: the key never travels in the
  // request, where the val could pass it on (to a server it proxies to)
  // without knowing. (Copying the request to strip a header instead cost
  // more than all the rest of a request.)
  const keys: Map<string, string> = new MapOf();
  const awaiting: Map<string, (key: string) => void> = new MapOf();
  void (async () => {
    while (true) {
      const line = await nextLine();
      if (line === null) return;
      let message: { t?: unknown; run?: unknown; key?: unknown };
      try {
        message = parse(line);
      } catch {
        continue;
      }
      const { t, run, key } = message;
      if (t !== "run" || typeof run !== "string" || typeof key !== "string") continue;
      const waiter = apply(mapGet, awaiting, [run]) as ((key: string) => void) | undefined;
      if (waiter) {
        apply(mapDelete, awaiting, [run]);
        waiter(key);
        continue;
      }
      // Keys come ahead of their requests (signed ahead, and not live
      // until their request begins). Those whose request never came (valet
      // threw them away unused, or the connection failed) are dropped
      // oldest first past a thousand: they are dead already.
      if ((apply(mapSize, keys, []) as number) >= 1024) {
        const oldest = apply(iteratorNext, apply(mapKeys, keys, []), []) as IteratorResult<string>;
        apply(mapDelete, keys, [oldest.value]);
      }
      apply(mapSet, keys, [run, key]);
    }
  })();
  requestEnv = () => {
    const run = context.getStore();
    return run ? { valtown: run.key, VAL_TOWN_API_KEY: run.key } : undefined;
  };
  for (const [method, stream] of [
    ["log", "out"], ["info", "out"], ["debug", "out"], ["warn", "err"], ["error", "err"],
  ] as const) {
    const original = console[method].bind(console);
    console[method] = (...args: unknown[]) => {
      const run = context.getStore();
      if (!run) return original(...args);
      run.said = true;
      const text = args.map((a) => typeof a === "string" ? a : Deno.inspect(a)).join(" ");
      for (const line of text.split("\n")) void report({ t: "log", run: run.run, s: stream, line });
    };
  }
  return async (req: Request) => {
    const runId = apply(http.headersGet, req.headers, ["x-valet-run"]) as string | null;
    if (!runId) return new Response("Bad Gateway", { status: 502 });
    let key = apply(mapGet, keys, [runId]) as string | undefined;
    if (key === undefined) {
      key = await new PromiseOf<string>((resolve) => apply(mapSet, awaiting, [runId, resolve]));
    } else {
      apply(mapDelete, keys, [runId]);
    }
    const run: RequestRun = { run: runId, key };
    return await context.run(run, async () => {
      let response: Response;
      try {
        response = await (handler.call(main, req) as Promise<Response>);
      } catch (error) {
        logError("Uncaught error in http handler:", error);
        // Reported before the answer leaves, so the supervisor knows (an
        // exiting process takes no new request) before the client does.
        await report({ t: "handler_error", run: run.run });
        await report({ t: "end", run: run.run });
        return new Response("Internal Server Error", { status: 500 });
      }
      try {
        const headers = apply(http.responseHeaders, response, []) as Headers;
        if (!run.said) {
          apply(http.headersSet, headers, [QUIET_END, quietEnd]);
          return response;
        }
        // A response object kept from a quiet request carries the mark.
        apply(http.headersDelete, headers, [QUIET_END]);
      } catch {
        // Immutable headers (a fetched or redirect response), or not a
        // Response at all: said on the channel instead.
      }
      // After the request's logs, on the same channel.
      await report({ t: "end", run: run.run });
      return response;
    });
  };
}
