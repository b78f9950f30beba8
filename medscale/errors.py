"""The one exception type for a user's mistake.

Anything below ``cli.py`` that detects bad input (a flag, a config, a data folder, a law file) raises
:class:`UserError` with a message that names what to change. ``cli.main`` turns it into one line
``error: <message>`` on stderr and exit status 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
