// Images among text parts through an mtor bridge, driven by the official
// openai npm client.
//
//   node openai_vision.mjs <baseURL>      (e.g. http://127.0.0.1:8080/v1)
//
// The bridge must front a swarm serving "llava" from a server that answers
// with the order in which the last message's content parts reached it, one
// "kind value" per part joined by " | " (the Go test's fake vision server).
// Each check prints "ok <name> <json>"; any failure exits non-zero.
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.argv[2];
const client = new OpenAI({ baseURL, apiKey: process.env.MTOR_API_KEY ?? "none", maxRetries: 0, timeout: 120_000 });
const ok = (name, detail = {}) => console.log(`ok ${name} ${JSON.stringify(detail)}`);

// 1×1 images; the server reports their media types.
const png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
const jpeg = "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5PTgyPC4zNDL/wAALCAABAAEBAREA/8QAFAABAAAAAAAAAAAAAAAAAAAACf/EABQQAQAAAAAAAAAAAAAAAAAAAAD/2gAIAQEAAD8AKp//2Q==";
const text = (t) => ({ type: "text", text: t });
const image = (url) => ({ type: "image_url", image_url: { url } });

const cases = {
  // Each image between the words that name it.
  between: [[text("Left:"), image(png), text("Right:"), image(jpeg), text("Which is larger?")],
    "text Left: | image image/png | text Right: | image image/jpeg | text Which is larger?"],
  // An image before the question, and two in a row after a line break.
  first: [[image(jpeg), text("What is this?\nAnd these:"), image(png), image(png)],
    "image image/jpeg | text What is this?\nAnd these: | image image/png | image image/png"],
  // Text then image, the usual order: unchanged.
  usual: [[text("Describe it."), image(png)], "text Describe it. | image image/png"],
};

for (const [name, [content, want]] of Object.entries(cases)) {
  const messages = [{ role: "system", content: "Be brief." }, { role: "user", content }];
  const whole = await client.chat.completions.create({ model: "llava", messages });
  assert.equal(whole.choices[0].message.content, want, `${name}, whole`);
  const stream = await client.chat.completions.create({ model: "llava", messages, stream: true });
  let got = "";
  for await (const chunk of stream) got += chunk.choices[0]?.delta?.content ?? "";
  assert.equal(got, want, `${name}, streamed`);
  ok(name, { order: want });
}
