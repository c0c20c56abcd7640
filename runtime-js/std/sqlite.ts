// std/sqlite: the hosted std library's SQLite API (libsql result shape),
// backed by valet's /v1/sqlite on the owner's own database.
import { apiJson } from "./_client.ts";

export type InValue = null | string | number | bigint | boolean | Uint8Array | ArrayBuffer | Date;
export type InArgs = InValue[] | Record<string, InValue>;
export type InStatement = string | { sql: string; args?: InArgs };
export type TransactionMode = "write" | "read" | "deferred";

export interface ResultSet {
  columns: string[];
  columnTypes: string[];
  rows: Row[];
  rowsAffected: number;
  lastInsertRowid?: bigint;
  toJSON(): unknown;
}
export type Row = unknown[] & Record<string, unknown>;

function encodeValue(value: InValue): unknown {
  if (value instanceof Uint8Array || value instanceof ArrayBuffer) {
    const bytes = value instanceof ArrayBuffer ? new Uint8Array(value) : value;
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    return { base64: btoa(text) };
  }
  if (value instanceof Date) return value.getTime();
  if (typeof value === "bigint") return Number(value);
  return value;
}

function encode(statement: InStatement): unknown {
  if (typeof statement === "string") return statement;
  const args = statement.args;
  if (Array.isArray(args)) return { sql: statement.sql, args: args.map(encodeValue) };
  if (args) {
    return {
      sql: statement.sql,
      args: Object.fromEntries(Object.entries(args).map(([k, v]) => [k, encodeValue(v)])),
    };
  }
  return { sql: statement.sql };
}

function decodeValue(value: unknown): unknown {
  if (value && typeof value === "object" && "base64" in value) {
    const text = atob((value as { base64: string }).base64);
    return Uint8Array.from(text, (c) => c.charCodeAt(0));
  }
  return value;
}

interface Raw {
  columns: string[];
  columnTypes: string[];
  rows: unknown[][];
  rowsAffected: number;
  lastInsertRowid: number | null;
}

function decode(raw: Raw): ResultSet {
  const rows = raw.rows.map((values) => {
    const row = values.map(decodeValue) as Row;
    raw.columns.forEach((name, i) => {
      if (!(name in row)) {
        Object.defineProperty(row, name, { value: row[i], enumerable: false });
      }
    });
    return row;
  });
  return {
    columns: raw.columns,
    columnTypes: raw.columnTypes,
    rows,
    rowsAffected: raw.rowsAffected,
    lastInsertRowid: raw.lastInsertRowid == null ? undefined : BigInt(raw.lastInsertRowid),
    toJSON() {
      return { ...raw, lastInsertRowid: raw.lastInsertRowid?.toString() ?? null };
    },
  };
}

async function execute(statement: InStatement): Promise<ResultSet> {
  const raw = await apiJson<Raw>("/v1/sqlite/execute", {
    method: "POST",
    body: JSON.stringify({ statement: encode(statement) }),
  });
  return decode(raw);
}

async function batch(statements: InStatement[], mode?: TransactionMode): Promise<ResultSet[]> {
  const raw = await apiJson<Raw[]>("/v1/sqlite/batch", {
    method: "POST",
    body: JSON.stringify({ statements: statements.map(encode), ...(mode ? { mode } : {}) }),
  });
  return raw.map(decode);
}

export const sqlite = { execute, batch };
export default sqlite;
