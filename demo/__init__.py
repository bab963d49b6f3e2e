"""``make demo`` (``python -m demo``): the newcomer's path on one machine, and its synthetic data set.
Not part of the installed library: run it from the repository root."""
