// The account-wide database; valet has one database per user, so this is
// the same database as `std/sqlite` and `std/sqlite/main.ts`.
export * from "../../std/sqlite.ts";
export { default } from "../../std/sqlite.ts";
