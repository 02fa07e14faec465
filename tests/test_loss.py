"""The LM head's loss forms (mea.models.loss) against `full`, the logits whole: the value and both gradients, in fp32
and under bf16 autocast, eager and compiled; what each keeps for backward and holds at its peak; the trainer's switch."""
import importlib.util
import re

import pytest
import torch
from omegaconf import OmegaConf

from bench.machine import PeakTensorBytes
from bench.train_step import saved_activation_bytes
from mea.config import ConfigError
from mea.models.loss import CROSS_ENTROPY, EXTRAS, chunked, full

from .conftest import QUICK, compose_config
from .test_attention import DEVICES

# the Triton forms where they can run: a GPU, with their optional extra installed (make gpu-check installs neither)
FORMS = ["chunked"] + [pytest.param(form, marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
                                                 pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {package}: pip install 'mea[{form}]'")])
                       for form, (module, package) in EXTRAS.items()]


def head(n=2500, dim=16, vocab=97, device="cpu", seed=0):
    """Hidden states, an LM head's weight and targets; 2,500 tokens are chunks of 1,024 and a last one of 452."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(device).requires_grad_()
    return hidden, weight, torch.randint(0, vocab, (n,), generator=g).to(device)


def loss_and_grads(form, hidden, weight, targets, bf16=False, scale=1.0):
    hidden.grad = weight.grad = None
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = form(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_every_form_equals_the_whole_logits(form, device):
    """fp32 to float rounding; bf16 autocast within bf16's resolution of full's own bf16, gradients in the dtype
    full gives them; a scaled loss (gradient accumulation, a loss scaler) scales both gradients; evaluation (no
    gradient) gives the same value."""
    compute = CROSS_ENTROPY[form]
    hidden, weight, targets = head(device=device)
    fp32 = [loss_and_grads(f, hidden, weight, targets) for f in (compute, full)]
    for got, want in zip(*fp32):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    bf16 = [loss_and_grads(f, hidden, weight, targets, bf16=True) for f in (compute, full)]
    for got, want in zip(*bf16):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    halved = loss_and_grads(compute, hidden, weight, targets, scale=0.5)
    for got, want in zip(halved[1:], fp32[0][1:]):
        torch.testing.assert_close(got, want / 2, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(compute(hidden, weight, targets), fp32[1][0], rtol=1e-5, atol=1e-7)


def test_chunks_of_any_size_sum_to_the_same_loss_and_gradients():
    """One chunk, chunks that divide the tokens, and a last chunk shorter than the rest."""
    hidden, weight, targets = head(n=96)
    want = loss_and_grads(full, hidden, weight, targets)
    for size in (96, 32, 40, 1):
        for got, expected in zip(loss_and_grads(lambda *a: chunked(*a, size=size), hidden, weight, targets), want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=f"chunks of {size}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_every_form_compiles_to_one_graph_equal_to_eager(form, device):
    """Inductor, fullgraph=True (a graph break is an error: the trainer compiles the model so), forward and
    backward, in fp32 and under bf16 autocast (which the chunked forward reads inside the traced function)."""
    torch._dynamo.reset()
    hidden, weight, targets = head(device=device)
    compiled = torch.compile(CROSS_ENTROPY[form], fullgraph=True)
    for bf16, tolerance in ((False, dict(rtol=1e-5, atol=1e-7)), (True, dict(rtol=1e-2, atol=1e-4))):
        for got, want in zip(loss_and_grads(compiled, hidden, weight, targets, bf16), loss_and_grads(CROSS_ENTROPY[form], hidden, weight, targets, bf16)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **tolerance)


def test_chunked_keeps_no_logits():
    """Autograd keeps the whole float logits of `full` for backward; `chunked` keeps two gradients the size of the
    hidden states and of W, and at its peak holds about a chunk's logits (1,024 of 8,192 tokens here)."""
    n, dim, vocab = 8192, 16, 2048
    hidden, weight, targets = head(n, dim, vocab)
    logits_bytes = n * vocab * 4
    kept = {form: saved_activation_bytes(CROSS_ENTROPY[form], hidden, weight, targets) for form in ("full", "chunked")}
    assert kept["full"] >= logits_bytes and kept["chunked"] <= (n + vocab) * dim * 4 + 64, kept
    peak = {}
    for form in ("full", "chunked"):
        with PeakTensorBytes() as held:
            loss_and_grads(CROSS_ENTROPY[form], hidden, weight, targets)
        peak[form] = held.peak
    assert peak["full"] >= 2 * logits_bytes and peak["chunked"] <= logits_bytes / 2, peak


def test_the_trainer_takes_chunked_by_default_and_refuses_a_form_the_machine_cannot_run(tmp_path):
    from mea.train.loop import build_model, resolve

    cfg = resolve(OmegaConf.to_object(compose_config(tmp_path, *QUICK)), torch.device("cpu"))
    assert cfg.trainer.cross_entropy == "chunked"
    assert build_model(cfg, 300, 299).head.cross_entropy == "chunked"
    for form, (_, package) in EXTRAS.items():  # on a CPU whatever is installed: their kernels are CUDA's
        with pytest.raises(ConfigError, match=re.escape(f"trainer.cross_entropy={form} runs {package}'s Triton kernels, which need a CUDA GPU, not cpu; "
                                                        "use trainer.cross_entropy=chunked")):
            resolve(OmegaConf.to_object(compose_config(tmp_path, *QUICK, f"trainer.cross_entropy={form}")), torch.device("cpu"))
