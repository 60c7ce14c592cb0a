"""Runnable entry points: `python -m experiments.<name>`. Thin: parse flags, call the library."""
