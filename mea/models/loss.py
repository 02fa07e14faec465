"""The LM head and its cross-entropy: logits z_n = W h_n, loss = mean_n [logsumexp(z_n) − z_n[y_n]].

The (tokens × vocabulary) logits are the largest tensor of a step (125m at batch 32, T 1024, vocabulary 32,768:
one billion of them). Four ways compute the same loss (`trainer.cross_entropy`):

- `full`: the logits whole, then `F.cross_entropy`; autograd keeps them (in float) for backward.
- `chunked`: token chunks whose logits are about the hidden states' size. Each chunk's gradient is known in the
  forward pass, ∂loss/∂z_n = (softmax(z_n) − onehot(y_n)) / N, so it is applied at once: ∂h_n = W^T ∂z_n, and
  ∂W += Σ ∂z_n h_n^T, and only those two (the size of h and of W) wait for backward, which scales them by the
  loss's gradient. The same three matmuls as `full`, and no logits kept (Liger-Kernel's scheme, in PyTorch).
- `liger`, `cce`: Liger-Kernel's and cut-cross-entropy's Triton kernels (CUDA, optional extras `mea[liger]`,
  `mea[cce]`). CCE runs with its gradient filter off: it skips small softmax entries, which changes the gradient,
  and a run's loss form may change nothing but speed and summation order (mea.run_directory.DECIDES).
"""
from __future__ import annotations

import importlib.util
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The weight's gradient is summed over chunks, a matmul over each chunk's tokens that reads and writes the whole
# V×C sum: under 1,024 tokens that traffic outweighs the matmul (on a CPU at 125m's head, 64-token chunks made a
# step of the head 1.32× slower than the whole logits, 1,024-token ones 0.98×; BENCHMARKS.md).
MIN_CHUNK_TOKENS = 1024
DEFAULT = "chunked"  # what trainer.cross_entropy=auto means: it keeps no logits and costs nothing on a CPU (BENCHMARKS.md)
EXTRAS = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}  # form: (import name, package)


def why_unavailable(form: str, device: torch.device) -> str | None:
    """Why `trainer.cross_entropy=form` cannot run on device, in one line naming the fix; None when it can."""
    if form not in EXTRAS:
        return None
    module, package = EXTRAS[form]
    if device.type != "cuda":
        return f"trainer.cross_entropy={form} runs {package}'s Triton kernels, which need a CUDA GPU, not {device.type}; use trainer.cross_entropy=chunked"
    if importlib.util.find_spec(module) is None:
        return f"trainer.cross_entropy={form} needs {package}, which is not installed; pip install 'mea[{form}]', or use trainer.cross_entropy=chunked"
    return None


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of t runs in: autocast's, where it is on."""
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def chunk_tokens(n_tokens: int, dim: int, vocab: int) -> int:
    """Tokens a chunk: a power of two whose logits hold about as many numbers as the hidden states of all tokens
    (Liger-Kernel's rule), and at least MIN_CHUNK_TOKENS."""
    return max(MIN_CHUNK_TOKENS, 2 ** math.ceil(math.log2(max(1, math.ceil(n_tokens * dim / vocab)))))


def full(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


class Chunk(NamedTuple):
    rows: slice
    hidden: torch.Tensor  # its tokens' hidden states, in the matmul dtype
    weight: torch.Tensor  # W, in the matmul dtype
    targets: torch.Tensor  # (tokens, 1)
    logits: torch.Tensor  # float
    lse: torch.Tensor  # logsumexp of each token's logits, (tokens, 1)
    loss: torch.Tensor  # summed over its tokens


def chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, size: int):
    """The tokens size at a time, each chunk with its logits and loss."""
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    for start in range(0, len(hidden), size):
        rows = slice(start, start + size)
        h, t = hidden[rows].to(dtype), targets[rows, None]
        logits = (h @ w.T).float()
        lse = logits.logsumexp(-1, keepdim=True)
        yield Chunk(rows, h, w, t, logits, lse, (lse - logits.gather(1, t)).sum())


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, size: int) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)  # both summed over tokens, not yet divided by their count
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # summed over chunks in float
        for c in chunks(hidden, weight, targets, size):
            total = total + c.loss
            minus_one = torch.full(c.targets.shape, -1.0, device=c.targets.device)
            grad_logits = c.logits.sub_(c.lse).exp_().scatter_add_(1, c.targets, minus_one).to(c.hidden.dtype)  # softmax − onehot, in place
            grad_hidden[c.rows] = grad_logits @ c.weight
            if grad_weight.dtype == c.hidden.dtype:
                grad_weight.addmm_(grad_logits.T, c.hidden)  # accumulated inside the matmul
            else:
                grad_weight += grad_logits.T @ c.hidden
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.tokens = len(hidden)
        return total / len(hidden)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.tokens
        return grad_hidden * scale, grad_weight * scale, None, None


def chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, size: int | None = None) -> torch.Tensor:
    size = size or chunk_tokens(len(hidden), hidden.shape[1], len(weight))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, size)
    return sum(c.loss for c in chunks(hidden, weight, targets, size)) / len(hidden)  # evaluation: no gradient to make


def liger(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = compute_dtype(hidden)
    return liger_fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets).float()


def cce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    dtype = compute_dtype(hidden)
    return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, filter_eps=None).float()


CROSS_ENTROPY = {"full": full, "chunked": chunked, "liger": liger, "cce": cce}


class LMHead(nn.Linear):
    """The vocabulary projection: logits, or with targets the mean cross-entropy computed as `cross_entropy` says.

    The loss is taken here, inside the head's own forward, so that a sharder that gathers a module's weights when
    it is called (ZeRO-3) has W whole for it."""

    def __init__(self, dim: int, vocab_size: int, cross_entropy: str = DEFAULT):
        super().__init__(dim, vocab_size, bias=False)
        if cross_entropy not in CROSS_ENTROPY:
            raise ValueError(f"cross_entropy={cross_entropy!r} is not known; choose one of: {', '.join(CROSS_ENTROPY)}")
        self.cross_entropy = cross_entropy

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return CROSS_ENTROPY[self.cross_entropy](hidden.flatten(0, -2), self.weight, targets.flatten())
