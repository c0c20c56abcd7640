// std/blob: the hosted std library's blob API, backed by valet's /v1/blob.
// It behaves as the hosted module does: `get` answers the fetch Response,
// a missing key makes `get` throw ValTownBlobNotFoundError (and `getJSON`
// answer undefined), and any other failure of any call throws a
// ValTownBlobError. The same classes are what
// `https://esm.town/v/std/ValTownBlobError` and `.../ValTownBlobNotFoundError`
// export, so `instanceof` checks written for the hosted platform hold.
import { api, failure } from "./_client.ts";

export class ValTownBlobError extends Error {
  /** HTTP status of the failed call, when there was one. */
  status?: number;
  /** valet's error code (`missing_scope`, `quota_exceeded`, ...). */
  code?: string;
  /** The scope the call needed, for `missing_scope`. */
  required?: string;

  constructor(message: string) {
    super(message);
    this.name = "ValTownBlobError";
  }
}

export class ValTownBlobNotFoundError extends ValTownBlobError {
  constructor(key?: string) {
    super(key === undefined ? "blob not found" : `blob not found: ${key}`);
    this.name = "ValTownBlobNotFoundError";
  }
}

export interface BlobMetadata {
  key: string;
  size: number;
  lastModified: string;
}

const path = (key: string) => `/v1/blob/${encodeURIComponent(key)}`;

/** A failed call as a ValTownBlobError carrying valet's explanation. */
async function blobError(res: Response): Promise<ValTownBlobError> {
  const { message, status, code, required } = await failure(res);
  return Object.assign(new ValTownBlobError(message), { status, code, required });
}

/** Calls the API and throws a ValTownBlobError unless it succeeded. */
async function call(target: string, init?: RequestInit): Promise<Response> {
  const res = await api(target, init);
  if (!res.ok) throw await blobError(res);
  return res;
}

async function get(key: string): Promise<Response> {
  const res = await api(path(key));
  if (res.status === 404) {
    await res.body?.cancel();
    throw new ValTownBlobNotFoundError(key);
  }
  if (!res.ok) throw await blobError(res);
  return res;
}

async function set(key: string, value: BodyInit): Promise<void> {
  const res = await call(path(key), { method: "POST", body: value });
  await res.body?.cancel();
}

async function list(prefix?: string): Promise<BlobMetadata[]> {
  const query = prefix ? `?prefix=${encodeURIComponent(prefix)}` : "";
  return await (await call(`/v1/blob${query}`)).json();
}

/** Deleting a key that does not exist is not an error. */
async function del(key: string): Promise<void> {
  const res = await call(path(key), { method: "DELETE" });
  await res.body?.cancel();
}

async function getJSON(key: string): Promise<any> {
  let res: Response;
  try {
    res = await get(key);
  } catch (e) {
    if (e instanceof ValTownBlobNotFoundError) return undefined;
    throw e;
  }
  return await res.json();
}

async function setJSON(key: string, value: unknown): Promise<void> {
  await set(key, JSON.stringify(value));
}

async function copy(previous: string, next: string): Promise<void> {
  const res = await get(previous);
  await set(next, await res.arrayBuffer());
}

async function move(previous: string, next: string): Promise<void> {
  await copy(previous, next);
  await del(previous);
}

export const blob = { get, set, list, delete: del, getJSON, setJSON, copy, move };
export default blob;
