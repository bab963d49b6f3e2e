"""The errors onenip-ray raises on purpose: one family under ``OneNipError``, one class per kind of
answer. The CLI maps the kinds to exit codes (input 2, rejected 3, busy 4) and Serve to HTTP
statuses; any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class OneNipError(Exception):
    """Base of every error onenip-ray raises on purpose."""


class InputError(OneNipError, ValueError):
    """Bad arguments or input data (a flag, a dataset, an image, a manifest); the message names it
    and says what was expected."""


class BundleError(InputError):
    """A model bundle or export that must not be used: missing files, another format, files that do
    not match its version or disagree with each other."""


class BusyError(OneNipError):
    """Someone else holds what this needs (a night's lease, the release pointer); retry later."""


class RejectedError(OneNipError):
    """The work broke one of its limits and nothing was committed."""
