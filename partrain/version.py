"""The version of partrain (a module of its own, so that the command line can read it
without importing the package it is part of)."""

__version__ = "0.1.0"
