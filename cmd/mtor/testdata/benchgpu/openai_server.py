#!/usr/bin/env python3
"""A tiny OpenAI-compatible server for `make bench-gpu`: one local causal
language model (transformers, fp16 on the first CUDA GPU), serving
GET /v1/models and POST /v1/chat/completions, streamed (SSE) or whole.

Only for the energy benchmark: no auth, loopback only, one model, requests
bounded (1 MiB bodies, max_tokens <= 1024). Concurrent requests run in
their own threads and share the GPU, as a naive server would.

With --random-weights, MODEL_DIR needs only a config.json: the model of
that shape is built on the GPU with random weights, and a stand-in byte
tokenizer replaces the model's. That is for a machine no model's weights
can reach: the answers are noise, but each token takes the same layers and
sizes, so the GPU's work and energy per token are the real model's. Every
answer is then exactly max_tokens long (no end-of-sequence stops it early).

usage: openai_server.py MODEL_DIR PORT [--random-weights]
"""
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20
MAX_TOKENS = 1024


class ByteTokenizer:
    """The stand-in tokenizer of --random-weights: a prompt's UTF-8 bytes
    are its token ids, and a generated id reads as the word "t<id>". Only
    what the server and transformers' TextIteratorStreamer call."""

    chat_template = None

    def __init__(self, torch, eos_token_id):
        self.torch, self.eos_token_id = torch, eos_token_id

    def __call__(self, text, return_tensors=None):
        ids = self.torch.tensor([list(text.encode())], dtype=self.torch.long)
        return Encoding(input_ids=ids, attention_mask=self.torch.ones_like(ids))

    def decode(self, ids, **kwargs):
        # A space after each word: the streamer passes on text up to the
        # last space, so each token is sent as soon as it is made.
        return "".join(f"t{int(i)} " for i in ids)


class Encoding(dict):
    def to(self, device):
        return Encoding({k: v.to(device) for k, v in self.items()})


def load(model_dir, random_weights):
    """The model on the first CUDA GPU in fp16, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def fp16(build, *args, **kwargs):
        # transformers 4.56 renamed torch_dtype to dtype; older ones take
        # only torch_dtype.
        try:
            return build(*args, dtype=torch.float16, **kwargs)
        except TypeError:
            return build(*args, torch_dtype=torch.float16, **kwargs)

    if not random_weights:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = fp16(AutoModelForCausalLM.from_pretrained, model_dir, local_files_only=True)
        return model.to("cuda").eval(), tok
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    # Built on the GPU directly: initialising 1 B parameters there is much
    # faster than on the CPU and copying them over.
    try:
        with torch.device("cuda"):
            model = fp16(AutoModelForCausalLM.from_config, config)
    except (RuntimeError, TypeError, ValueError) as e:
        print(f"building on the GPU failed ({e}); building on the CPU", file=sys.stderr, flush=True)
        model = fp16(AutoModelForCausalLM.from_config, config).to("cuda")
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    tok = ByteTokenizer(torch, eos if eos is not None else 0)
    return model.eval(), tok


def main():
    args = [a for a in sys.argv[1:] if a != "--random-weights"]
    if len(args) != 2:
        sys.exit("usage: openai_server.py MODEL_DIR PORT [--random-weights]")
    model_dir, port = args[0], int(args[1])
    random_weights = "--random-weights" in sys.argv[1:]
    import torch
    from transformers import TextIteratorStreamer

    if not torch.cuda.is_available():
        sys.exit("openai_server.py: torch sees no CUDA GPU")
    model, tok = load(model_dir, random_weights)
    name = "bench-model"
    weights = " (random weights)" if random_weights else ""
    print(f"loaded {model_dir}{weights} as {name!r}: {sum(p.numel() for p in model.parameters())/1e9:.2f} B parameters", flush=True)

    def prompt_ids(messages):
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages) + "\nassistant:"
        return tok(text, return_tensors="pt").to("cuda")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send_json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "bench"}]})
            else:
                self.send_json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self.send_json(404, {"error": {"message": "not found"}})
                return
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0 or n > MAX_BODY:
                self.send_json(400, {"error": {"message": "body missing or over 1 MiB"}})
                return
            try:
                req = json.loads(self.rfile.read(n))
                messages = req["messages"]
                max_tokens = min(int(req.get("max_tokens") or 128), MAX_TOKENS)
            except (ValueError, KeyError, TypeError) as e:
                self.send_json(400, {"error": {"message": f"bad request: {e}"}})
                return
            inputs = prompt_ids(messages)
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=300)
            counted = {}

            def generate():
                # Random weights may make the end-of-sequence token at any
                # step: each answer is kept max_tokens long instead.
                stop = {"min_new_tokens": max_tokens} if random_weights else {}
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                         streamer=streamer, pad_token_id=tok.eos_token_id, **stop)
                counted["completion"] = int(out.shape[1] - inputs["input_ids"].shape[1])

            th = threading.Thread(target=generate, daemon=True)
            th.start()
            cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
            usage = lambda: {"prompt_tokens": int(inputs["input_ids"].shape[1]),
                             "completion_tokens": counted.get("completion", 0),
                             "total_tokens": int(inputs["input_ids"].shape[1]) + counted.get("completion", 0)}
            if not req.get("stream"):
                text = "".join(streamer)
                th.join()
                self.send_json(200, {"id": cid, "object": "chat.completion", "created": created, "model": name,
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}], "usage": usage()})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(obj):
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

            for piece in streamer:
                if piece:
                    event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            th.join()
            event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage()})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    print(f"serving on 127.0.0.1:{port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
