"""Every script's --help names each default once and never prints "(default: None)"."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["generate.py", "decode.py", "train.py", "bench.py", "tree.py", "tools/analysis.py",
                                    "tools/hf_baseline.py", "tools/gpu_check.py", "tools/results.py"])
def test_help_shows_each_default_once(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])    # run as `python SCRIPT --help`, in this process
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    out, err = capsys.readouterr()
    assert done.value.code == 0 and err == "", err
    text = " ".join(out.split())                       # argparse wraps lines anywhere
    assert "(default: None)" not in text and "(default: False)" not in text
    for flag in [f for f in ("--threads THREADS", "--device DEVICE") if f in text]:  # defaults named in the help
        entry = text.split("options:")[1].split(flag)[1].split(" --")[0]
        assert entry.count("default") == 1, (flag, entry)
