"""Two CPU processes (gloo) train the drafter as one process does with the same global batch.

Each rank trains on half of every batch and DistributedDataParallel averages the gradients. With
every position trained (--positions-per-seq 0) and all-assistant windows, each half has as many
targets as the other, so the average of the halves' losses is the whole batch's loss: the two runs
must agree up to float rounding (sums in another order), which the tolerances below state.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from checkpoint import load_drafter
from model import ModelArgs, Transformer
from tools import distributed
from transfer import HiddenTransfer

T, STEPS = 16, 3


def setting(out):
    model = Transformer(ModelArgs.tiny()).init_random(0, std=0.15).eval()
    g = torch.Generator().manual_seed(0)
    windows = [(torch.randint(96, (T,), generator=g), torch.ones(T, dtype=torch.bool)) for _ in range(8)]
    args = train.parse_args(["--seq-len", str(T), "--positions-per-seq", "0", "--transfer-layer", "2",
                             "--k", "2", "--batch-size", "4", "--steps", str(STEPS), "--lr", "1e-2",
                             "--warmup", "1", "--eval-every", "0", "--tree-sizes", "", "--eval-windows", "2",
                             "--device", "cpu", "--drafter-checkpoint", out])
    return model, windows, args


def rank_main(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, windows, args = setting(out)
    world = distributed.setup(args)
    train.run(args, model, windows, {"held": windows[:2]}, world=world)
    # a spawned process ends with os._exit, which skips setup's atexit hook: leave the group here,
    # together, or gloo's threads die with the process and abort it (SIGABRT) now and then
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    model, windows, args = setting(str(tmp_path / "one.pt"))
    one = train.run(args, model, windows, windows[:2])
    with socket.socket() as s:  # a free port for the two processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, str(tmp_path / "two.pt")), nprocs=2, join=True)
    a, _, _ = load_drafter(model, str(tmp_path / "one.pt"))
    b, _, _ = load_drafter(model, str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["step"] == one["step"] == STEPS
    # rank 0's losses are over its half of each batch, so they are compared only loosely
    torch.testing.assert_close(torch.tensor(two["history"]), torch.tensor(one["history"]), rtol=0.2, atol=0)
    start = HiddenTransfer(64, 2, 2).state_dict()
    assert any(not torch.equal(x, start[n]) for n, x in a.state_dict().items()), "the drafter should have trained"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)  # float rounding, not a bug
