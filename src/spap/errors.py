"""User-facing errors.

Every problem a user can fix (bad path, bad sparsity, too little text, ...) is raised as
`SpapError`; the CLI prints its message on one line and exits with status 2. Anything else is a
bug and keeps its traceback.
"""


class SpapError(Exception):
    """A problem with the user's input, with a message that names the fix."""
