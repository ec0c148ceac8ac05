"""The builder's one user-facing error: what is wrong with the request, and how to fix it."""


class BuildError(Exception):
    """A build request that cannot be carried out (bad task, preset or option); the CLI prints it and exits."""
