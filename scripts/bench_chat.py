"""The chat's speed against `generate`'s, same model, steering, rejection and prompt, in one run:
the chat (tui.app.ChatApp, headless through Textual's test driver, so it lays out and renders
every frame as on a terminal, only the bytes are not written) writes a greedy reply; its tok/s is
the reply loop's own figure, the one the status bar shows. `generate` is `localsteer generate
--json` with the same settings, run in a process of its own: in one process, a second thread
that decodes slows both (docs/methods.md, "One decoding thread"). Goal: the chat within 10% of
generate (ratio >= 0.90).

    .venv/bin/python scripts/bench_chat.py [--model smollm2-135m-instruct]
        [--vector vectors/smollm2-135m-instruct/happy-sad.gguf:2] [--reject-topk 20] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402
from localsteer.errors import LocalsteerError  # noqa: E402
from tui.app import ChatApp  # noqa: E402
from tui.options import ChatOptions  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


async def until(pilot, condition, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the chat did not get there in time")
        await pilot.pause(0.05)


async def chat_speeds(options: ChatOptions, repeats: int) -> list[float]:
    app = ChatApp(options)
    speeds = []
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.session is not None)
        for _ in range(repeats):
            await pilot.press("ctrl+n")
            app.query_one("#prompt").value = PROMPT
            await pilot.press("enter")
            await until(pilot, lambda: len(app.conversation.turns) == 2 and app.conversation.turns[-1].stats is not None)
            speeds.append(app.conversation.turns[-1].stats.tokens_per_second)
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "smollm2-135m-instruct" / "happy-sad.gguf") + ":2")
    ap.add_argument("--reject-topk", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    greedy = api.sampling_config(temperature=0)
    options = ChatOptions(model=args.model, vectors=(args.vector,), reject_topk=args.reject_topk,
                          max_tokens=args.tokens, sampling=greedy)
    chat = asyncio.run(chat_speeds(options, args.repeats))
    gen = []
    for _ in range(args.repeats):  # `localsteer generate` itself, in a process of its own
        out = subprocess.run([str(ROOT / ".venv" / "bin" / "localsteer"), "generate", "-m", args.model, "-v", args.vector,
                              "--reject-topk", str(args.reject_topk), "--temp", "0", "-n", str(args.tokens), "--json",
                              PROMPT], capture_output=True, text=True, check=True).stdout
        gen.append(json.loads(out)["tokens_per_second"])
    g, c = statistics.median(gen), statistics.median(chat)
    print(f"{args.model}, {Path(args.vector.rsplit(':', 1)[0]).name}, reject top-{args.reject_topk}, "
          f"{args.tokens} tokens greedy, median of {args.repeats}")
    print(f"generate {g:.1f} tok/s ({' '.join(f'{x:.1f}' for x in gen)}); chat {c:.1f} tok/s "
          f"({' '.join(f'{x:.1f}' for x in chat)}); chat / generate {c / g:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    try:
        main()
    except LocalsteerError as e:
        sys.exit(f"error: {e}")
