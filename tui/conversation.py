"""The conversation: turns with their per-token events, and its Markdown and JSONL forms."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from localsteer.api import Reply, TokenEvent, check_output, write_text


@dataclass
class Turn:
    """One message. An assistant turn also holds its token events, the end-of-generation token
    (if the reply ended with one) and which steering was applied from which token on."""

    role: str  # "user" or "assistant"
    text: str = ""
    events: list[TokenEvent] = field(default_factory=list)
    eog_index: int | None = None
    applied: list[tuple[int, str]] = field(default_factory=list)  # (first token, description)
    stats: Reply | None = None  # the reply loop's own figures (localsteer.api.Reply)
    steered: bool = False  # any steering applied (for the acceptance figure)

    @property
    def done(self) -> bool:
        return self.role == "user" or self.stats is not None

    def add(self, event: TokenEvent, eog: bool) -> None:
        self.events.append(event)
        if eog:
            self.eog_index = event.index
        else:
            self.text += event.text

    def steering_at(self, index: int) -> str:
        """The steering in effect when token `index` was chosen."""
        current = ""
        for start, description in self.applied:
            if start <= index:
                current = description
        return current


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> list[dict]:
        """The finished turns as chat-template messages."""
        return [{"role": t.role, "content": t.text} for t in self.turns if t.done]

    def last_user_text(self) -> str | None:
        users = [t for t in self.turns if t.role == "user"]
        return users[-1].text if users else None

    # --- files ----------------------------------------------------------------------------------

    def to_markdown(self, model: str) -> str:
        lines = ["# localsteer chat", "", f"- model: {model}",
                 f"- saved: {datetime.now().isoformat(timespec='seconds')}", ""]
        for t in self.turns:
            lines += [f"## {'You' if t.role == 'user' else 'Assistant'}", "", t.text.strip(), ""]
            if t.role == "assistant":
                lines += [f"*{_summary(t)}*", ""]
        return "\n".join(lines)

    def to_jsonl(self, model: str) -> str:
        """One JSON object per line: a header, then one per message; assistant messages carry
        their per-token events (`TokenEvent.as_dict()`)."""
        rows: list[dict] = [{"type": "chat", "model": model,
                             "saved": datetime.now().isoformat(timespec="seconds")}]
        for t in self.turns:
            row: dict = {"type": "message", "role": t.role, "content": t.text}
            if t.role == "assistant":
                row["steering"] = [{"from_token": i, "steering": d} for i, d in t.applied]
                if t.stats:
                    row.update(n_tokens=t.stats.n_tokens, seconds=round(t.stats.seconds, 4),
                               tokens_per_second=round(t.stats.tokens_per_second, 2),
                               acceptance=round(t.stats.acceptance, 4) if t.steered else None,
                               stopped=t.stats.stopped)
                row["events"] = [e.as_dict() for e in t.events]
            rows.append(row)
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def save(self, path: Path, model: str, force: bool = False) -> str:
        """Write the Markdown (.md) or JSONL (.jsonl) form; returns which one."""
        kind = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "markdown"
        text = self.to_jsonl(model) if kind == "jsonl" else self.to_markdown(model)
        check_output(path, force)
        write_text(path, text)
        return kind


def _summary(turn: Turn) -> str:
    parts = [f"steering: {' -> '.join(d for _, d in turn.applied) or 'none'}"]
    if turn.stats:
        s = turn.stats
        parts.append(f"{s.n_tokens} tokens, {s.tokens_per_second:.1f} tok/s")
        if turn.steered:
            parts.append(f"full-steering acceptance {s.acceptance:.0%}")
        if s.stopped:
            parts.append("stopped")
    return "; ".join(parts)
