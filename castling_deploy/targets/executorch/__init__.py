"""ExecuTorch target (``--target executorch``): XNNPACK-delegated ``.pte`` programs; see ``target.py``."""
