// Tool calling and structured output through an mtor bridge, driven by the
// official openai npm client.
//
//   node openai_tools.mjs <baseURL>      (e.g. http://127.0.0.1:8080/v1)
//
// The bridge must front a swarm serving "toolbox" (a model whose backend
// announces tools and json_schema; the Go test puts a fake
// OpenAI-compatible server behind it, or the real engine) and "demo" (the
// demo backend: no tools). TOOLS_MODEL overrides "toolbox". Each check
// prints "ok <name> <json>"; any failure exits non-zero.
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.argv[2];
const model = process.env.TOOLS_MODEL ?? "toolbox";
const skip = new Set((process.env.SKIP ?? "").split(",").filter(Boolean));
const client = new OpenAI({ baseURL, apiKey: process.env.MTOR_API_KEY ?? "none", maxRetries: 0, timeout: 120_000 });

const ok = (name, detail = {}) => console.log(`ok ${name} ${JSON.stringify(detail)}`);

const tools = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather of a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", enum: ["Oslo", "Paris"] } },
      required: ["city"],
      additionalProperties: false,
    },
  },
}];
const question = [{ role: "user", content: "What is the weather in Oslo? Use the tool." }];

// The model's call, answered by "running" the tool here.
function runTool(call) {
  assert.equal(call.type, "function");
  assert.equal(call.function.name, "get_weather");
  const args = JSON.parse(call.function.arguments);
  assert.ok(["Oslo", "Paris"].includes(args.city), `arguments ${call.function.arguments}`);
  return { role: "tool", tool_call_id: call.id, content: `sunny, 21 C in ${args.city}` };
}

async function roundTrip() {
  const first = await client.chat.completions.create({ model, messages: question, tools, tool_choice: "required" });
  const c = first.choices[0];
  assert.equal(c.finish_reason, "tool_calls");
  assert.equal(c.message.role, "assistant");
  assert.ok(c.message.tool_calls?.length >= 1, JSON.stringify(c.message));
  const call = c.message.tool_calls[0];
  assert.match(call.id, /\S/);
  const toolMsg = runTool(call);
  const second = await client.chat.completions.create({
    model, tools, messages: [...question, c.message, toolMsg],
  });
  const answer = second.choices[0];
  assert.equal(answer.finish_reason, "stop");
  assert.ok(answer.message.content.length > 0);
  ok("tools", { call: call.function, answer: answer.message.content, finish: c.finish_reason });
}

async function roundTripStream() {
  // The SDK's stream helper rebuilds tool calls from their deltas.
  const runner = client.chat.completions.stream({ model, messages: question, tools, tool_choice: "required" });
  let deltas = 0;
  runner.on("chunk", (ch) => { if (ch.choices[0]?.delta?.tool_calls) deltas++; });
  const first = await runner.finalChatCompletion();
  const c = first.choices[0];
  assert.equal(c.finish_reason, "tool_calls");
  assert.ok(c.message.tool_calls?.length >= 1);
  const call = c.message.tool_calls[0];
  const toolMsg = runTool(call);
  const stream = await client.chat.completions.create({
    model, tools, stream: true, messages: [...question, { role: "assistant", content: null, tool_calls: c.message.tool_calls }, toolMsg],
  });
  let text = "", finish = null;
  for await (const ch of stream) {
    const x = ch.choices[0];
    if (!x) continue;
    text += x.delta.content ?? "";
    if (x.finish_reason) finish = x.finish_reason;
  }
  assert.equal(finish, "stop");
  assert.ok(text.length > 0);
  ok("tools_stream", { call: call.function, deltas, answer: text });
}

async function jsonSchema() {
  const schema = {
    type: "object",
    properties: { city: { type: "string", enum: ["Oslo", "Paris"] }, sunny: { type: "boolean" } },
    required: ["city", "sunny"],
    additionalProperties: false,
  };
  const res = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Describe Oslo's weather as JSON." }],
    response_format: { type: "json_schema", json_schema: { name: "weather", schema, strict: true } },
    max_tokens: 64,
  });
  const content = res.choices[0].message.content;
  const v = JSON.parse(content);
  assert.ok(["Oslo", "Paris"].includes(v.city) && typeof v.sunny === "boolean", content);
  ok("json_schema", { content, finish: res.choices[0].finish_reason });
}

async function unsupported() {
  const cases = [
    [{ model: "demo", messages: question, tools }, "tools"],
    [{ model: "demo", messages: question, response_format: { type: "json_object" } }, "response_format"],
    [{ model, messages: question, logit_bias: { "42": 5 } }, "logit_bias"],
    [{ model, messages: question, n: 2 }, "n"],
    [{ model, messages: question, tools, tool_choice: "sometimes" }, "tool_choice"],
  ];
  for (const [body, param] of cases) {
    await assert.rejects(client.chat.completions.create(body), (err) => {
      assert.ok(err instanceof OpenAI.BadRequestError, `${param}: ${err}`);
      assert.equal(err.status, 400);
      assert.equal(err.param, param);
      assert.equal(err.type, "invalid_request_error");
      return true;
    });
  }
  ok("unsupported", { cases: cases.length });
}

try {
  for (const [name, f] of [["tools", roundTrip], ["tools_stream", roundTripStream], ["json_schema", jsonSchema], ["unsupported", unsupported]]) {
    if (!skip.has(name)) await f();
  }
} catch (err) {
  console.error(err);
  process.exit(1);
}
