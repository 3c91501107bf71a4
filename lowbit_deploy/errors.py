class UserError(Exception):
    """An error caused by user input: printed without a traceback by the CLI."""
