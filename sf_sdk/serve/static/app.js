// sf-sdk live page: one WebSocket session (protocol: docs/serving.md).
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { ws: null, streaming: false, received: [], frames: 0, dropped: 0, latency: null,
                version: 0, switchSent: null, switchLatency: null, lastChunkMs: null, status: "connecting" };
window.sfState = state;

function log(text) { const el = $("log"); el.textContent = (text + "\n" + el.textContent).slice(0, 4000); }
function setStatus(text, cls) { state.status = text; $("status").textContent = text; $("status").className = cls || ""; }
function setStreaming(on) {
  state.streaming = on;
  $("start").disabled = on; $("stop").disabled = !on; $("reset").disabled = !on; $("switch").disabled = !on;
}
function send(msg) { if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg)); }

for (const [id, key] of [["prompt", "prompt"], ["seed", "seed"]]) if (params.has(key)) $(id).value = params.get(key);

function start() { send({ type: "start", prompt: $("prompt").value, seed: parseInt($("seed").value || "0", 10) }); }

function connect() {
  const token = params.get("token");
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws" +
              (token ? "?token=" + encodeURIComponent(token) : "");
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => { setStatus("connected", "ok"); if (params.get("autostart") === "1") start(); };
  ws.onclose = () => { setStatus("disconnected", "bad"); setStreaming(false); };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onControl(JSON.parse(ev.data)) : onFrame(ev.data));
}

function onControl(msg) {
  switch (msg.type) {
    case "hello": { const [h, w] = msg.frame_size; $("view").width = w; $("view").height = h; break; }
    case "started": setStreaming(true); setStatus("streaming", "ok"); log("started: " + msg.prompt); break;
    case "prompt_set": state.pendingVersion = msg.version; log("prompt (" + msg.transition + "): " + msg.prompt); break;
    case "stopped": setStreaming(false); setStatus("stopped"); break;
    case "busy": setStatus("busy: " + msg.message, "bad"); break;
    case "stats": state.lastChunkMs = msg.chunk_ms; $("chunk").textContent = msg.chunk_ms; break;
    case "shutdown": setStatus("server shutting down", "bad"); break;
    case "error": log("error " + msg.code + ": " + msg.message); break;
  }
}

async function onFrame(buf) {
  const view = new DataView(buf);
  const n = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  const now = Date.now() / 1000;
  const bitmap = await createImageBitmap(new Blob([new Uint8Array(buf, 4 + n)], { type: "image/jpeg" }));
  $("view").getContext("2d").drawImage(bitmap, 0, 0);
  state.frames += 1; state.dropped = header.dropped; state.latency = (now - header.ready) * 1000;
  if (state.frames % 4 === 0) send({ type: "ack", frame: header.frame });  // flow control: what arrived
  if (state.switchSent !== null && header.version >= state.pendingVersion) {
    state.switchLatency = (now - state.switchSent) * 1000; state.switchSent = null;
    log("first frame of the new prompt after " + state.switchLatency.toFixed(0) + " ms");
  }
  state.received.push(performance.now());
  while (state.received.length && performance.now() - state.received[0] > 2000) state.received.shift();
}

setInterval(() => {
  const fps = state.received.length >= 2 ? 1000 * (state.received.length - 1) /
    (state.received[state.received.length - 1] - state.received[0]) : 0;
  state.fps = fps;
  $("fps").textContent = fps.toFixed(1); $("frames").textContent = state.frames; $("dropped").textContent = state.dropped;
  $("latency").textContent = state.latency === null ? "-" : state.latency.toFixed(0);
}, 250);

$("start").onclick = start;
$("stop").onclick = () => send({ type: "stop" });
$("reset").onclick = () => send({ type: "reset" });
$("switch").onclick = () => {
  state.switchSent = Date.now() / 1000; state.pendingVersion = Infinity;
  send({ type: "set_prompt", prompt: $("next").value, transition: $("transition").value,
         chunks: parseInt($("chunks").value || "3", 10) });
};
connect();
