"""Runs in the jupyter-server process: the extension app, tornado handlers, registries,
the scheduler and the pools of worker kernels, and the transports to them. Never
unpickles user code and never imports `client`."""
