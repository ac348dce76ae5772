"""The one user-facing error type: the CLI prints its message on one line and exits with 1."""


class ActVarError(Exception):
    """A problem with the user's input (files, checkpoints, options, bundles)."""


class CheckpointError(ActVarError):
    """A checkpoint that cannot be loaded: missing, truncated, wrong keys or shapes."""


class BundleError(ActVarError):
    """A deploy bundle that does not match its manifest."""
