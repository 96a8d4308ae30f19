"""Choosing a gradient engine: backends by name, and how many processes a step can use.

- `SerialEngine` (`partrain.engine`): every chunk in the master process, no pool.
- `LokyEngine` (`partrain.loky_engine`): the master plus a persistent loky pool on this
  machine, over shared memory.
- `DaskEngine` (`partrain.dask_engine`, imported only when asked for): a Dask cluster.

A step can keep at most as many processes busy as it has chunks, so the plan never starts
more: n_jobs above the chunks per step is clamped, with a warning that says how to split.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

from .chunks import chunks_per_step
from .engine import Engine, SerialEngine
from .loky_engine import LokyEngine
from .model import Sequential
from .processes import usable_cores


class ParallelismWarning(UserWarning):
    """n_jobs cannot be used as given (fewer chunks per step than n_jobs, or more n_jobs than
    cores); the message says what runs instead and what to change."""


_SAID: set[str] = set()  # ParallelismWarning texts already given in this process


def warn_parallelism(note: str, stacklevel: int = 3) -> None:
    """Warn `note` as a ParallelismWarning once per process: the same cause (the same text,
    e.g. every fit of a GridSearchCV over one configuration) is said once, unless a warnings
    filter asks for "always" (as `pytest.warns` does). `stacklevel` 3: the caller's caller."""
    action = next((f[0] for f in warnings.filters if issubclass(ParallelismWarning, f[2])
                   and (f[1] is None or f[1].match(note))), "default")
    if note in _SAID and action != "always":
        return
    if action != "ignore":
        _SAID.add(note)
    warnings.warn(note, ParallelismWarning, stacklevel=stacklevel)


def resolve_n_jobs(n_jobs: int) -> int:
    """joblib's meaning: a positive count, or -1 for all cores, -2 for all but one, ..."""
    import numpy as np

    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ValueError(f"`n_jobs` must be a non-zero integer (-1 = all cores), got {n_jobs!r}.")
    if n_jobs > 0:
        return int(n_jobs)
    return max(1, usable_cores() + 1 + int(n_jobs))


class ProcessPlan(NamedTuple):
    """How many processes compute each step, and why."""

    n_jobs: int  # what was asked for (resolved)
    chunks: int  # chunks of a full batch: the most processes a step can keep busy
    processes: int  # what runs: min(n_jobs, chunks)
    cores: int
    split_chunk_size: int | None  # a chunk size that would give every process work, if any
    full_batch: int  # the batch that gives min(n_jobs, cores) processes a chunk each

    def notes(self, chunk_option: str = "chunk_size={}", batch_option: str = "batch_size={}"
              ) -> list[str]:
        """Plain-language warnings about the plan (empty when n_jobs is used as given)."""
        notes = []
        if self.processes < self.n_jobs:
            chunks = f"{self.chunks} chunk{'s' * (self.chunks > 1)} per step"
            where = ("one process" if self.processes == 1
                     else f"{self.processes} processes")
            hint = (f"; use {chunk_option.format(self.split_chunk_size)} to split"
                    if self.split_chunk_size else "")
            if self.processes < min(self.n_jobs, self.cores):
                hint += (f" ({batch_option.format(self.full_batch)} would keep "
                         f"{min(self.n_jobs, self.cores)} processes busy at this chunk size)")
            notes.append(f"n_jobs={self.n_jobs} but {chunks}: running in {where}{hint}")
        if self.processes > self.cores:
            notes.append(f"n_jobs={self.processes} is more than the {self.cores} cores: the "
                         "processes will take turns on them and each step gets slower")
        return notes


def plan_processes(n_jobs: int, batch_size: int, chunk_size: int) -> ProcessPlan:
    """The processes a run of (n_jobs, batch_size, chunk_size) uses: never more than the
    chunks of a step, so n_jobs=1000 starts no idle pool."""
    chunks = chunks_per_step(batch_size, chunk_size)
    cores = usable_cores()
    processes = max(1, min(n_jobs, chunks))
    wanted = min(n_jobs, cores)
    split = -(-batch_size // wanted)
    return ProcessPlan(n_jobs, chunks, processes, cores,
                       split if processes < wanted and split < chunk_size else None,
                       wanted * chunk_size)


def _dask_engine(*args, **kwargs) -> Engine:
    from .dask_engine import DaskEngine  # imported only when asked for: dask is optional

    return DaskEngine(*args, **kwargs)


def _local_engine(model, chunk_size, n_processes, batch_size, **options) -> Engine:
    """One process: the serial engine (no pool); more: the loky engine."""
    if n_processes == 1:
        return SerialEngine(model, chunk_size, batch_size,
                            check_interrupt=options.get("check_interrupt"))
    return LokyEngine(model, chunk_size, n_processes, batch_size, **options)


BACKENDS = {"loky": _local_engine, "dask": _dask_engine}


def make_engine(backend: str, model: Sequential, chunk_size: int, n_processes: int,
                batch_size: int, **options) -> Engine:
    """The engine of `backend` for `n_processes` computing processes (see `plan_processes`)."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}, expected one of {sorted(BACKENDS)}.")
    return BACKENDS[backend](model, chunk_size, n_processes, batch_size, **options)
