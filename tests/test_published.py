"""The published reports (docs/results/): each one's readings, the data a later report's "What changed" reads,
say what its Markdown says. Reports made before readings were written as data had theirs converted once from
their Markdown; this holds the conversion, and every report made since, to the tables a reader sees."""
import json
import re
from pathlib import Path

import pytest

from mea.studies.report import readings_file

REPORTS = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("paper_small*.md"))


@pytest.mark.parametrize("report", REPORTS, ids=[r.stem for r in REPORTS])
def test_a_published_reports_readings_match_its_markdown(report):
    readings, text = json.loads(readings_file(report).read_text()), report.read_text()
    main = text.split("### main corpus", 1)[1].split("###", 1)[0]
    assert f"| arm | seeds | final val loss | Δ vs {readings['baseline']} |" in main
    for r in readings["corpora"]["main"]:
        assert f"| {r['variant']} | {r['seeds']} | {r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f} | {r['delta_vs_baseline']:+.4f} |" in main, r["variant"]
    assert len(readings["corpora"]["main"]) == len(re.findall(r"^\| \S+ \| \d+ \| [\d.]+ ± ", main, re.M))
    assert set(readings["steps"]) == {"an LR-sweep run", "a from-scratch run"}
    for kind, steps in readings["steps"].items():
        assert re.search(rf"# {kind}\npython train.py [^\n]* trainer.max_steps={steps} ", text), kind
