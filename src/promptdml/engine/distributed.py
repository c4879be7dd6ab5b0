"""Multi-process training (torchrun / PyTorch distributed): process group, exact gradient sync, row exchange.

Design (see ``docs/distributed.md``):

* **Global batch.** ``data.batch_size`` is the *global* batch B. Every step draws one class-balanced global
  batch (B/k distinct classes, the same sequence as a single process with the same seed) and rank r takes the
  r-th contiguous slice of B/N images, i.e. B/(kN) whole classes: classes are disjoint across ranks.
  Augmentation is seeded per sample, so the images are identical to the single-process run as well.
* **Replicated loss.** The embeddings, labels, batch classes and the updated container rows (with their
  graph) are all-gathered with :func:`all_gather_cat`, whose backward returns only the local slice of the
  incoming gradient: every rank computes the identical global loss, so that slice is already the complete
  gradient of the local tensors. Nothing is averaged, nothing needs rescaling.
* **Dense gradients.** Parameters used *before* the gather (prompts, BitFit, heads, GRU, adapters, ...)
  hold their rank's share of the gradient and are all-reduced with SUM (:func:`all_reduce_grads_`).
  Parameters used only *after* the gather (the proxy bias ``P_bias``) already hold the complete gradient
  on every rank and are not communicated at all (with both_all that is a dense ``[C, E]`` gradient).
* **Class prompts.** Each rank's gradient touches only its own classes' rows; ``(class ids, row grads)``
  are all-gathered and every rank applies the row-wise optimiser step to the union, so table and optimiser
  state stay identical without ever communicating the table (:meth:`ClassPrompts.exchange_pending_grad`).
* **Container.** The new rows of all ranks are part of the gathered proxy output, so every rank writes the
  same global rows into ``H``.

:class:`DistContext` with ``world_size == 1`` (``SINGLE``) makes every helper a no-op, so the trainer has one
code path. Every helper records the bytes it passes to a collective in :attr:`DistContext.traffic`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from promptdml.device import resolve_device
from promptdml.errors import DistributedError

log = logging.getLogger("promptdml")

__all__ = ["DistContext", "SINGLE", "init_distributed", "env_world_size", "env_rank", "all_gather_cat",
           "all_gather_varlen", "all_reduce_grads_", "broadcast_object", "shard_batches",
           "broadcast_tensors_", "check_replicas_equal", "DistributedError"]




def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class Traffic:
    """Bytes handed to collectives by this rank, per tag.

    ``sent``: the bytes of this rank's own contribution; ``received``: bytes of the other ranks' data that
    arrive here (all-gather), or for an all-reduce the ring-algorithm volume ``2 (N-1)/N * size`` (counted
    in ``sent`` and ``received`` alike). ``calls``: number of collectives."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, tag: str, sent: int, received: int) -> None:
        self.sent[tag] += int(sent)
        self.received[tag] += int(received)
        self.calls[tag] += 1

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.calls.clear()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {tag: {"sent": self.sent[tag], "received": self.received[tag], "calls": self.calls[tag]}
                for tag in sorted(self.calls)}


@dataclass
class DistContext:
    """Rank, world size and the device collectives run on (CUDA for NCCL, CPU for gloo)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


SINGLE = DistContext()
"""The single-process context: every helper is the identity."""


def init_distributed(device_name: str = "auto", timeout_minutes: float = 30.0) -> tuple[DistContext, torch.device]:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); returns the context and this rank's compute device.

    Without ``WORLD_SIZE > 1`` (and no group already initialised) this is the single-process case. On CUDA the
    device is ``cuda:LOCAL_RANK`` and the backend NCCL; otherwise the backend is gloo (collectives on the
    CPU). A process group created by the caller beforehand is used as it is (and not destroyed by us).
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else env_world_size()
    if world <= 1:
        return SINGLE, resolve_device(device_name)
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    wants_cuda = device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if wants_cuda and torch.cuda.is_available():
        if device_name.startswith("cuda:"):
            log.warning("train.device=%s ignored under torchrun: each rank uses cuda:LOCAL_RANK", device_name)
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices "
                                   "are visible: use --nproc_per_node <= the number of GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = resolve_device("cpu" if device_name == "auto" else device_name)
        backend = "gloo"
    owns = False
    if not initialized:
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        owns = True
    else:
        backend = dist.get_backend()
    comm = device if backend == "nccl" else torch.device("cpu")
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                      backend=backend, comm_device=comm, owns_group=owns)
    return ctx, device


# ------------------------------------------------------------------------------------------------ collectives
def _wire(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The tensor as sent: on the comm device, contiguous; gloo gets bf16/fp16 as fp32 (exact upcast)."""
    t = t.detach().to(ctx.comm_device)
    if ctx.backend == "gloo" and t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.contiguous()


def _gather(t: torch.Tensor, ctx: DistContext, tag: str) -> torch.Tensor:
    wire = _wire(t, ctx)
    out = wire.new_empty((ctx.world_size * wire.shape[0], *wire.shape[1:]))
    dist.all_gather_into_tensor(out, wire) if ctx.backend == "nccl" else dist.all_gather(
        list(out.chunk(ctx.world_size)), wire)
    nbytes = t.numel() * t.element_size()
    ctx.traffic.add(tag, nbytes, (ctx.world_size - 1) * nbytes)
    return out.to(device=t.device, dtype=t.dtype)


class _AllGatherCat(torch.autograd.Function):
    """Concatenate equal-shaped tensors of all ranks along dim 0. Backward: the local slice of the gradient
    (the loss downstream is computed identically on every rank, so that slice is the complete gradient)."""

    @staticmethod
    def forward(fn_ctx, t: torch.Tensor, ctx: DistContext, tag: str) -> torch.Tensor:
        fn_ctx.rank, fn_ctx.n = ctx.rank, t.shape[0]
        return _gather(t, ctx, tag)

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        start = fn_ctx.rank * fn_ctx.n
        return grad[start:start + fn_ctx.n].contiguous(), None, None


def all_gather_cat(t: torch.Tensor, ctx: DistContext, tag: str = "gather") -> torch.Tensor:
    """``cat([t_0, ..., t_{N-1}])`` on every rank (equal shapes), in rank order; differentiable for the
    replicated-loss pattern (see :class:`_AllGatherCat`). Identity when ``ctx`` is single-process."""
    if not ctx.enabled:
        return t
    if t.requires_grad:
        return _AllGatherCat.apply(t, ctx, tag)
    return _gather(t, ctx, tag)


def all_gather_varlen(t: torch.Tensor, ctx: DistContext, tag: str = "gather") -> list[torch.Tensor]:
    """Every rank's ``t`` (shapes may differ in dim 0), as a list in rank order; no gradient."""
    if not ctx.enabled:
        return [t]
    sizes = _gather(torch.tensor([t.shape[0]], dtype=torch.int64), ctx, tag + "/sizes").tolist()
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    full = _gather(padded, ctx, tag)
    return [full[r * longest:r * longest + n] for r, n in enumerate(sizes)]


def all_reduce_grads_(params: Sequence[torch.nn.Parameter], ctx: DistContext, flags: Sequence[float] = (),
                      tag: str = "dense_grads", bucket_numel: int = 1 << 23) -> list[float]:
    """Sum the gradients of ``params`` over all ranks in place (a missing gradient counts as zero and stays
    missing only if it is missing on every rank). ``flags`` are extra numbers summed along (e.g. a stop
    request), returned summed. Gradients go in fp32 buckets of at most ``bucket_numel`` elements."""
    if not ctx.enabled:
        return list(flags)
    params = list(params)
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32)
    head = torch.cat([present, torch.tensor(list(flags), dtype=torch.float32)]).to(ctx.comm_device)
    _all_reduce(head, ctx, tag + "/flags")
    present_any = head[:len(params)].cpu() > 0
    summed_flags = head[len(params):].cpu().tolist()
    todo = [p for p, ok in zip(params, present_any.tolist(), strict=True) if ok]
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in todo + [None]:
        if p is not None and (not bucket or size + p.numel() <= bucket_numel):
            bucket.append(p)
            size += p.numel()
            continue
        if bucket:
            flat = torch.cat([(q.grad.detach().float().reshape(-1) if q.grad is not None
                               else torch.zeros(q.numel(), device=q.device)).to(ctx.comm_device) for q in bucket])
            _all_reduce(flat, ctx, tag)
            offset = 0
            for q in bucket:
                value = flat[offset:offset + q.numel()].view_as(q).to(device=q.device, dtype=q.dtype)
                offset += q.numel()
                if q.grad is None:
                    q.grad = value.clone()
                else:
                    q.grad.copy_(value)
        bucket, size = ([p], p.numel()) if p is not None else ([], 0)
    return summed_flags


def _all_reduce(t: torch.Tensor, ctx: DistContext, tag: str) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    ring = 2 * (ctx.world_size - 1) * t.numel() * t.element_size() // ctx.world_size
    ctx.traffic.add(tag, ring, ring)


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.comm_device if ctx.backend == "nccl" else None)
    return box[0]


def check_replicas_equal(tensors: dict[str, torch.Tensor], ctx: DistContext, what: str = "state") -> None:
    """Raise if the ranks' tensors differ (compares a cheap fingerprint: sum and sum of squares of each)."""
    if not ctx.enabled:
        return
    with torch.no_grad():  # sums in float64 without a float64 copy of (possibly huge) tables
        fp = torch.tensor([[float(t.sum(dtype=torch.float64)), float(t[..., ::7].abs().sum(dtype=torch.float64))]
                           for t in tensors.values()], dtype=torch.float64).reshape(-1)
    everyone = _gather(fp, ctx, "check").view(ctx.world_size, -1)
    if not torch.equal(everyone, fp.expand_as(everyone).to(everyone.device)):
        bad = [name for i, name in enumerate(tensors)
               if not torch.equal(everyone[:, 2 * i:2 * i + 2], fp[2 * i:2 * i + 2].expand(ctx.world_size, 2))]
        raise DistributedError(f"the ranks disagree on the {what} ({bad[:5]}): every rank must run the same "
                               "config, seed and code (and read the same checkpoint when resuming)")


# ------------------------------------------------------------------------------------------------ data
def shard_batches(n: int, batch_size: int, ctx: DistContext) -> list[list[int]]:
    """Evaluation sharding: the dataset-order batches of ``batch_size``; rank r takes batches r, r+N, ...
    (every batch has the same composition as in a single process, so embeddings are bitwise the same)."""
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return batches[ctx.rank::ctx.world_size]


def broadcast_tensors_(tensors: Sequence[torch.Tensor], ctx: DistContext, src: int = 0,
                       tag: str = "broadcast") -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
    if not ctx.enabled:
        return
    for t in tensors:
        wire = t.detach().to(ctx.comm_device).contiguous()
        dist.broadcast(wire, src=src)
        ctx.traffic.add(tag, wire.numel() * wire.element_size(), wire.numel() * wire.element_size())
        if wire is not t:
            with torch.no_grad():
                t.copy_(wire)
