"""Training: Lightning module and data module, callbacks, and the `lseg train` / `lseg quickstart` jobs."""
