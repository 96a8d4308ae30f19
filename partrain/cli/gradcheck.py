"""`partrain gradcheck`: the analytic gradient against central differences, per array."""

from __future__ import annotations

import numpy as np

from .. import zoo
from ..io import check_fits_memory, read_npz
from ..model import model_from_arrays
from .common import EXIT_FAILURE, UsageError, given


def cmd_gradcheck(args) -> int:
    from ..gradcheck import gradcheck

    for option, value, ok in (("--eps", args.eps, args.eps > 0),
                              ("--n-params", args.n_params, args.n_params >= 1),
                              ("--examples", args.examples, args.examples >= 1)):
        if not ok:
            raise UsageError(f"{option} must be > 0, got {value}")
    if args.model_file is not None:
        if args.model is not None:
            raise UsageError("give a MODEL.npz or --model NAME, not both")
        meta, arrays = read_npz(args.model_file, ("model", "checkpoint"))
        model = model_from_arrays(meta, arrays, args.model_file).copy("float64")
        what = f"{args.model_file} at its saved parameters"
    else:
        name = given(args.model, "digits-cnn")
        model = zoo.get(name, seed=args.seed, dtype="float64")
        what = f"{name} at its initial parameters (seed {args.seed})"
    check_fits_memory(f"--examples {args.examples}: the inputs",  # (before allocating them)
                      (args.examples, *model.input_shape), np.float64)
    rng = np.random.default_rng(args.seed)
    X = rng.random((args.examples, *model.input_shape))
    y = rng.integers(0, model.n_classes, args.examples)
    print(f"gradcheck of {what}, on {args.examples} random inputs; up to {args.n_params} "
          "entries of each parameter array")
    result = gradcheck(model, X, y, eps=args.eps, n_params=args.n_params, seed=args.seed)
    width = max(len(name) for name in result.per_param) if result.per_param else 0
    for name, ratio in result.per_param.items():
        checked, size = result.checked[name]
        kinks = f"; {result.kinks[name]:,} at a kink" if result.kinks[name] else ""
        shown = "-" if checked == 0 else f"{ratio:.3e}"
        print(f"  {name:<{width}}  {shown:>9}  ({checked:,} of {size:,}{kinks})")
    if result.n_kinks:
        examples = ", ".join(map(str, result.kink_examples))
        print(f"{result.n_kinks:,} entries left out: their +-eps steps moved a ReLU or max-pool "
              f"of example(s) {examples} across its kink, where the loss has no derivative")
    verdict = "PASS" if result.passed(args.tol) else "FAIL"
    print(f"{verdict}: relative difference {result.rel_diff:.3e} over {result.n_checked:,} "
          f"of {model.n_params:,} parameters in {len(result.per_param)} arrays (tolerance "
          f"{args.tol:g})")
    return 0 if verdict == "PASS" else EXIT_FAILURE
