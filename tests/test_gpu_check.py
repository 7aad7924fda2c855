"""gpu_check.sh's dry run: the same script the GPU runs, on the CPU at tiny sizes, writes its report.

The pytest, train.py and bench.py sections are left out here: each is a plain command line that
the rest of the suite already runs; on a GPU gpu_check.sh runs them all.
"""

import json
import subprocess


def test_dry_run_writes_markdown_and_json(tmp_path):
    done = subprocess.run(["tools/gpu_check.sh", str(tmp_path), "--device", "cpu", "--skip", "tests,train,bench",
                           "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and results["env"]["device"] == "cpu"
    sec = results["sections"]["llama-2-7b-shaped (random)"]
    assert sec["eager"]["step_ms"] > 0 and [r["nodes"] for r in sec["compiled"]["rows"]] == [4]
    assert sec["plain_decoding"]["same_tokens"], "compiled plain decoding must emit eager's tokens"
    md = (tmp_path / "results.md").read_text()
    assert "DRY RUN" in md and "pass cost, compiled" in md and "plain decoding, median of 1" in md
    row = sec["compiled"]["rows"][0]
    assert row["ms"] > 0 and row["eager_ms"] > 0 and sec["compiled"]["eager_step_ms"] > 0


def test_a_spent_budget_skips_every_section_and_says_so(tmp_path):
    done = subprocess.run(["tools/gpu_check.sh", str(tmp_path), "--device", "cpu", "--budget", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sections"] == {} and "tests" in results["out_of_time"]
    assert "llama-2-7b-shaped (random)" in results["out_of_time"]
    assert "Out of time (--budget), not run: tests" in (tmp_path / "results.md").read_text()
