// Drives a stopping mtor bridge with the official openai npm client.
//
//   node openai_shutdown.mjs <baseURL>      (e.g. http://127.0.0.1:8080/v1)
//
// It starts a whole-answer query and a stream on the slow model, prints
// "ready" once the stream has given two deltas, and waits: the Go test
// then stops the bridge with no grace. Both queries must end with the
// bridge's error, code bridge_stopping (a 503 for the whole answer, the
// stream's last event for the stream), as the client reads it. Each check
// prints "ok <name> <json>"; any failure exits non-zero.
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.argv[2];
if (!baseURL) {
  console.error("usage: node openai_shutdown.mjs <baseURL>");
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey: "none", maxRetries: 0, timeout: 60_000 });
const words = (tag) => `${tag} ` + Array.from({ length: 5000 }, (_, i) => `w${i}`).join(" ");

function ok(name, detail = {}) {
  console.log(`ok ${name} ${JSON.stringify(detail)}`);
}

function isStopping(err) {
  assert.ok(err instanceof OpenAI.APIError, `got ${err?.constructor?.name}: ${err}`);
  assert.equal(err.code, "bridge_stopping", `code ${err.code}: ${err.message}`);
  return true;
}

try {
  const whole = client.chat.completions.create({ model: "slow", messages: [{ role: "user", content: words("SHUTDOWN-WHOLE") }] });
  const wholeDone = assert.rejects(whole, (err) => {
    isStopping(err);
    assert.equal(err.status, 503);
    assert.ok(err.headers?.get("retry-after"), "Retry-After");
    return true;
  });
  const stream = await client.chat.completions.create({
    model: "slow",
    stream: true,
    messages: [{ role: "user", content: words("SHUTDOWN-STREAM") }],
  });
  let deltas = 0;
  let finished = false;
  await assert.rejects(
    (async () => {
      for await (const chunk of stream) {
        if (chunk.choices[0]?.delta?.content) deltas++;
        if (chunk.choices[0]?.finish_reason) finished = true;
        if (deltas === 2) console.log("ready");
      }
    })(),
    isStopping,
  );
  assert.ok(deltas >= 2 && !finished, `${deltas} deltas, finished=${finished}`);
  ok("stream", { deltas });
  await wholeDone;
  ok("whole", { status: 503 });
} catch (err) {
  console.error(err);
  process.exit(1);
}
