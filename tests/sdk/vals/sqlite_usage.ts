// The SQLite examples of the hosted docs (docs.val.town, "SQLite / Usage"),
// as written there, with their results checked.
import { sqlite } from "https://esm.town/v/std/sqlite";
import { expect, expectThrows } from "./_expect.ts";

// Simple query.
const data = await sqlite.execute("SELECT datetime();");
expect("datetime() answers one row", data.rows.length, 1);

// Basic usage.
await sqlite.execute(`create table if not exists kv(
  key text unique,
  value text
)`);
const key = crypto.randomUUID();
await sqlite.execute({ sql: `insert into kv(key, value) values(?, ?)`, args: [key, "value1"] });
const result = await sqlite.execute({ sql: `select * from kv where key = ?`, args: [key] });
expect("columns", result.columns, ["key", "value"]);
expect("columnTypes", result.columnTypes, ["TEXT", "TEXT"]);
expect("rows", result.rows, [[key, "value1"]]);
expect("rowsAffected", result.rowsAffected, 0);
expect("lastInsertRowid", result.lastInsertRowid, null);
const rows = result.rows as any;
expect("a row by column name", [rows[0].key, rows[0].value], [key, "value1"]);

// Insert and delete with named arguments.
await sqlite.execute({
  sql: `insert into kv(key, value) values (:key, :value)`,
  args: { key: "specialkey", value: "specialvalue" },
});
const got = await sqlite.execute(`select key, value from kv where key = 'specialkey'`);
expect("named insert", got.rows, [["specialkey", "specialvalue"]]);
const deleted = await sqlite.execute({ sql: `delete from kv where key = :key`, args: { key: "specialkey" } });
expect("delete rowsAffected", deleted.rowsAffected, 1);

// Batch queries.
const charge = 10;
await sqlite.execute(`create table if not exists accounts(person_id text unique, balance integer)`);
await sqlite.execute(`insert into accounts values ('Bob', 100), ('Alice', 0)`);
const batchSqlite = await sqlite.batch([
  `create table if not exists accounts(person_id text unique, balance integer)`,
  { sql: `update accounts set balance = balance - :charge where person_id = 'Bob'`, args: { charge } },
  { sql: `update accounts set balance = balance + :charge where person_id = 'Alice'`, args: { charge } },
]);
expect("batch results", batchSqlite.map((r) => r.rowsAffected), [0, 1, 1]);
const balances = await sqlite.execute(`select person_id, balance from accounts order by person_id`);
expect("balances", balances.rows, [["Alice", 10], ["Bob", 90]]);

// A result serialises as the hosted API's JSON.
expect("JSON of a result", JSON.parse(JSON.stringify(balances)).rows, [["Alice", 10], ["Bob", 90]]);

// A failing statement: a LibsqlError with SQLite's code, as on the hosted platform.
const error = await expectThrows("a duplicate key", () =>
  sqlite.execute({ sql: `insert into kv(key, value) values(?, ?)`, args: [key, "again"] })) as any;
expect("the error", [error.name, error.code], ["LibsqlError", "SQLITE_CONSTRAINT"]);
expect("its message", error.message.startsWith("SQLITE_CONSTRAINT: UNIQUE constraint failed"), true);
