// Shared plumbing of the std shims: authenticated calls to valet's API and
// errors that say what to do about them.
import { API_URL } from "./API_URL.ts";

export class ValTownApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string,
    readonly required?: string,
  ) {
    super(message);
    this.name = "ValTownApiError";
  }
}

export function token(): string {
  const key = Deno.env.get("valtown");
  if (!key) {
    throw new Error(
      "no valet key: the 'valtown' environment variable is not set (run this val with `valet run`)",
    );
  }
  return key;
}

/** Turns an error response into an exception naming the problem. */
export async function failure(res: Response): Promise<ValTownApiError> {
  let code = "error";
  let message = `${res.status} ${res.statusText}`;
  let required: string | undefined;
  try {
    const body = await res.json();
    code = body?.error?.code ?? code;
    message = body?.error?.message ?? message;
    required = body?.error?.required;
  } catch { /* not JSON */ }
  if (code === "missing_scope" && required) {
    // A run's refusal already points at the val's settings page.
    message = message.includes("settings page")
      ? `missing scope '${required}': ${message}`
      : `missing scope '${required}': ${message}. Allow it on the val's settings page ` +
        `(/vals/<name>/settings) or with POST /v1/vals/<id>/scope-requests/${required}/allow`;
  }
  return new ValTownApiError(message, res.status, code, required);
}

export async function api(path: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${token()}`);
  return await fetch(`${API_URL}${path}`, { ...init, headers });
}

export async function apiJson<T>(path: string, init: RequestInit = {}): Promise<T> {
  const headers = new Headers(init.headers);
  if (init.body !== undefined) headers.set("Content-Type", "application/json");
  const res = await api(path, { ...init, headers });
  if (!res.ok) throw await failure(res);
  return await res.json() as T;
}
