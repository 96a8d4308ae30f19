"""Helper for the command-line signal tests: run `partrain ARGS` in this process and send it a
signal at one precise moment after (or at the very end of) training.

Usage: python cli_signal_script.py WHEN SIGNAL ARGS...

WHEN is when the signal is sent to this process:
  evaluate      at the start of the first model evaluation after `fit` returned (the test score)
  save          at the start of the first file written after `fit` returned (the model)
  plot          at the start of `plot_history`
  checkpoint-N  at the start of the N-th checkpoint write inside `fit` (for a 1-epoch run, 1 is
                the end-of-epoch checkpoint, 2 the final one that `fit` writes before returning)
SIGNAL is TERM or INT. The process then goes on as a real `partrain` would; its exit status is
that of `partrain.cli.main`, or -SIGNAL when the signal killed it.
"""

import os
import signal
import sys

import partrain.io
import partrain.model
import partrain.plots
import partrain.trainer
from partrain import cli

when, signame, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
signum = getattr(signal, f"SIG{signame}")
state = {"fit_returned": False, "checkpoints": 0, "sent": False}


def send():
    if not state["sent"]:
        state["sent"] = True
        os.kill(os.getpid(), signum)


def wrap(owner, name, before):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    return original


fit = partrain.trainer.Trainer.fit


def fit_then_mark(self, *args, **kwargs):
    history = fit(self, *args, **kwargs)
    state["fit_returned"] = True
    return history


partrain.trainer.Trainer.fit = fit_then_mark

if when == "evaluate":
    wrap(partrain.model.Sequential, "evaluate",
         lambda *a, **k: state["fit_returned"] and send())
elif when == "save":
    # every partrain file goes through io.write_npz; model.py and trainer.py import it by name
    for module in (partrain.io, partrain.model, partrain.trainer):
        wrap(module, "write_npz", lambda *a, **k: state["fit_returned"] and send())
elif when == "plot":
    wrap(partrain.plots, "plot_history", lambda *a, **k: send())
elif when.startswith("checkpoint-"):
    nth = int(when.split("-")[1])

    def count(path, kind, *args, **kwargs):
        if kind == "checkpoint" and not state["fit_returned"]:
            state["checkpoints"] += 1
            if state["checkpoints"] == nth:
                send()

    wrap(partrain.trainer, "write_npz", count)
else:
    raise SystemExit(f"unknown WHEN {when!r}")

raise SystemExit(cli.main(argv))
