"""FAKE transformers, for TestBenchGPUScript only: a "model" that answers
every prompt with the same words, one token each and TOKEN_SECONDS apart,
through the streamer as transformers' generate does (put token ids, then
end; the streamer decodes them with the tokenizer it was given). Nothing
runs on a GPU. from_config stands for a model of that shape with random
weights (--random-weights), which answers the same way."""
import os
import queue
import time

import torch

# Seconds per generated token: long enough that a query's own time, which
# mtor measures, outweighs the start-up of the tools around it.
TOKEN_SECONDS = float(os.environ.get("FAKE_MODEL_TOKEN_SECONDS", "0.03"))

WORDS = "the keeper lit the lamp and watched the ships pass in the night".split()


class BatchEncoding(dict):
    def to(self, device):
        return self


class AutoTokenizer:
    chat_template = "fake"
    eos_token_id = 0

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages) + "\nassistant:"

    def __call__(self, text, return_tensors=None):
        return BatchEncoding(input_ids=torch.Tensor(range(len(text.split()))))

    def decode(self, ids, **kwargs):
        # A generated token's id is its place in the answer.
        return "".join((" " if i else "") + WORDS[i % len(WORDS)] for i in ids)


class AutoConfig:
    eos_token_id = 2

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls()


class _Param:
    def numel(self):
        return 1_100_000_000


class AutoModelForCausalLM:
    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls()

    random_weights = False

    @classmethod
    def from_config(cls, config, **kwargs):
        m = cls()
        m.random_weights = True
        return m

    def to(self, device):
        return self

    def eval(self):
        return self

    def parameters(self):
        return [_Param()]

    def generate(self, input_ids, max_new_tokens, streamer=None, **kwargs):
        # Random weights could end an answer anywhere: the server must ask
        # for whole answers, or the benchmark's token counts are wrong.
        if self.random_weights and kwargs.get("min_new_tokens") != max_new_tokens:
            raise ValueError("random weights without min_new_tokens = max_new_tokens")
        for i in range(max_new_tokens):
            time.sleep(TOKEN_SECONDS)
            if streamer is not None:
                streamer.put(torch.Tensor([i]))
        if streamer is not None:
            streamer.end()
        return torch.Tensor(input_ids.ids + list(range(max_new_tokens)))


class TextIteratorStreamer:
    def __init__(self, tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None):
        self.tok, self.q, self.timeout = tokenizer, queue.Queue(), timeout

    def put(self, value):
        self.q.put(self.tok.decode(value.ids, skip_special_tokens=True))

    def end(self):
        self.q.put(None)

    def __iter__(self):
        while (piece := self.q.get(timeout=self.timeout)) is not None:
            yield piece
