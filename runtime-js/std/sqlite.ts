// std/sqlite: the hosted std library's SQLite API, backed by valet's
// /v1/sqlite on the owner's own database.
//
// Like the hosted module, a result is the API's JSON: rows are arrays, and
// `lastInsertRowid` is a number (or null), so a result can go straight into
// `JSON.stringify` or `Response.json`. Each row also answers its columns by
// name (`row.title`), as libsql rows do; the names are not enumerable, so a
// row still serialises as an array. A statement SQLite refuses throws a
// `LibsqlError` with a `SQLITE_*` code, as on the hosted platform; a refused
// scope or a bad token throws a ValTownApiError that says what to do.
import { apiJson, ValTownApiError } from "./_client.ts";

export type InValue = null | string | number | bigint | boolean | Uint8Array | ArrayBuffer | Date;
export type InArgs = InValue[] | Record<string, InValue>;
export type InStatement = string | { sql: string; args?: InArgs };
export type TransactionMode = "write" | "read" | "deferred";

export type Row = unknown[] & Record<string, unknown>;
export interface ResultSet {
  columns: string[];
  columnTypes: string[];
  rows: Row[];
  rowsAffected: number;
  lastInsertRowid: number | string | null;
}

/** The error @libsql/client throws, as the hosted std/sqlite throws it:
 * `message` starts with the code (`SQLITE_ERROR: near "SELEC": ...`). */
export class LibsqlError extends Error {
  readonly code: string;
  readonly rawCode?: number;

  constructor(message: string, code: string, rawCode?: number) {
    super(`${code}: ${message}`);
    this.name = "LibsqlError";
    this.code = code;
    this.rawCode = rawCode;
  }
}

/** SQLite's primary result code for what valet reported. The API names the
 * failure (`sqlite_error`, `sqlite_timeout`, `database_full`) but not
 * SQLite's own code, so a refused statement is told apart by SQLite's
 * fixed messages: constraint failures and authorizer denials. */
function sqliteCode(error: ValTownApiError): [string, number] | undefined {
  switch (error.code) {
    case "sqlite_timeout":
      return ["SQLITE_INTERRUPT", 9];
    case "database_full":
      return ["SQLITE_FULL", 13];
    case "sqlite_error":
      if (/constraint failed/.test(error.message)) return ["SQLITE_CONSTRAINT", 19];
      if (/^not authorized/.test(error.message)) return ["SQLITE_AUTH", 23];
      return ["SQLITE_ERROR", 1];
  }
}

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
  lastInsertRowid: number | string | null;
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
  return { ...raw, rows, lastInsertRowid: raw.lastInsertRowid ?? null };
}

async function post<T>(path: string, body: unknown): Promise<T> {
  try {
    return await apiJson<T>(path, { method: "POST", body: JSON.stringify(body) });
  } catch (e) {
    const code = e instanceof ValTownApiError ? sqliteCode(e) : undefined;
    if (code) throw new LibsqlError((e as Error).message, ...code);
    throw e;
  }
}

/** `execute(statement)`, or libsql's `execute(sql, args)`. */
async function execute(statement: InStatement, args?: InArgs): Promise<ResultSet> {
  const full = typeof statement === "string" && args !== undefined
    ? { sql: statement, args }
    : statement;
  return decode(await post<Raw>("/v1/sqlite/execute", { statement: encode(full) }));
}

/** All statements in one transaction: all of them happen, or none. */
async function batch(statements: InStatement[], mode?: TransactionMode): Promise<ResultSet[]> {
  const raw = await post<Raw[]>("/v1/sqlite/batch", {
    statements: statements.map(encode),
    ...(mode ? { mode } : {}),
  });
  return raw.map(decode);
}

export const sqlite = { execute, batch };
export default sqlite;
