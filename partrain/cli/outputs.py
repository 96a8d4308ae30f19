"""The files a command writes: every path checked before any work, a write that fails after
the work rescued next to the intended path (else the working directory, else the temporary
folder), and `train`'s set of outputs with its reports."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from ..io import output_problem, write_text
from ..signals import SignalGate
from .common import EXIT_FAILURE, UsageError, dataset_name, given


def check_outputs(checks) -> None:
    """Refuse, before any work, an output path that cannot be written (a missing folder only
    has to be creatable). `checks`: (option, path as the user typed it or None, whether it
    names a folder, a file name to suggest when a folder was given for a file, or None)."""
    for option, typed, folder, example in checks:
        problem = None if typed is None else output_problem(typed, folder=folder)
        if problem:
            hint = f"; e.g. {option} {Path(typed) / example}" \
                if example and Path(typed).is_dir() else ""
            raise UsageError(f"{option} {typed}: {problem}{hint}")


def write_or_rescue(what: str, path: Path, write) -> tuple[Path | None, str | None]:
    """`write(path)`, or the rescue of `write_somewhere`: (where `what` went or None, the
    problem to report or None when it went to `path`)."""
    where, reason = write_somewhere(write, path)
    if where is None:
        return None, f"could not write the {what} to {path} ({reason}) nor to any other place"
    if where != path:
        return where, f"could not write the {what} to {path} ({reason}); wrote it to {where} " \
            "instead"
    return where, None


def write_somewhere(write, path: Path) -> tuple[Path | None, str | None]:
    """`write(path)`, else `write` to the first of `_rescue_paths` that works: (where it went
    or None, why `path` failed or None)."""
    try:
        write(path)
        return path, None
    except OSError as exc:
        reason = exc.strerror or str(exc)
    for other in _rescue_paths(path):
        try:
            write(other)
        except OSError:
            continue
        return other, reason
    return None, reason


def _rescue_paths(path: Path):
    """Where to put a file that could not be written to `path`: next to it, in the working
    directory, in the temporary folder; never over an existing file."""
    tagged = f"{path.stem}.rescued-{os.getpid()}{path.suffix}"
    for other in (path.with_name(tagged), Path.cwd() / path.name, Path.cwd() / tagged,
                  Path(tempfile.gettempdir()) / tagged):
        if not other.exists() and os.path.realpath(other) != os.path.realpath(path):
            yield other


def default_save_name(model_name: str, dataset: str) -> str:
    """Where `train` saves the model without --save: a name that says what it holds, in the
    current folder, e.g. digits-cnn-digits.npz (npz:PATH datasets by their file's stem)."""
    name = Path(dataset[4:]).stem if dataset.startswith("npz:") else dataset
    return f"{model_name}-{name}.npz"


def _position(trainer, epochs: int) -> str:
    """Where an unfinished run stands, e.g. "epoch 2 of 5, after step 17"."""
    if trainer.step_in_epoch:
        return f"epoch {trainer.epoch + 1} of {epochs}, after step {trainer.step_in_epoch}"
    return f"the start of epoch {trainer.epoch + 1} of {epochs}"


class TrainOutputs:
    """The files `train` writes (--save, --history, --plot; --checkpoint is the trainer's).

    Every path is checked when this object is made, before any data load or worker start.
    A write that still fails after training goes next to the intended path, else to the
    working directory, else to the temporary folder, and the report says where.
    """

    def __init__(self, args, model_name: str, signals: SignalGate):
        self.save = Path(given(args.save, default_save_name(model_name, args.dataset)))
        self.history = None if args.history is None else Path(args.history)
        self.plot_dir = None if args.plot is None else Path(args.plot)
        self.checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
        self.signals = signals
        self.written: dict[str, Path | None] = {}  # what -> where (None: nowhere)
        self.problems: list[str] = []
        self.evaluated = False
        self.title = f"{model_name} on {dataset_name(args.dataset) if args.dataset else '?'}"
        checks = [("--save", given(args.save, str(self.save)), False, self.save.name),
                  ("--checkpoint", args.checkpoint, False, "checkpoint.npz"),
                  ("--history", args.history, False, "history.json"),
                  ("--save-best", args.save_best, False, "best.npz")]
        if args.plot is not None:
            checks += [("--plot", args.plot, True, None),
                       ("--plot", str(self.plot_dir / "history.png"), False, None)]
        check_outputs(checks)
        files = [("--save", self.save), ("--checkpoint", self.checkpoint),
                 ("--history", self.history), ("--resume", args.resume),
                 ("--save-best", args.save_best)]
        for (a, path_a), (b, path_b) in itertools.combinations(files, 2):
            if path_a is None or path_b is None or {a, b} == {"--checkpoint", "--resume"}:
                continue
            if os.path.realpath(path_a) == os.path.realpath(path_b) and \
                    os.path.realpath(path_a) != os.path.realpath(os.devnull):
                raise UsageError(f"{a} and {b} both name {path_a}: one would overwrite the "
                                 "other; give them different paths")

    def write_files(self, trainer) -> None:
        """The model and the history, each once; a signal meanwhile waits for the end."""
        with self.signals.held():
            if "model" not in self.written:
                self.written["model"] = self._write("model", self.save, trainer.model.save)
            if self.history is not None and "history" not in self.written:
                text = json.dumps(trainer.history.history, indent=1)
                self.written["history"] = self._write("history", self.history,
                                                      lambda path: write_text(path, text))

    def _write(self, what: str, path: Path, write) -> Path | None:
        where, problem = write_or_rescue(what, path, write)
        self.problems += [problem] if problem else []
        return where

    def plot(self, trainer) -> None:
        if self.plot_dir is None:
            return
        from ..plots import plot_history

        try:
            self.written["plot"] = plot_history(trainer.history.history,
                                                self.plot_dir / "history.png", self.title)
        except OSError as exc:
            self.problems.append(f"could not write the plot {self.plot_dir / 'history.png'} "
                                 f"({exc.strerror or exc})")

    def report(self) -> int:
        """Print where the files went; exit status 1 if one is not where it was asked for."""
        if self.written.get("model"):
            print(f"model saved to {self.written['model']}")
        if self.written.get("plot"):
            print(f"plot: {self.written['plot']}")
        for problem in self.problems:
            print(f"partrain train: failed: {problem}", file=sys.stderr)
        return EXIT_FAILURE if self.problems else 0

    def report_interrupted(self, signum: int, trainer, epochs: int, trained: bool) -> None:
        """One line on stderr: what was saved, and what was not done."""
        why = "stdout was closed" if signum == signal.SIGPIPE else \
            f"interrupted by {signal.Signals(signum).name}"
        if trained:
            done = [f"{what} saved to {path}" for what, path in self.written.items() if path]
            if self.checkpoint is not None:
                done.append(f"checkpoint in {self.checkpoint}")
            expected = ["model"] + (["history"] if self.history is not None else [])
            missing = [what for what in expected if not self.written.get(what)]
            missing += [] if self.evaluated else ["test evaluation"]
            missing += ["plot"] if self.plot_dir is not None and "plot" not in self.written \
                else []
            if signum == signal.SIGPIPE and not missing and not self.problems:
                return  # a closed stdout after a complete run: quiet, as a Unix tool
            line = f"{why} after training: {', '.join(done) or 'nothing written'}"
            if missing:
                line += f"; not done: {', '.join(missing)}"
        else:
            line = f"{why} at {_position(trainer, epochs)}; "
            if self.checkpoint is not None:
                line += f"checkpoint in {self.checkpoint}: go on with --resume {self.checkpoint}"
            else:
                line += "the training so far is lost (no --checkpoint)"
        for problem in self.problems:
            line += f"; {problem}"
        print(f"partrain train: {line}", file=sys.stderr)

    def rescue_checkpoint(self, trainer, exc: OSError, epochs: int, trained: bool) -> None:
        """Training stopped on an OSError (e.g. its checkpoint folder vanished): write the
        checkpoint of the last completed step somewhere, and say where on stderr."""
        where, _ = write_somewhere(trainer.save_checkpoint, self.checkpoint)
        if trained:
            stopped = "training ended"
        else:
            stopped = f"training stopped at {_position(trainer, epochs)}"
        if where is None:
            saved = "and its checkpoint could not be written anywhere"
        else:
            saved = f"the checkpoint of its last step is in {where}"
            saved += "" if trained else f": go on with --resume {where}"
        problem = f"{stopped} with {type(exc).__name__}: {exc.strerror or exc}; {saved}"
        if trained:
            self.problems.append(problem)
        else:
            print(f"partrain train: failed: {problem}", file=sys.stderr)
