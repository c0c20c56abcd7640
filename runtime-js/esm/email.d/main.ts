export * from "../../std/email.ts";
export { default } from "../../std/email.ts";
