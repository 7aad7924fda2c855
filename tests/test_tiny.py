"""--model tiny (tiny.py): the README's first loop as a user types it (train, plan, decode --show,
--check lossless), and what makes it work: the same random model in every process, so a drafter
trained in one command fits the next; a character tokenizer whose chat mask marks the replies."""

import os
import subprocess
import sys

import torch

import tiny
from checkpoint import model_identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readmes_tiny_loop(tmp_path):
    command = "python train.py --model tiny && python decode.py --model tiny --show --check"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert command in readme, "the README shows this loop"
    run = subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} {ROOT}/")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "chosen: " in run.stdout and (tmp_path / "checkpoints/tiny/transfer.pt").exists()
    assert "drafter: checkpoints/tiny/transfer.pt (transfer)" in run.stderr
    assert "tokens identical to plain decoding: yes" in run.stdout and "accepted drafts per pass:" in run.stdout


def test_the_tiny_model_is_the_same_in_every_process():
    a, b = tiny.load_model(), tiny.load_model()
    assert model_identity(a) == model_identity(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.args.vocab_size == tiny.load_tokenizer().vocab_size


def test_the_tiny_tokenizer():
    tok = tiny.load_tokenizer()
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}],
                                add_generation_prompt=False)
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    marked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert marked.startswith("Yes.") and "Hi" not in marked
    assert tok.decode(tok.encode("naïve"), skip_special=False) == "na<unk>ve"  # one token per character
    assert tok.eos_id in tok.stop_ids and tok.template == "chatml"
    assert len(tiny.conversations(5)) == 5 and tiny.conversations(3) == tiny.conversations(3)
