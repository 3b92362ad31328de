// Drives an mtor bridge with the official openai npm client.
//
//   node openai_client.mjs <baseURL>      (e.g. http://127.0.0.1:8080/v1)
//
// The API key comes from MTOR_API_KEY. The bridge must front a swarm that
// serves the demo backend's models "demo" (fast) and "slow". Each check
// prints one line "ok <name> <json>"; any failure exits non-zero. The last
// check aborts a stream mid-way; the Go test that runs this script then
// asserts that the worker's query was cancelled.
import assert from "node:assert/strict";
import OpenAI, { toFile } from "openai";

const baseURL = process.argv[2];
const apiKey = process.env.MTOR_API_KEY ?? "";
if (!baseURL) {
  console.error("usage: node openai_client.mjs <baseURL>");
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });

function ok(name, detail = {}) {
  console.log(`ok ${name} ${JSON.stringify(detail)}`);
}

async function modelsList() {
  const ids = [];
  for await (const m of client.models.list()) {
    assert.equal(m.object, "model");
    assert.equal(m.owned_by, "mtor swarm");
    ids.push(m.id);
  }
  assert.ok(ids.includes("demo") && ids.includes("slow"), `models: ${ids}`);
  const one = await client.models.retrieve("demo");
  assert.equal(one.id, "demo");
  ok("models", { ids });
}

async function chat() {
  const { data, response } = await client.chat.completions
    .create({
      model: "demo",
      messages: [
        { role: "system", content: "be brief" },
        { role: "user", content: "hello from the openai client" },
      ],
      temperature: 0.2,
      max_tokens: 100,
    })
    .withResponse();
  const choice = data.choices[0];
  assert.equal(data.object, "chat.completion");
  assert.equal(choice.message.role, "assistant");
  assert.match(choice.message.content, /You said: hello from the openai client/);
  assert.equal(choice.finish_reason, "stop");
  assert.ok(data.usage.total_tokens > 0);
  const peer = response.headers.get("x-mtor-peer");
  assert.ok(peer, "X-Mtor-Peer header");
  ok("chat", { content: choice.message.content, peer, usage: data.usage });
}

async function chatStream() {
  const stream = await client.chat.completions.create({
    model: "demo",
    messages: [{ role: "user", content: "stream to the openai client" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const deltas = [];
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    if (c.delta.content) deltas.push(c.delta.content);
    if (c.finish_reason) finish = c.finish_reason;
  }
  const text = deltas.join("");
  assert.match(text, /You said: stream to the openai client/);
  assert.ok(deltas.length > 3, `only ${deltas.length} deltas`);
  assert.equal(finish, "stop");
  assert.ok(usage && usage.completion_tokens > 0, "usage chunk");
  ok("stream", { deltas: deltas.length, text, usage });
}

async function errors() {
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] }),
    (err) => {
      assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err}`);
      assert.equal(err.status, 404);
      assert.equal(err.code, "model_not_found");
      return true;
    },
  );
  const badKey = new OpenAI({ baseURL, apiKey: "not-the-key", maxRetries: 0 });
  await assert.rejects(badKey.models.list(), (err) => {
    assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err}`);
    assert.equal(err.status, 401);
    return true;
  });
  await assert.rejects(
    client.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "x" }], temperature: 7 }),
    (err) => err instanceof OpenAI.BadRequestError && err.param === "temperature",
  );
  ok("errors", { notFound: 404, badKey: 401, badRequest: 400 });
}

async function embeddings() {
  // The client asks for base64 by default and decodes it itself.
  const b64 = await client.embeddings.create({ model: "demo", input: ["alpha", "beta"] });
  const flt = await client.embeddings.create({ model: "demo", input: ["alpha", "beta"], encoding_format: "float" });
  assert.equal(b64.data.length, 2);
  for (let i = 0; i < 2; i++) {
    assert.equal(b64.data[i].index, i);
    assert.ok(b64.data[i].embedding.length > 0);
    assert.deepEqual(
      b64.data[i].embedding.map((x) => Math.fround(x)),
      flt.data[i].embedding.map((x) => Math.fround(x)),
    );
  }
  ok("embeddings", { dims: b64.data[0].embedding.length });
}

async function media() {
  const img = await client.images.generate({ prompt: "a fox", response_format: "b64_json", size: "256x256" });
  const png = Buffer.from(img.data[0].b64_json, "base64");
  assert.equal(png.subarray(1, 4).toString(), "PNG");
  const speech = await client.audio.speech.create({ model: "demo", input: "hello", voice: "alloy", response_format: "wav" });
  const wav = Buffer.from(await speech.arrayBuffer());
  assert.equal(wav.subarray(0, 4).toString(), "RIFF");
  const tr = await client.audio.transcriptions.create({ model: "demo", file: await toFile(wav, "hello.wav") });
  assert.match(tr.text, /bytes of audio received/);
  ok("media", { png: png.length, wav: wav.length, text: tr.text });
}

async function abort() {
  const controller = new AbortController();
  const words = Array.from({ length: 5000 }, (_, i) => `w${i}`).join(" ");
  const stream = await client.chat.completions.create(
    { model: "slow", stream: true, messages: [{ role: "user", content: `ABORT-TEST ${words}` }] },
    { signal: controller.signal },
  );
  let deltas = 0;
  let finished = false;
  try {
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta?.content) deltas++;
      if (chunk.choices[0]?.finish_reason) finished = true;
      if (deltas === 2) controller.abort();
    }
    // The client's stream ends its iteration quietly when aborted.
  } catch (err) {
    assert.ok(err instanceof OpenAI.APIUserAbortError || err.name === "AbortError", `got ${err?.constructor?.name}: ${err}`);
  }
  assert.ok(controller.signal.aborted, "not aborted");
  // Events already read with the one that triggered the abort are still
  // handed out: a client starved for a moment (CI runs packages side by
  // side) reads several of the slow model's 30 ms words at once. A stream
  // the abort did not stop would run on to its 5 000 words.
  assert.ok(!finished && deltas >= 2 && deltas <= 50, `the stream went on after the abort: ${deltas} deltas, finished=${finished}`);
  ok("abort", { deltas });
}

try {
  await modelsList();
  await chat();
  await chatStream();
  await errors();
  await embeddings();
  await media();
  await abort();
} catch (err) {
  console.error(err);
  process.exit(1);
}
