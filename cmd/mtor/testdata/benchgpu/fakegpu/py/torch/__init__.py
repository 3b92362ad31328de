"""FAKE torch, for TestBenchGPUScript only: just what openai_server.py
touches, with a CUDA device that is always there. No tensors are computed."""
import contextlib

float16 = "float16"


class _Cuda:
    @staticmethod
    def is_available():
        return True


cuda = _Cuda()


def no_grad():
    return contextlib.nullcontext()


class Tensor:
    """Token ids of one sequence: only the shape is real."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.shape = (1, len(self.ids))

    def to(self, device):
        return self
