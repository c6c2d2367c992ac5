"""The data pipeline's own error type."""


class DataError(ValueError):
    """Unusable data or tokenizer input (a file, a prefix, a flag value); the message is one line naming it."""
