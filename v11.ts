import net from "node:net";
const s = net.connect({ path: "/tmp/review2/other.sock" });
s.on("connect", () => { console.log("connected!"); s.write("hello from val"); });
s.on("error", (e) => console.log("net.connect err", String(e).slice(0, 120)));
try { await Deno.connect({ transport: "unix", path: "/tmp/review2/other.sock" }); console.log("Deno.connect ok"); } catch (e) { console.log("Deno.connect err", String(e).slice(0, 100)); }
import process from "node:process";
const { Pipe, PipeConnectWrap, constants } = (process as any).binding("pipe_wrap");
try { const p = new Pipe(constants.SOCKET); const req = new PipeConnectWrap(); req.oncomplete = (st: number) => console.log("pipe connect status", st); console.log("pipe.connect ret", p.connect(req, "/tmp/review2/other.sock")); } catch (e) { console.log("pipe err", String(e).slice(0,100)); }
await new Promise((r) => setTimeout(r, 800));
export default () => {};
