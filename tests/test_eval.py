"""Downstream evaluation through lm-evaluation-harness (offline, on a local task) and validation perplexity."""
import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from mea.eval.harness import MEAHarnessModel
from mea.eval.perplexity import evaluate
from mea.pretrained import load_pretrained

from .conftest import QUICK, run_cli

TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
DOCS = [  # lm-eval joins question and choice with its target delimiter, a space
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "]]]]"], "answer": 0},
    {"question": "import", "choices": ["os", ",,,"], "answer": 0},
    {"question": "for i in", "choices": [")(", "range(10):"], "answer": 1},
    {"question": "class Foo", "choices": ["= = =", "(object):"], "answer": 1},
    {"question": "if x is", "choices": ["None:", "(((("], "answer": 1},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert run_cli("train.py", *QUICK, "trainer.max_steps=30", f"hydra.run.dir={root / 'run'}").returncode == 0
    assert run_cli("-m", "mea.tools.export", str(root / "run"), str(root / "exported")).returncode == 0
    return root


def direct_logprob(model, tok, context: str, continuation: str) -> float:
    ctx, cont = tok.encode(context, add_special_tokens=False).ids, tok.encode(continuation, add_special_tokens=False).ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1])[0].float(), -1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_scores_a_local_multiple_choice_task(exported, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    proc = run_cli("-c", "from mea.eval.harness import main; main()", "run", "--model", "mea", "--model_args", f"checkpoint={exported / 'exported'}",
                   "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("out/**/results_*.json")
    acc = json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"]
    model, tok = load_pretrained(exported / "exported")
    correct = [max(range(2), key=lambda c: direct_logprob(model, tok, d["question"], " " + d["choices"][c])) == d["answer"] for d in DOCS]
    assert acc == pytest.approx(sum(correct) / len(DOCS))


def test_adapter_generation_and_rolling_loglikelihood(exported):
    adapter = MEAHarnessModel(checkpoint=str(exported / "exported"), device="cuda")  # falls back to the CPU here
    model, tok = adapter.model, adapter.tokenizer
    prompt = "def main():\n"
    (text,) = adapter.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12}), 0)])
    ids = tok.encode(prompt, add_special_tokens=False).ids
    greedy = tok.decode(model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()).split("\n\n")[0]
    assert text == greedy
    string = "import os\nprint(os.getcwd())\n"
    (rolling,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (string,), 0)])
    eod_ids = [adapter.eod] + tok.encode(string, add_special_tokens=False).ids
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([eod_ids[:-1]]))[0], -1)
    expected = sum(lp[i, t].item() for i, t in enumerate(eod_ids[1:]))
    assert rolling == pytest.approx(expected, rel=1e-5)
    adapter.max_length = 4  # many windows, each still predicting every token once
    (windowed,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (string,), 0)])
    assert windowed < 0 and windowed != pytest.approx(expected, rel=1e-6)


def test_validation_perplexity_matches_the_trainers(exported):
    summary = json.loads((exported / "run" / "summary.json").read_text())
    result = evaluate(exported / "exported", ["data.seq_len=64"], max_windows=16, batch_size=8)
    assert result["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["val_loss"])
    proc = run_cli("-m", "mea.eval.perplexity", str(exported / "exported"), "data.seq_len=64")
    assert proc.returncode == 0 and json.loads(proc.stdout)["windows"] > 0
