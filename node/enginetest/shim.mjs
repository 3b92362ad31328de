// A real inference engine for mtor's tests: llama.cpp (through node-llama-cpp)
// behind a small HTTP shim that speaks the OpenAI-compatible API and Ollama's
// native API. Generation is real; only the HTTP framing lives here.
//
//   node shim.mjs --model FILE.gguf [--name tiny] [--sequences 4] [--context 2048]
//
// It listens on 127.0.0.1 on a free port, prints that port alone on the first
// line of stdout, and exits when stdin closes or on SIGTERM/SIGINT.
// /debug/stats and /debug/wait expose counters so tests can see that a
// client's disconnect stopped generation; /debug/generations lists the last
// generations (the assistant text continued, the text written, why it ended).
import http from "node:http";
import {parseArgs} from "node:util";
import {getLlama, LlamaCompletion, TokenBias} from "node-llama-cpp";

const {values: args} = parseArgs({options: {
    model: {type: "string"},
    name: {type: "string", default: "tiny"},
    sequences: {type: "string", default: "4"},
    context: {type: "string", default: "2048"},
}});
if (!args.model) {
    console.error("usage: node shim.mjs --model FILE.gguf [--name NAME] [--sequences N] [--context N]");
    process.exit(2);
}
const MODEL = args.name;
const SEQUENCES = Number(args.sequences);
const MAX_BODY = 32 << 20; // bytes of one request body
const MAX_WAITING = 64;    // requests queued for a free sequence
const DEFAULT_MAX_TOKENS = 128;

// Exit with the parent: on SIGTERM/SIGINT, or when stdin closes (the
// parent died or is done). Watched from the start, so loading is no window.
let server;
function shutdown() {
    server?.close();
    server?.closeAllConnections();
    process.exit(0);
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
if (!process.stdin.isTTY) {
    process.stdin.on("end", shutdown);
    process.stdin.on("close", shutdown);
    process.stdin.resume();
}

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: args.model});
// threads: 1 — the default thread count spins on small machines.
const context = await model.createContext({contextSize: Number(args.context), sequences: SEQUENCES, threads: 1});
const embedder = await model.createEmbeddingContext({contextSize: Number(args.context), threads: 1});

// Random weights happily emit byte tokens and EOS; keep the output to
// printable text and let max_tokens end it, so tests see a steady stream.
const bias = new TokenBias(model.tokenizer);
for (const t of model.iterateAllTokens()) {
    if (model.isEogToken(t) || model.isSpecialToken(t) || !/^[\x20-\x7e]+$/.test(model.detokenize([t])))
        bias.set(t, "never");
}

// A pool of context sequences, one per running request.
const free = [];
for (let i = 0; i < SEQUENCES; i++) free.push(context.getSequence());
const waiting = [];
function acquire(signal) {
    if (free.length > 0) return Promise.resolve(free.pop());
    if (waiting.length >= MAX_WAITING) return Promise.reject(httpError(503, "too many queued requests"));
    return new Promise((resolve, reject) => {
        const w = {resolve, reject};
        waiting.push(w);
        signal.addEventListener("abort", () => {
            const i = waiting.indexOf(w);
            if (i >= 0) waiting.splice(i, 1);
            reject(signal.reason);
        }, {once: true});
    });
}
async function release(seq) {
    await seq.clearHistory();
    const w = waiting.shift();
    if (w) w.resolve(seq); else free.push(seq);
}

// Counters for tests, and waiters for /debug/wait.
const stats = {requests: 0, started: 0, completed: 0, aborted: 0, active: 0, tokens: 0};
const watchers = new Set();
function bump(field, d = 1) {
    stats[field] += d;
    for (const w of watchers) w();
}

function httpError(status, message) {
    return Object.assign(new Error(message), {status});
}

function readJSON(req) {
    return new Promise((resolve, reject) => {
        const parts = [];
        let size = 0;
        req.on("data", (b) => {
            size += b.length;
            if (size > MAX_BODY) { reject(httpError(413, "request body too large")); req.destroy(); return; }
            parts.push(b);
        });
        req.on("end", () => {
            try { resolve(JSON.parse(Buffer.concat(parts).toString("utf8") || "{}")); }
            catch { reject(httpError(400, "request body is not valid JSON")); }
        });
        req.on("error", reject);
    });
}

function checkModel(name) {
    if (name !== MODEL && name !== MODEL + ":latest")
        throw httpError(404, `model "${name}" not found`);
}

// Messages become a plain transcript; the model has no chat template. A
// final assistant message is continued, not answered (prefill), as
// llama.cpp's server, vLLM (continue_final_message) and Ollama do: the
// prompt ends inside that message, so the model writes what follows it.
// prefix is that message's text ("" when there is none).
function promptFrom(messages) {
    if (!Array.isArray(messages) || messages.length === 0) throw httpError(400, "messages must be a non-empty array");
    const lines = messages.map((m) => {
        let text = m.content ?? "";
        if (Array.isArray(text)) {
            if (text.some((p) => p.type !== "text")) throw httpError(400, "this model does not support image input");
            text = text.map((p) => p.text ?? "").join("");
        }
        if (Array.isArray(m.images) && m.images.length > 0) throw httpError(400, "this model does not support image input");
        if (typeof text !== "string") throw httpError(400, "message content must be a string or content parts");
        return {role: m.role, text};
    });
    const last = lines[lines.length - 1];
    const prefill = last.role === "assistant";
    const head = prefill ? lines.slice(0, -1) : lines;
    const prompt = head.map((l) => `${l.role}: ${l.text}`).join("\n") + "\nassistant:" + (prefill ? last.text : "");
    return {prompt, prefix: prefill ? last.text : ""};
}

// The last generations, for tests that check what an engine was asked to
// continue and what it wrote (GET /debug/generations).
const MAX_LOG = 256;
const generations = [];
function logGeneration(g) {
    generations.push(g);
    if (generations.length > MAX_LOG) generations.shift();
}

// generate runs one completion on a pooled sequence and streams text to
// onText. It stops when signal aborts (the HTTP client went away).
async function generate({prompt, prefix}, opts, signal, onText) {
    const seq = await acquire(signal);
    let written = "";
    const completion = new LlamaCompletion({contextSequence: seq});
    bump("started");
    bump("active");
    let tokens = 0;
    try {
        const res = await completion.generateCompletionWithMeta(prompt, {
            signal, stopOnAbortSignal: true,
            maxTokens: opts.maxTokens > 0 ? opts.maxTokens : DEFAULT_MAX_TOKENS,
            temperature: opts.temperature ?? 0,
            topP: opts.topP, seed: opts.seed,
            customStopTriggers: opts.stop?.length ? opts.stop : undefined,
            tokenBias: bias,
            onToken: (t) => { tokens += t.length; bump("tokens", t.length); },
            onTextChunk: (text) => { if (!signal.aborted) { written += text; onText(text); } },
        });
        const reason = signal.aborted || res.metadata.stopReason === "abort" ? "abort"
            : res.metadata.stopReason === "maxTokens" ? "length" : "stop";
        bump(reason === "abort" ? "aborted" : "completed");
        logGeneration({prefix, text: written, reason, stop: res.metadata.stopReason, tokens});
        return {reason, promptTokens: model.tokenize(prompt).length, completionTokens: tokens};
    } catch (err) {
        if (signal.aborted) { bump("aborted"); logGeneration({prefix, text: written, reason: "abort"}); return {reason: "abort"}; }
        throw err;
    } finally {
        bump("active", -1);
        completion.dispose();
        await release(seq);
    }
}

let embedQueue = Promise.resolve();
function embed(inputs) {
    const run = embedQueue.then(async () => {
        const out = [];
        for (const s of inputs) {
            const v = Array.from((await embedder.getEmbeddingFor(s)).vector);
            const norm = Math.hypot(...v) || 1;
            out.push(v.map((x) => x / norm));
        }
        return out;
    });
    embedQueue = run.catch(() => {});
    return run;
}
function embedInputs(input) {
    const inputs = typeof input === "string" ? [input] : input;
    if (!Array.isArray(inputs) || inputs.length === 0 || inputs.some((s) => typeof s !== "string"))
        throw httpError(400, "input must be a string or a non-empty array of strings");
    return inputs;
}

const created = Math.floor(Date.now() / 1000);
const send = (res, status, body) => {
    res.writeHead(status, {"content-type": "application/json"});
    res.end(JSON.stringify(body));
};

// --- OpenAI-compatible API ---------------------------------------------

async function openaiChat(req, res, signal) {
    const body = await readJSON(req);
    checkModel(body.model);
    const prompt = promptFrom(body.messages);
    const opts = {maxTokens: body.max_completion_tokens ?? body.max_tokens, temperature: body.temperature,
        topP: body.top_p, seed: body.seed, stop: typeof body.stop === "string" ? [body.stop] : body.stop};
    const id = "chatcmpl-" + Math.random().toString(36).slice(2);
    const base = {id, created: Math.floor(Date.now() / 1000), model: body.model};
    if (!body.stream) {
        let text = "";
        const r = await generate(prompt, opts, signal, (t) => { text += t; });
        if (r.reason === "abort") return;
        return send(res, 200, {...base, object: "chat.completion",
            choices: [{index: 0, message: {role: "assistant", content: text}, finish_reason: r.reason}],
            usage: usage(r)});
    }
    const event = (obj) => res.write(`data: ${JSON.stringify(obj)}\n\n`);
    const chunk = (delta, finish) => event({...base, object: "chat.completion.chunk",
        choices: [{index: 0, delta, finish_reason: finish}]});
    let head = false;
    const start = () => {
        if (head) return;
        head = true;
        res.writeHead(200, {"content-type": "text/event-stream", "cache-control": "no-cache"});
        chunk({role: "assistant", content: ""}, null);
    };
    const r = await generate(prompt, opts, signal, (t) => { start(); chunk({content: t}, null); });
    if (r.reason === "abort") return;
    start();
    chunk({}, r.reason);
    if (body.stream_options?.include_usage) event({...base, object: "chat.completion.chunk", choices: [], usage: usage(r)});
    res.end("data: [DONE]\n\n");
}

const usage = (r) => ({prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens,
    total_tokens: r.promptTokens + r.completionTokens});

async function openaiEmbeddings(req, res) {
    const body = await readJSON(req);
    checkModel(body.model);
    const inputs = embedInputs(body.input);
    const vectors = await embed(inputs);
    const n = inputs.reduce((a, s) => a + model.tokenize(s).length, 0);
    send(res, 200, {object: "list", model: body.model,
        data: vectors.map((embedding, index) => ({object: "embedding", index, embedding})),
        usage: {prompt_tokens: n, total_tokens: n}});
}

// --- Ollama API --------------------------------------------------------

const details = {format: "gguf", family: "llama", families: ["llama"], parameter_size: "tiny", quantization_level: "F32"};

async function ollamaShow(req, res) {
    const body = await readJSON(req);
    checkModel(body.model ?? body.name);
    send(res, 200, {modelfile: "", parameters: "", template: "{{ .Prompt }}", details,
        model_info: {"general.architecture": "llama", "llama.context_length": model.trainContextSize,
            "llama.embedding_length": model.embeddingVectorSize},
        capabilities: ["completion", "embedding"]});
}

async function ollamaChat(req, res, signal) {
    const body = await readJSON(req);
    checkModel(body.model);
    const prompt = promptFrom(body.messages);
    const o = body.options ?? {};
    const opts = {maxTokens: o.num_predict, temperature: o.temperature, topP: o.top_p, seed: o.seed, stop: o.stop};
    const t0 = process.hrtime.bigint();
    const line = (obj) => res.write(JSON.stringify({model: body.model, created_at: new Date().toISOString(), ...obj}) + "\n");
    const stream = body.stream ?? true;
    let text = "", head = false;
    const r = await generate(prompt, opts, signal, (t) => {
        if (!stream) { text += t; return; }
        if (!head) { head = true; res.writeHead(200, {"content-type": "application/x-ndjson"}); }
        line({message: {role: "assistant", content: t}, done: false});
    });
    if (r.reason === "abort") return;
    const final = {message: {role: "assistant", content: stream ? "" : text}, done: true, done_reason: r.reason,
        total_duration: Number(process.hrtime.bigint() - t0), prompt_eval_count: r.promptTokens, eval_count: r.completionTokens};
    if (!stream) return send(res, 200, {model: body.model, created_at: new Date().toISOString(), ...final});
    if (!head) res.writeHead(200, {"content-type": "application/x-ndjson"});
    line(final);
    res.end();
}

async function ollamaEmbed(req, res) {
    const body = await readJSON(req);
    checkModel(body.model);
    const inputs = embedInputs(body.input);
    const embeddings = await embed(inputs);
    send(res, 200, {model: body.model, embeddings,
        prompt_eval_count: inputs.reduce((a, s) => a + model.tokenize(s).length, 0)});
}

// --- debug -------------------------------------------------------------

// /debug/wait?field=aborted&min=1&timeout_ms=30000 answers once
// stats[field] >= min (200) or when the timeout passes (408).
function debugWait(url, res) {
    const field = url.searchParams.get("field");
    const min = Number(url.searchParams.get("min") ?? "1");
    const timeout = Math.min(Number(url.searchParams.get("timeout_ms") ?? "30000"), 600000);
    if (!(field in stats)) return send(res, 400, {error: `unknown field ${field}`});
    const check = () => {
        if (stats[field] < min) return false;
        watchers.delete(check);
        clearTimeout(timer);
        send(res, 200, stats);
        return true;
    };
    const timer = setTimeout(() => { watchers.delete(check); send(res, 408, stats); }, timeout);
    res.on("close", () => { watchers.delete(check); clearTimeout(timer); });
    if (!check()) watchers.add(check);
}

// --- server ------------------------------------------------------------

const routes = {
    "GET /v1/models": (req, res) => send(res, 200, {object: "list",
        data: [{id: MODEL, object: "model", created, owned_by: "mtor-test-engine",
            // As llama.cpp's server reports it.
            meta: {n_ctx_train: model.trainContextSize, n_embd: model.embeddingVectorSize}}]}),
    "POST /v1/chat/completions": openaiChat,
    "POST /v1/embeddings": openaiEmbeddings,
    "GET /": (req, res) => { res.writeHead(200, {"content-type": "text/plain"}); res.end("Ollama is running"); },
    "GET /api/version": (req, res) => send(res, 200, {version: "0.0.0-mtor-test-engine"}),
    "GET /api/tags": (req, res) => send(res, 200, {models: [{name: MODEL, model: MODEL,
        modified_at: new Date(created * 1000).toISOString(), size: model.size, digest: "0".repeat(64), details}]}),
    "POST /api/show": ollamaShow,
    "POST /api/chat": ollamaChat,
    "POST /api/embed": ollamaEmbed,
    "GET /debug/stats": (req, res) => send(res, 200, stats),
    "GET /debug/generations": (req, res) => send(res, 200, generations),
};

server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://localhost");
    const ollama = url.pathname.startsWith("/api/");
    // The client's disconnect aborts whatever the request is doing.
    const ac = new AbortController();
    res.on("close", () => { if (!res.writableFinished) ac.abort(new Error("client disconnected")); });
    bump("requests");
    try {
        if (req.method === "GET" && url.pathname === "/debug/wait") return debugWait(url, res);
        const route = routes[`${req.method} ${url.pathname}`];
        if (!route) throw httpError(404, `no route ${req.method} ${url.pathname}`);
        await route(req, res, ac.signal);
    } catch (err) {
        if (ac.signal.aborted) return;
        const status = err.status ?? 500;
        if (status >= 500) console.error(err);
        if (res.headersSent) {
            // Mid-stream: the only way to tell the client is in-band, as the APIs do.
            res.end(ollama ? JSON.stringify({error: err.message}) + "\n" : `data: ${JSON.stringify({error: {message: err.message}})}\n\n`);
            return;
        }
        send(res, status, ollama ? {error: err.message}
            : {error: {message: err.message, type: status === 404 ? "not_found_error" : "invalid_request_error", code: status}});
    }
});

server.listen(0, "127.0.0.1", () => {
    process.stdout.write(`${server.address().port}\n`);
});
