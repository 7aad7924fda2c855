"""Training on several devices with PyTorch's DistributedDataParallel, for train.py under torchrun:

    torchrun --nproc_per_node 8 train.py --preset gpu --model path/to/Llama-2-7b-chat-hf --batch-size 64

Each rank (one process per GPU; nccl on GPUs, gloo on the CPU) holds the frozen model and a copy
of the drafter, trains on its own shard of every global batch (--batch-size rows split over the
ranks), and DDP averages the drafter's gradients. Rank 0 evaluates, saves and prints; the other
ranks only train. train.py applies all of it at one place (train.main: setup, wrap, shard). One
process without torchrun: nothing here does anything. Read train.py first.
"""

import atexit
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world() -> tuple[int, int]:
    """(this rank, number of ranks): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup(args) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group, give this rank its own GPU, and
    quiet the ranks after 0. Returns (rank, ranks): (0, 1) without torchrun, args untouched."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        return world()
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.batch_size % size:
        sys.exit(f"error: --batch-size {args.batch_size} must split evenly over {size} processes")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(dist.destroy_process_group)  # every rank leaves the group when it is done
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 speaks for all; errors still reach stderr
        os.environ["TQDM_DISABLE"] = "1"
        # every rank tokenises the same windows; its own cache folder, so no two write one file
        args.cache_dir = os.path.join(args.cache_dir, f"rank{dist.get_rank()}")
    return world()


def shard(batches):
    """This rank's rows of every global batch (indices, ids, assistant): rows rank, rank + world, ..."""
    rank, size = world()
    for batch in batches:
        yield tuple(x[rank::size] for x in batch)


def wrap(drafter):
    """The drafter to train with: itself on one process. Under torchrun, a shallow copy of it (same
    class, same parameters, so train.py treats it alike) whose forward runs through one
    DistributedDataParallel wrapper, which averages the gradients over the ranks in backward."""
    if world()[1] == 1:
        return drafter
    wrapper = DistributedDataParallel(drafter)  # broadcasts rank 0's weights to every rank
    twin = copy.copy(drafter)
    # twin(x) -> wrapper(x) -> drafter.forward(x); object.__setattr__, or nn.Module would register
    # the wrapper as a submodule in the module dict that twin shares with drafter
    object.__setattr__(twin, "forward", wrapper)
    return twin
