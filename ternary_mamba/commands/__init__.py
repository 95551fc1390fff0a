"""The commands: one function per CLI command over its typed config (configs.py), shared by the CLI and the
Python API; flags.py turns the configs into the CLI's flags."""
