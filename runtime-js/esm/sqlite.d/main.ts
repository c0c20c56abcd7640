export * from "../../std/sqlite.ts";
export { default } from "../../std/sqlite.ts";
