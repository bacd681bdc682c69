"""memlens's version (one place: the package, run records and audits read it from here)."""

__version__ = "0.2.0"
