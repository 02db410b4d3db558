"""The `localsteer` command line. It parses input and calls the library; no steering logic here.
One module per family of commands; importing them registers their commands on `main`."""

from . import decode, environment, measure, refusal, serve, vectors
from .base import main

__all__ = ["main", "decode", "environment", "measure", "refusal", "serve", "vectors"]
