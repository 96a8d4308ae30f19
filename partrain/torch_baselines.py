"""PyTorch baselines for `partrain bench --compare torch`: the same networks, trained the ways a
PyTorch user would, each timed like partrain's steps (examples/s of full training steps).

- "default": NCHW tensors and `torch.optim.Adam()` at its defaults, 1..cores threads;
- "tuned": `channels_last` memory format (conv nets) and the fused Adam, 1..cores threads;
- "ddp": DistributedDataParallel over gloo, n processes x 1 thread, the global batch split
  evenly (what data-parallel PyTorch users run on one machine), tuned like "tuned".
"""

from __future__ import annotations

import os
import socket
import time

from . import zoo
from .processes import children_blas_threads


def torch_unavailable_reason() -> str | None:
    """None if PyTorch can be imported, else why the comparison is skipped."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return (f"PyTorch is not installed ({exc}); pip install \"partrain[compare]\" "
                "to compare")
    return None


def torch_network(model_name: str):
    """The same reference network in PyTorch (NCHW, as PyTorch runs it natively)."""
    from torch import nn

    nets = {
        "signs-cnn": lambda: nn.Sequential(nn.Conv2d(3, 10, 3, stride=2, padding=2), nn.ReLU(),
                                           nn.MaxPool2d(2, stride=1), nn.Flatten(),
                                           nn.Linear(10240, 6)),
        "mnist-cnn": lambda: nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 5),
                                           nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
                                           nn.Linear(800, 128), nn.ReLU(), nn.Linear(128, 10)),
        "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(),
                                     nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)),
        "digits-cnn": lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                            nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(256, 10)),
    }
    return nets[model_name]()


def _training_step(model_name: str, batch_size: int, tuned: bool, wrap=None):
    """A closure running one training step of `model_name` on random data of `batch_size`."""
    import torch

    torch.manual_seed(0)
    net = torch_network(model_name)
    reference = zoo.get(model_name)
    x = torch.rand(batch_size, *reference.input_shape)
    conv = x.dim() == 4
    if conv:
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        if tuned:
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, reference.n_classes, (batch_size,))
    if wrap is not None:
        net = wrap(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, **({"fused": True} if tuned else {}))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    return step


def time_torch(model_name: str, batch_size: int, threads: int, tuned: bool, windows) -> list:
    """examples/s of each timed window (`windows(step, batch_size)`) in this process."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return windows(_training_step(model_name, batch_size, tuned), batch_size)
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_process(rank: int, n: int, port: int, model_name: str, batch_size: int,
                 repeats: int, duration: float, warmup: float, queue) -> None:
    """One DDP rank: warm up, then time `repeats` windows of the same step count on every
    rank (agreed through a broadcast), rank 0 reporting the global examples/s."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        local = batch_size // n + (rank < batch_size % n)  # the global batch split evenly
        step = _training_step(model_name, local, tuned=True, wrap=DistributedDataParallel)
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        per_step = (time.perf_counter() - t0) / 5
        counts = torch.tensor([max(1, round(warmup / per_step)),
                               max(1, round(duration / per_step))])
        dist.broadcast(counts, src=0)  # every rank runs the same number of steps
        for _ in range(int(counts[0])):
            step()
        rates = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(int(counts[1])):
                step()
            dist.barrier()
            rates.append(int(counts[1]) * batch_size / (time.perf_counter() - t0))
        if rank == 0:
            queue.put(rates)
        dist.barrier()  # nobody tears gloo down while another rank still talks to it
    finally:
        dist.destroy_process_group()


def time_torch_ddp(model_name: str, batch_size: int, n: int, repeats: int, duration: float,
                   warmup: float) -> list:
    """examples/s of each timed window of DDP with `n` single-thread processes (gloo)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with children_blas_threads(1):  # the ranks read it at start
        mp.start_processes(_ddp_process, args=(n, _free_port(), model_name, batch_size, repeats,
                                               duration, warmup, queue),
                           nprocs=n, start_method="spawn", join=True)
    return queue.get()
