export * from "../../std/blob.ts";
export { default } from "../../std/blob.ts";
