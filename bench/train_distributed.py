"""Data-parallel training of a small language model whose attention is a generated NSA or DSA layer.

    torchrun --nproc-per-node N bench/train_distributed.py --mode ddp --out ddp.json   # N ranks (nccl or gloo)
    python bench/train_distributed.py --single --out single.json                # the same global batch, 1 process
    python bench/train_distributed.py --compare ddp.json single.json            # do the loss curves agree?

The model: token embedding -> `--layers` blocks (pre-norm; the generated layer `NSAttention` of `--spec`, default
specs/nsa_small.yaml, or with `--family dsa` `DSAttention` of specs/dsa_small.yaml; then an MLP) -> norm -> LM head,
trained with AdamW on random tokens (next-token cross-entropy). Every step draws one global batch from a seed
shared by all ranks; rank r takes its slice of the sequences, so N ranks and `--single` see the same global batch.
The loss is the mean over the global batch's predicted tokens: each rank's summed loss is scaled by
world / global token count before backward (DDP and FSDP2 average gradients over ranks), so gradients equal the
single process's even when ranks hold different token counts (`--packed`).

Options: `--mode ddp|fsdp` (DistributedDataParallel, or FSDP2 `torch.distributed.fsdp.fully_shard` per block and
on the whole model), `--dtype fp32|bf16` (bf16: autocast; parameters, gradients and optimizer stay fp32; the
generated attention runs in its spec's dtype either way), `--compile` (torch.compile of the wrapped model),
`--checkpoint` (activation checkpointing of each block, torch.utils.checkpoint, non-reentrant), `--packed` (each rank
packs its sequences, of random lengths in [seqlen/2, seqlen], into one [total, hidden] batch and calls the layers
with `cu_seqlens`/`max_seqlen`), `--steps` (default 50). On a machine without CUDA it runs on the CPU with gloo and
the kernels under Triton's interpreter (use tiny sizes); with CUDA, one GPU per rank (LOCAL_RANK) with nccl.

The DSA layer's indexer projections (idx_*) get no gradient from the attention (the selection is not
differentiated; they are trained by the indexer's distillation loss, which this script does not run): they are
frozen here.

The record written to `--out` (JSON): the arguments, loss per step, step times (s), tokens per step, throughput,
world size, every rank's device name, host, commit, date, torch version. `--compare A B` checks two records'
loss curves step by step (relative difference; default tolerance 1e-5 for fp32, 1e-2 for bf16) and exits 1 when
they differ more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["nsa", "dsa"], default="nsa")
    p.add_argument("--spec", default=None, help="spec file (default specs/<family>_small.yaml)")
    p.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--packed", action="store_true", help="varlen batches per rank (cu_seqlens / max_seqlen)")
    p.add_argument("--single", action="store_true", help="one process, the whole global batch (the reference)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step over all ranks")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default=None, help="JSON record (rank 0 writes it)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="compare two records' loss curves and exit")
    p.add_argument("--rtol", type=float, default=None, help="tolerance of --compare (default by dtype)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Comparing records
# ---------------------------------------------------------------------------------------------------------------

def compare(a: dict, b: dict, rtol: float | None = None) -> dict:
    """Step-by-step relative difference of two records' loss curves, |a - b| / |b|. They must be runs of the same
    problem (model, data, global batch, steps); the tolerance defaults to the looser of their dtypes' (fp32 1e-5,
    bf16 1e-2). Returns {"ok", "max_rel", "step", "rtol", "steps", "problems"}."""
    same = ("family", "spec", "global_batch", "seqlen", "hidden", "layers", "vocab", "lr", "seed", "packed")
    problems = [f"{k}: {a['args'].get(k)!r} vs {b['args'].get(k)!r}" for k in same
                if a["args"].get(k) != b["args"].get(k)]
    la, lb = a["loss"], b["loss"]
    if len(la) != len(lb):
        problems.append(f"steps: {len(la)} vs {len(lb)}")
    if rtol is None:
        rtol = max(TOLERANCE[a["args"]["dtype"]], TOLERANCE[b["args"]["dtype"]])
    rel = [abs(x - y) / max(abs(y), 1e-30) for x, y in zip(la, lb)]
    worst = max(range(len(rel)), key=rel.__getitem__) if rel else None
    max_rel = rel[worst] if rel else float("nan")
    ok = not problems and bool(rel) and max_rel <= rtol
    return {"ok": ok, "max_rel": max_rel, "step": worst, "rtol": rtol, "steps": len(rel), "problems": problems}


# ---------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------

def build_model(args, torch, layer_cls, device):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(args.hidden)
            self.attn = layer_cls(args.hidden)
            self.norm2 = nn.LayerNorm(args.hidden)
            self.mlp = nn.Sequential(nn.Linear(args.hidden, 4 * args.hidden), nn.GELU(),
                                     nn.Linear(4 * args.hidden, args.hidden))

        def forward(self, x, cu_seqlens=None, max_seqlen=None):
            varlen = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
            x = x + self.attn(self.norm1(x), **varlen)
            return x + self.mlp(self.norm2(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(args.vocab, args.hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(args.layers))
            self.norm = nn.LayerNorm(args.hidden)
            self.head = nn.Linear(args.hidden, args.vocab, bias=False)

        def forward(self, tokens, cu_seqlens=None, max_seqlen=None):
            x = self.embed(tokens)
            for block in self.blocks:
                if args.checkpoint and self.training:
                    from torch.utils.checkpoint import checkpoint

                    x = checkpoint(block, x, cu_seqlens, max_seqlen, use_reentrant=False)
                else:
                    x = block(x, cu_seqlens, max_seqlen)
            return self.head(self.norm(x))

    torch.manual_seed(args.seed)
    model = Model().to(device)
    for name, p in model.named_parameters():
        if ".attn.idx_" in name:          # DSA's indexer: no gradient from the attention (see the docstring)
            p.requires_grad_(False)
    return model


def global_batch(args, torch, step: int):
    """The step's global batch, the same on every rank: `global_batch` sequences of tokens (and, packed, their
    lengths in [seqlen/2, seqlen]); inputs are tokens[:-1], targets tokens[1:]."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    tokens = torch.randint(0, args.vocab, (args.global_batch, args.seqlen + 1), generator=g)
    if args.packed:
        lengths = torch.randint(args.seqlen // 2, args.seqlen + 1, (args.global_batch,), generator=g)
    else:
        lengths = torch.full((args.global_batch,), args.seqlen)
    return tokens, lengths


def local_batch(args, torch, step: int, rank: int, world: int, device):
    """This rank's slice of the global batch: (inputs, targets, varlen kwargs, predicted tokens here, in all)."""
    tokens, lengths = global_batch(args, torch, step)
    per = args.global_batch // world
    rows = slice(rank * per, (rank + 1) * per)
    tok, lens = tokens[rows], lengths[rows]
    total = int(lengths.sum())
    if not args.packed:
        return tok[:, :-1].to(device), tok[:, 1:].to(device), {}, int(lens.sum()), total
    inputs = torch.cat([t[:n] for t, n in zip(tok, lens.tolist())])
    targets = torch.cat([t[1:n + 1] for t, n in zip(tok, lens.tolist())])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    varlen = {"cu_seqlens": cu.to(device), "max_seqlen": int(lens.max())}
    return inputs.to(device), targets.to(device), varlen, int(lens.sum()), total


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def train(args) -> dict | None:
    use_cuda = args.device == "cuda" or (args.device == "auto" and _cuda_available())
    if not use_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported (by torch or specgen)
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import specgen

    distributed = not args.single
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} ranks")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")

    spec_path = Path(args.spec or ROOT / "specs" / f"{args.family}_small.yaml")
    module = specgen.load(spec_path)
    layer_cls = getattr(module, "NSAttention" if args.family == "nsa" else "DSAttention")
    model = build_model(args, torch, layer_cls, device)
    if distributed and args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    elif distributed and args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = model
    if args.compile:
        wrapped = torch.compile(wrapped)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    losses, times, tokens_per_step = [], [], []
    for step in range(args.steps):
        inputs, targets, varlen, n_local, n_total = local_batch(args, torch, step, rank, world, device)
        sync()
        start = time.perf_counter()
        with autocast:
            logits = wrapped(inputs, **varlen)
        summed = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1),
                                                   reduction="sum")
        (summed * (world / n_total)).backward()     # gradient averaging over ranks then gives the global mean
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = summed.detach() / n_total
        if distributed:
            dist.all_reduce(loss)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        tokens_per_step.append(n_total)
        if rank == 0:
            print(f"step {step:>3}  loss {losses[-1]:.6f}  {times[-1] * 1e3:.1f} ms", flush=True)

    name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    ident = {"rank": rank, "device": name, "host": socket.gethostname(),
             "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", str(device.index)) if use_cuda else None}
    idents = [None] * world
    if distributed:
        dist.all_gather_object(idents, ident)
        dist.destroy_process_group()
    else:
        idents = [ident]
    if rank != 0:
        return None
    steady = times[1:] or times
    record = {"args": {**vars(args), "spec": str(spec_path.relative_to(ROOT) if spec_path.is_absolute()
                                                 and ROOT in spec_path.parents else spec_path)},
              "mode": "single" if args.single else args.mode, "world_size": world,
              "backend": "single process" if not distributed else ("nccl" if use_cuda else "gloo"),
              "loss": losses, "step_seconds": times, "tokens_per_step": tokens_per_step,
              "tokens_per_second": sum(tokens_per_step[1:] or tokens_per_step) / sum(steady),
              "ranks": idents, "device": name, "commit": _commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
              "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    record["args"].pop("compare", None)
    record["args"].pop("rtol", None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args) -> int:
    if args.compare:
        a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in args.compare)
        result = compare(a, b, args.rtol)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    train(args)
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


def end_rank(status: int):
    """End a data-parallel rank that has finished (process group destroyed, record written) without the
    interpreter's finalization: flush stdout/stderr, then os._exit.

    Why not a normal exit: gloo runs each collective on a worker thread (ProcessGroupGloo::runLoop), which lets go
    of the finished work, and with it of the collective's tensors, only after the caller's wait() has returned. A
    worker descheduled there (a loaded machine: CI with pytest-xdist on 2 cores) still holds the last references to
    tensors Python already dropped (all_gather_object's buffers); when it lets go, torch decrefs their PyObjects,
    which takes the GIL. If the main thread has meanwhile returned from main() and entered Py_FinalizeEx, CPython
    (3.11) ends such a thread with pthread_exit, whose forced unwinding through torch's noexcept destructor calls
    std::terminate: "terminate called without an active exception", SIGABRT, a rank failing after its last step.
    destroy_process_group() does not prevent it: ProcessGroupGloo has no shutdown, and the DDP/FSDP wrappers keep
    the process group (so its worker threads) alive into finalization. os._exit skips finalization: the workers
    end with the process. Nothing is left to clean up here (the rank wrote its output; tensors and sockets go with
    the process)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    cli = parse_args()
    code = run(cli)
    if not (cli.single or cli.compare):
        end_rank(code)          # a torchrun rank: see end_rank
    sys.exit(code)
