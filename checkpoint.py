"""Drafter checkpoints: the registry of drafter kinds, saving, and the ONE loader every script uses.

A checkpoint file is a dict saved by torch.save: kind (a key of DRAFTERS), config (the drafter's
constructor arguments), identity (which base model it was trained for), state_dict, source (for a
drafter class from a file or module named on the command line, drafter_kind: where it came from),
and whatever train.py adds (tree, accept_rates, optimizer, ...). Loading refuses anything else in
one line naming the file (CheckpointError); it never runs code from the file (weights_only), and
a drafter from elsewhere loads only once the command line names its class again. Files are
written atomically (save_atomic). Read next: data.py.
"""

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import shlex
import sys
import uuid
from dataclasses import asdict

import torch

from drafter import Drafter
from medusa import Medusa
from model import Transformer
from transfer import HiddenTransfer
from transfer_layers import TransferLayers
from transfer_lora import TransferLoRA
from transfer_mlp import TransferMLP
from plan import Plan
from tree import chain

# The drafter kinds: --drafter flags, reports and checkpoints' "kind" all use these names. The last
# three are Hidden Transfer with more capacity on the pseudo path (docs/EXTENDING.md).
DRAFTERS = {cls.kind: cls for cls in (HiddenTransfer, Medusa, TransferMLP, TransferLoRA, TransferLayers)}
OLD_KINDS = {"HiddenTransfer": "transfer", "Medusa": "medusa"}  # read in checkpoints saved before the names


SOURCES = {}  # kind -> "/abs/path/mine.py:Mine" or "module:Mine", for the kinds drafter_kind imported


def register(cls: type[Drafter]) -> type[Drafter]:
    """Add a Drafter subclass under cls.kind (in this process: the command line's way in is
    drafter_kind, `--drafter FILE.py:Class`)."""
    DRAFTERS[cls.kind] = cls
    return cls


class CheckpointError(ValueError):
    """A drafter checkpoint that cannot be used. The message is one line that names the file."""


def drafter_kind(spec: str) -> str:
    """The kind that `--drafter SPEC` names: a known kind (a key of DRAFTERS), or a Drafter subclass
    in a file, "path/to/mine.py:Mine", or in an importable module, "package.mine:Mine". That class
    is imported now and registered under its own `kind` attribute (the class name in lower case if
    it sets none), and its checkpoints record where it came from (SOURCES). A spec that names no
    such class raises ValueError, one line."""
    if spec in DRAFTERS:
        return spec
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"unknown drafter {spec!r}: give a kind ({', '.join(DRAFTERS)}), FILE.py:Class "
                         "or module:Class")
    if where.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(where))
        source = f"{path}:{name}"
        if not os.path.isfile(path):
            raise ValueError(f"drafter {spec}: there is no file {path}")
    else:
        source = spec
    known = next((k for k, s in SOURCES.items() if s == source), None)
    if known:  # imported already: the same class again
        return known
    module = _import(where, spec)
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Drafter)):
        raise ValueError(f"drafter {spec}: {where} has no class {name} that subclasses drafter.Drafter")
    if DRAFTERS.get(cls.__dict__.get("kind")) is cls and cls.kind not in SOURCES:  # a project drafter, e.g.
        return cls.kind                                                           # transfer:HiddenTransfer
    cls.kind = cls.__dict__.get("kind") or name.lower()  # an inherited kind ("transfer") is not its own
    cls.title = cls.__dict__.get("title") or name
    if cls.kind in DRAFTERS and DRAFTERS[cls.kind] is not cls:
        raise ValueError(f"drafter {spec}: its kind {cls.kind!r} is taken; give {name} its own "
                         "`kind = \"...\"`")
    SOURCES[cls.kind] = source
    return register(cls).kind


def _import(where: str, spec: str):
    """The module of a file path or module name; an error while importing it is one line with its place."""
    try:
        if not where.endswith(".py"):
            return importlib.import_module(where)
        path = os.path.abspath(os.path.expanduser(where))
        name = "drafter_" + hashlib.sha256(path.encode()).hexdigest()[:12]  # two files may share a name
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        sys.modules[name] = module
        module.__spec__.loader.exec_module(module)
        return module
    except Exception as e:  # the learner's own file: say what failed, and where
        if isinstance(e, SyntaxError):
            place = f" ({e.filename}, line {e.lineno})"
        else:  # the deepest line of the named file, else the deepest line of all
            tb, place, own = e.__traceback__, "", os.path.abspath(os.path.expanduser(where))
            while tb:
                file = tb.tb_frame.f_code.co_filename
                if file == own or not place.startswith(f" ({own},"):
                    place = f" ({file}, line {tb.tb_lineno})"
                tb = tb.tb_next
        raise ValueError(f"drafter {spec}: importing {where} failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}{place}") from None


def default_checkpoint(kind: str, model: str | None = None) -> str:
    """Where train.py --drafter KIND saves, and every script looks when given no path (the tiny
    model's drafters apart, under checkpoints/tiny/)."""
    return f"checkpoints/tiny/{kind}.pt" if model == "tiny" else f"checkpoints/{kind}.pt"


def train_command(kind: str) -> str:
    return "python train.py" + ("" if kind == "transfer" else f" --drafter {shlex.quote(SOURCES.get(kind, kind))}")


def save_atomic(path: str, obj):
    """Write obj to path (JSON for a .json path, torch.save otherwise) through a temporary file and a
    rename: an interrupted write leaves the old file or none, never half a file. The temporary name
    is this process's own, so two processes saving one path never write into each other's file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed or was interrupted: leave no debris
            os.remove(tmp)


# ----------------------------------------------------------------------------- saving

def model_identity(model: Transformer) -> dict:
    """What a drafter checkpoint must match: the base model's shape and a probe of its weights."""
    cfg = json.dumps(asdict(model.args), sort_keys=True, default=str)
    probe = model.tok_embeddings.weight[:4, :8].float().cpu()
    return {"config_sha": hashlib.sha256(cfg.encode()).hexdigest()[:16], "embedding_probe": probe.tolist()}


def checksum(ckpt: dict) -> str:
    """sha256 of everything in a checkpoint but its "checksum": every tensor's bytes, shape and dtype,
    every other value's repr. A flipped byte inside a tensor loads without complaint; this sees it."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k, v in sorted(x.items(), key=lambda kv: repr(kv[0])):
                if k != "checksum":
                    h.update(repr(k).encode())
                    walk(v)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())
    walk(ckpt)
    return h.hexdigest()


def verify_checksum(ckpt: dict, path: str):
    """A checkpoint whose contents changed after save_checkpoint wrote them (damaged on disk, or
    edited by hand) is refused. Checkpoints saved before checksums have none and are not checked."""
    if "checksum" in ckpt and ckpt["checksum"] != checksum(ckpt):
        raise CheckpointError(f"{path} is damaged or was edited: its contents no longer match the checksum "
                              "train.py stored; train it again or restore a copy")


def save_checkpoint(path: str, drafter: Drafter, model: Transformer, extra: dict):
    source = {"source": SOURCES[drafter.kind]} if drafter.kind in SOURCES else {}  # a class from elsewhere
    state = {"kind": drafter.kind, "config": drafter.config(), "identity": model_identity(model),
             "state_dict": drafter.state_dict(), **source, **extra}
    state["checksum"] = checksum(state)
    save_atomic(path, state)


# ----------------------------------------------------------------------------- loading

def open_checkpoint(path: str, kind: str | None = None) -> dict:
    """The checkpoint dict in `path`, checked as a file (no model needed, so scripts call it before
    the slow model load): it exists, torch.load reads it without running code (weights_only), it
    has the fields save_checkpoint writes, and it holds a known kind (`kind`, if given)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no drafter checkpoint at {path}: make one with train.py "
                              "(--drafter-checkpoint names where it saves)")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a drafter checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # "Unsupported global", "unsupported GLOBAL ... blocked"
            raise CheckpointError(f"{path} is not safe to load: it holds Python objects that could run "
                                  "code, and torch.load(weights_only=True) refused it") from None
        raise CheckpointError(f"{path} is not a drafter checkpoint (not a file torch.save wrote)") from None
    except EOFError:
        raise CheckpointError(f"{path} is empty, not a drafter checkpoint") from None
    except RuntimeError as e:
        if "zip archive" in str(e):
            raise CheckpointError(f"{path} is truncated or damaged (an incomplete torch.save file)") from None
        raise CheckpointError(f"{path} is not a readable drafter checkpoint: {str(e).splitlines()[0]}") from None
    except Exception as e:  # any other parse failure of a foreign file
        raise CheckpointError(f"{path} is not a drafter checkpoint ({type(e).__name__})") from None
    missing = [f for f in ("kind", "config", "identity", "state_dict") if not isinstance(ckpt, dict)
               or f not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a drafter checkpoint from train.py: it has no "
                              f"{', '.join(missing)}")
    if isinstance(ckpt["kind"], str):
        ckpt["kind"] = OLD_KINDS.get(ckpt["kind"], ckpt["kind"])
    source = ckpt.get("source")  # a drafter class from a file or module: it runs only once named again
    named = isinstance(ckpt["kind"], str) and SOURCES.get(ckpt["kind"])  # the class this process imported
    if isinstance(source, str) and named != source:
        raise CheckpointError(f"{path} holds a {ckpt['kind']} drafter whose class is {source}: name it to "
                              f"load it (--drafter {shlex.quote(source)}; bench.py: --methods "
                              f"{shlex.quote('plain,' + source)})")
    if named and source != named:
        raise CheckpointError(f"{path} holds a {ckpt['kind']} drafter that was not trained with {named}")
    if not isinstance(ckpt["kind"], str) or ckpt["kind"] not in DRAFTERS:
        raise CheckpointError(f"{path} holds a drafter of unknown kind {ckpt['kind']!r} "
                              f"(known: {', '.join(DRAFTERS)})")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path} holds a {ckpt['kind']} drafter, not {kind}: make one with "
                              f"`{train_command(kind)}`")
    return ckpt


def build_drafter(ckpt: dict, path: str, model: Transformer) -> Drafter:
    """The drafter of an opened checkpoint, checked against `model`: the identity it was trained
    for, its config and its tensors' shapes; on the model's device and in its dtype."""
    try:
        saved, now = ckpt["identity"], model_identity(model)
        same = saved["config_sha"] == now["config_sha"] and torch.allclose(
            torch.tensor(saved["embedding_probe"]), torch.tensor(now["embedding_probe"]), atol=1e-2)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise CheckpointError(f"{path} has a damaged model identity: not a checkpoint train.py wrote") from None
    if not same:
        raise CheckpointError(f"{path} was trained for a different base model (its config or weights differ "
                              f"from --model): train one for this model with `{train_command(ckpt['kind'])}`")
    try:
        drafter = DRAFTERS[ckpt["kind"]](**ckpt["config"])
        drafter.check(model)
        drafter.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:  # bad config, a layer that does not fit, shapes
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path} does not hold a usable {ckpt['kind']} drafter: "
                              f"{' '.join(line.strip() for line in first[:2])}") from None
    w = model.output.weight
    return drafter.to(device=w.device, dtype=w.dtype)


def check_ranks(plan: Plan, vocab_size: int) -> Plan:
    """A tree that reads a draft rank the vocabulary does not have (top-k of V < k) is refused."""
    if plan.tree.top_r > vocab_size:
        raise ValueError(f"the tree reads draft rank {plan.tree.top_r - 1}, but the model's vocabulary has "
                         f"only {vocab_size} tokens (ranks 0 to {vocab_size - 1})")
    return plan


def load_drafter(model: Transformer, path: str | None = None, kind: str | None = None,
                 untrained: bool = False, k: int = 3, model_name: str | None = None):
    """(drafter, plan, note): the ONE way from a checkpoint to what decoding needs.

    path: a checkpoint; an explicit path must exist. None: default_checkpoint(kind or "transfer",
    model_name) (model_name: --model), and when that does not exist yet, an untrained drafter
    (lossless, drafts poorly), as with untrained=True. kind: the kind required (None: whatever the
    file holds). The plan (plan.Plan) is the one train.py chose and stored, else the full plan of a
    chain; note says in one line what was loaded, for stderr.
    """
    if not untrained and path is None:
        path = default_checkpoint(kind or "transfer", model_name)
        untrained = not os.path.exists(path)
        why = f"no checkpoint at {path} yet"
    else:
        why = "--untrained"
    if untrained:
        cls = DRAFTERS[kind or "transfer"]
        w = model.output.weight
        drafter = cls.for_model(model, k).to(device=w.device, dtype=w.dtype)
        return drafter, Plan.full(chain(k), k), (f"{why}: using an UNTRAINED {cls.title} drafter (k={k}); output stays "
                                   f"lossless, but expect little speedup. Train one: {train_command(cls.kind)}")
    ckpt = open_checkpoint(path, kind)
    drafter = build_drafter(ckpt, path, model)
    try:
        plan = check_ranks(Plan.from_fields(ckpt, drafter.k), model.args.vocab_size)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} stores a bad plan: {e}") from None
    verify_checksum(ckpt, path)  # last: a hand-edited field gets its own reason above first
    return drafter, plan, f"drafter: {path} ({drafter.kind}), plan {plan.text()}"


def drafter_spec(text):
    """An argparse type: a drafter kind, or the class in FILE.py:Class or module:Class, imported and
    registered (drafter_kind); returns the kind, else a one-line error."""
    try:
        return drafter_kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DRAFTER_HELP = ("transfer: Hidden Transfer; medusa: the Medusa-1 baseline; transfer-mlp, transfer-lora, "
                "transfer-layers: Hidden Transfer with more capacity (train.py --drafter-option); or your own "
                "drafter.Drafter subclass, FILE.py:Class or module:Class (docs/EXTENDING.md)")
