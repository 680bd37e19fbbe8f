"""Errors a user can act on. The CLIs print their message (no traceback) and exit with code 2."""


class TreespecError(Exception):
    """Base for every error caused by input, configuration or artifacts rather than a bug."""


class InputError(TreespecError):
    """A request or argument is invalid (empty prompt, prompt over the context, bad tree...)."""


class ArtifactError(TreespecError):
    """An artifact directory, manifest, graph or engine is missing, corrupt or mismatched."""


class ModelLoadError(TreespecError):
    """A checkpoint cannot be loaded (unknown preset, unsupported architecture, bad file)."""


class BackendError(TreespecError, RuntimeError):
    """A backend could not be created or run; the message says why and what to do."""
