"""An lm-evaluation-harness model class for exported mea models.

    mea-lm-eval --model mea --model_args checkpoint=EXPORT_DIR --tasks piqa,openbookqa,winogrande,hellaswag,arc_easy,arc_challenge

`mea-lm-eval` is lm-eval's own command line with this class registered as `mea` (lm-eval discovers no plugins
by itself); `import mea.eval.harness` registers it for lm-eval's Python API too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mea.data.tokenizer import eod_id
from mea.pretrained import load_pretrained


@register_model("mea")
class MEAHarnessModel(LM):
    def __init__(self, checkpoint: str, device: str | None = None, max_length: int | None = None, **_):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval passes its --device default, cuda, everywhere
        self.model, self.tokenizer = load_pretrained(checkpoint, device)
        if self.tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer.json; export the model with mea-export from its run directory")
        self.torch_device = device
        self.eod = eod_id(self.tokenizer)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce the continuation."""
        ids = (context + continuation)[-(self.max_length + 1) :]
        logits = self.model(torch.tensor([ids[:-1]], device=self.torch_device))[0, -len(continuation) :]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, device=self.torch_device)
        return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            out.append(self.score(self.encode(context) if context else [self.eod], self.encode(continuation)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole strings, in windows of the model's context that predict every token once."""
        out = []
        for request in requests:
            ids = [self.eod] + self.encode(request.args[0])
            total, start = 0.0, 1
            while start < len(ids):
                end = min(len(ids), start + self.max_length)
                context = ids[max(0, end - self.max_length - 1) : start]
                total += self.score(context, ids[start:end])[0]
                start = end
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids = self.encode(context)[-(self.max_length - 1) :]
            budget = min(int(kwargs.get("max_gen_toks", 64)), self.max_length - len(ids))
            generated = self.model.generate(torch.tensor([ids], device=self.torch_device), budget, temperature=0)[0, len(ids) :].tolist()
            text = self.tokenizer.decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
