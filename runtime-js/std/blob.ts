// std/blob: the hosted std library's blob API, backed by valet's /v1/blob.
import { api, failure } from "./_client.ts";

export class ValTownBlobError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ValTownBlobError";
  }
}

export class ValTownBlobNotFoundError extends ValTownBlobError {
  constructor(key: string) {
    super(`blob not found: ${key}`);
    this.name = "ValTownBlobNotFoundError";
  }
}

export interface BlobMetadata {
  key: string;
  size: number;
  lastModified: string;
}

const path = (key: string) => `/v1/blob/${encodeURIComponent(key)}`;

async function check(res: Response, key: string): Promise<Response> {
  if (res.status === 404) {
    await res.body?.cancel();
    throw new ValTownBlobNotFoundError(key);
  }
  if (!res.ok) {
    const error = await failure(res);
    throw Object.assign(new ValTownBlobError(error.message), {
      status: error.status,
      code: error.code,
      required: error.required,
    });
  }
  return res;
}

async function get(key: string): Promise<Response> {
  return await check(await api(path(key)), key);
}

async function set(key: string, value: BodyInit): Promise<void> {
  const res = await check(await api(path(key), { method: "POST", body: value }), key);
  await res.body?.cancel();
}

async function list(prefix?: string): Promise<BlobMetadata[]> {
  const query = prefix ? `?prefix=${encodeURIComponent(prefix)}` : "";
  const res = await check(await api(`/v1/blob${query}`), prefix ?? "");
  return await res.json();
}

async function del(key: string): Promise<void> {
  const res = await check(await api(path(key), { method: "DELETE" }), key);
  await res.body?.cancel();
}

async function getJSON(key: string): Promise<any> {
  try {
    const res = await get(key);
    return await res.json();
  } catch (e) {
    if (e instanceof ValTownBlobNotFoundError) return undefined;
    throw e;
  }
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
