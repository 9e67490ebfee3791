"""The one error of export and import: a model, file or flag that cannot be converted, in one line."""


class ExportError(ValueError):
    """The message names the tensor, key, flag or file, and what to do instead."""
