"""Deployment targets: one module per target (build, load a runner, capabilities); heavy imports inside functions."""
