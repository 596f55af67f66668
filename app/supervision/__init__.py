"""The control plane's child processes: serving processes it starts, watches and restarts, and the
rule that a child never outlives its parent."""
