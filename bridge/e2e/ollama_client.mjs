// Drives an mtor bridge's Ollama API with the official ollama npm client
// (ollama-js).
//
//   node ollama_client.mjs <host>      (e.g. http://127.0.0.1:8080)
//
// The bridge must front "demo" (the demo backend: chat and embed) and
// "toolbox" (a backend announcing tools). Each check prints
// "ok <name> <json>"; any failure exits non-zero.
import assert from "node:assert/strict";
import { Ollama } from "ollama";

const host = process.argv[2];
const ollama = new Ollama({ host });
const ok = (name, detail = {}) => console.log(`ok ${name} ${JSON.stringify(detail)}`);

async function list() {
  const { models } = await ollama.list();
  const names = models.map((m) => m.name);
  assert.ok(names.includes("demo") && names.includes("toolbox"), `models ${names}`);
  const { version } = await ollama.version();
  assert.match(version, /^\d+\.\d+\.\d+/);
  const show = await ollama.show({ model: "toolbox" });
  assert.ok(show.capabilities.includes("tools"), JSON.stringify(show.capabilities));
  const ps = await ollama.ps();
  assert.ok(ps.models.length >= 2);
  await assert.rejects(ollama.show({ model: "no-such-model" }), (err) => err.status_code === 404);
  ok("list", { names, version });
}

async function chatStream() {
  const stream = await ollama.chat({
    model: "demo", stream: true,
    messages: [{ role: "user", content: "hello from ollama-js" }],
    options: { temperature: 0.2, num_predict: 100 },
  });
  let text = "", parts = 0, last = null;
  for await (const part of stream) {
    text += part.message.content;
    parts++;
    last = part;
  }
  assert.ok(last.done, "stream ended without done");
  assert.equal(last.done_reason, "stop");
  assert.match(text, /You said: hello from ollama-js/);
  assert.ok(parts >= 3, `only ${parts} parts`);
  assert.ok(last.eval_count > 0);
  const whole = await ollama.chat({ model: "demo", messages: [{ role: "user", content: "again" }] });
  assert.match(whole.message.content, /You said: again/);
  const gen = await ollama.generate({ model: "demo", prompt: "generate this" });
  assert.match(gen.response, /generate this/);
  ok("chat", { parts, text });
}

async function embed() {
  const res = await ollama.embed({ model: "demo", input: ["one", "two"] });
  assert.equal(res.embeddings.length, 2);
  assert.ok(res.embeddings[0].length > 0);
  ok("embed", { dims: res.embeddings[0].length });
}

async function tools() {
  const tools = [{
    type: "function",
    function: {
      name: "get_weather", description: "Current weather of a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  }];
  const messages = [{ role: "user", content: "Weather in Oslo?" }];
  const res = await ollama.chat({ model: "toolbox", messages, tools });
  const calls = res.message.tool_calls;
  assert.ok(calls?.length === 1, JSON.stringify(res.message));
  assert.equal(calls[0].function.name, "get_weather");
  assert.deepEqual(calls[0].function.arguments, { city: "Oslo" });
  messages.push(res.message, { role: "tool", content: "sunny, 21 C", tool_name: "get_weather" });
  const stream = await ollama.chat({ model: "toolbox", messages, tools, stream: true });
  let text = "";
  for await (const part of stream) text += part.message.content;
  assert.match(text, /sunny/);
  // The demo model has no tools: Ollama's 400.
  await assert.rejects(ollama.chat({ model: "demo", messages, tools }), (err) => err.status_code === 400);
  ok("tools", { call: calls[0].function, answer: text });
}

try {
  await list();
  await chatStream();
  await embed();
  await tools();
} catch (err) {
  console.error(err);
  process.exit(1);
}
