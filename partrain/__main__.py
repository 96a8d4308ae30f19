"""`python -m partrain ...` runs the command line."""

try:
    from .cli import main
except KeyboardInterrupt:  # (partrain/__init__.py guards the imports before this one)
    raise SystemExit(130) from None

raise SystemExit(main())
