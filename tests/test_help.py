"""Every command's --help exits 0, names each default once and never prints "(default: None)"."""

import ast
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry_points() -> list:
    """Every file with a top-level `if __name__ == "__main__":`, at the top level, in tools/ and in
    assignments/: a new command is covered without being listed here."""
    found = []
    for folder in ("", "tools", "assignments"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder) if folder else ROOT)):
            path = os.path.join(ROOT, folder, name)
            if name.endswith(".py") and any(
                    isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                    for node in ast.parse(open(path).read()).body):
                found.append(os.path.join(folder, name) if folder else name)
    return found


def test_every_command_is_found():
    assert {"generate.py", "decode.py", "train.py", "bench.py", "data.py", "tree.py", "tools/analysis.py",
            "assignments/grade.py"} <= set(entry_points())


@pytest.mark.parametrize("script", entry_points())
def test_help_shows_each_default_once(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])    # run as `python SCRIPT --help`, in this process
    monkeypatch.syspath_prepend(os.path.dirname(os.path.join(ROOT, script)))  # python puts its folder first
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    out, err = capsys.readouterr()
    assert done.value.code == 0 and err == "", err
    text = " ".join(out.split())                       # argparse wraps lines anywhere
    assert "(default: None)" not in text and "(default: False)" not in text
    for flag in [f for f in ("--threads THREADS", "--device DEVICE") if f in text]:  # defaults named in the help
        entry = text.split("options:")[1].split(flag)[1].split(" --")[0]
        assert entry.count("default") == 1, (flag, entry)
