"""tools/study.py: the lever table is made from train.py's summaries and bench.py's results."""

import json

from tools import study
from tools.tree_choice import build_tree, expected_tau

ACCEPT = [[0.5, 0.2, 0.1, 0.05, 0.02, 0.01], [0.3, 0.1, 0.05, 0.03, 0.02, 0.01]]


def summary(**train_args):
    metrics = {"top1": [0.5, 0.3], "top5": [0.8, 0.5], "kl": [1.0, 2.0]}
    return {"train_args": {**vars(study.train.parse_args([])), **train_args}, "accept_rates": ACCEPT,
            "eval": {"own": metrics, "sharegpt": metrics}, "minutes": {"data": 3.0, "training": 5.5}}


def test_a_row_per_run_with_its_flags_rates_and_benchmark(tmp_path, capsys):
    (tmp_path / "more.json").write_text(json.dumps(summary(replies=1600, conversations=4000, steps=2400,
                                                               eval_every=0)))  # eval_every: not shown
    (tmp_path / "base.json").write_text(json.dumps(summary()))
    bench = {"checkpoints": {"transfer": str(tmp_path / "more.pt")},
             "summary": {"transfer": {"speedup": {"median": 1.4}, "tau": 1.5, "alpha": [0.5]},
                         "transfer:compiled": {"speedup": {"median": 1.3}, "tau": 1.5, "alpha": [0.5]},
                         "plain": {"speedup": {}, "tau": 1.0, "alpha": [0.0]}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    study.main([str(tmp_path / "more.json"), str(tmp_path / "base.json"), "--bench", str(tmp_path / "bench.json")])
    lines = capsys.readouterr().out.splitlines()
    more, base = lines[2], lines[3]
    assert "`--replies 1600 --conversations 4000 --steps 2400`" in more and "`(defaults)`" in base
    assert "eager 1.40x (tau 1.50, alpha_1 0.50); compiled 1.30x" in more and base.endswith("| - |")
    assert f"{expected_tau(build_tree(ACCEPT, 8), ACCEPT):.2f}" in more and "| 3.0 | 5.5 |" in more
