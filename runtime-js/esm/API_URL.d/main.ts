export * from "../../std/API_URL.ts";
