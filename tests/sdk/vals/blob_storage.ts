// The blob examples of the hosted docs (docs.val.town, "Blob Storage"), as
// written there, with their results checked.
import { blob } from "https://esm.town/v/std/blob";
import { ValTownBlobNotFoundError } from "https://esm.town/v/std/ValTownBlobNotFoundError";
import { expect, expectThrows } from "./_expect.ts";

// Get JSON: `undefined` if not found.
let blobDemo = await blob.getJSON("myKey");
expect("getJSON of a missing key", blobDemo, undefined);

// Set JSON, then get it back.
await blob.setJSON("myKey", { hello: "world" });
blobDemo = await blob.getJSON("myKey");
expect("setJSON then getJSON", blobDemo, { hello: "world" });

// Set any content; get any content as a Response.
await blob.set("myText", "String, stream, etc");
const text = await blob.get("myText").then((response) => response.text());
expect("set then get().text()", text, "String, stream, etc");
await blob.set("myStream", new Blob(["streamed ", "in parts"]).stream());
expect("a ReadableStream body", await (await blob.get("myStream")).text(), "streamed in parts");

// Binary data, as the picture save & read examples store it.
const picture = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
await blob.set("app_picture", picture);
const read = new Uint8Array(await (await blob.get("app_picture")).arrayBuffer());
expect("bytes round-trip", Array.from(read), Array.from(picture));

// List keys, all and by prefix.
await blob.setJSON("app_settings", { theme: "dark" });
const allKeys = await blob.list();
expect("list()", allKeys.map((b) => b.key), ["app_picture", "app_settings", "myKey", "myStream", "myText"]);
const appKeys = await blob.list("app_");
expect("list(prefix)", appKeys.map((b) => [b.key, b.size]), [["app_picture", 8], ["app_settings", 16]]);
expect("lastModified is an ISO date", appKeys.every((b) => !Number.isNaN(Date.parse(b.lastModified))), true);

// Copy and move.
await blob.copy("myKey", "myKeyCopy");
expect("copy", await blob.getJSON("myKeyCopy"), { hello: "world" });
await blob.move("myKeyCopy", "myKeyNew");
expect("move: the new key", await blob.getJSON("myKeyNew"), { hello: "world" });
expect("move: the old key is gone", await blob.getJSON("myKeyCopy"), undefined);

// Delete by key; `get` of a missing key throws ValTownBlobNotFoundError.
await blob.delete("myKey");
const error = await expectThrows("get of a deleted key", () => blob.get("myKey"));
expect("the error class", error instanceof ValTownBlobNotFoundError, true);
