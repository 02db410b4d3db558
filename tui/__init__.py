"""localsteer's terminal chat app (`localsteer chat`), a Textual app over the public API.

The package lives in `tui/` and is imported as `localsteer_tui`.
"""

from __future__ import annotations

from .app import ChatApp
from .options import ChatOptions

__all__ = ["ChatApp", "ChatOptions", "run"]


def run(options: ChatOptions) -> None:
    ChatApp(options).run()
