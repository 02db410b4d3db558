"""The chat app's dialogs and its compare screen, one per module."""
