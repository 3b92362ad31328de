"""FAKE torch, for TestBenchGPUScript only: just what openai_server.py
touches, with a CUDA device that is always there. No tensors are computed."""
import contextlib

float16 = "float16"
long = "long"


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


def tensor(rows, dtype=None):
    return Tensor(rows[0])


def ones_like(t):
    return Tensor([1] * len(t.ids))


class device(contextlib.nullcontext):
    """torch.device("cuda") as a context: where new tensors are made."""

    def __init__(self, name):
        super().__init__()
