"""A multi-turn chat with a radixkv server through the official `openai` client.

Every turn resends the whole conversation (that is how chat APIs work), so from the second turn on the
server finds the earlier turns' KV in its prefix cache: watch the cached tokens grow and the time to
first token stay low while the prompt gets longer.

    cachemgr up                              # in one terminal
    python examples/chat_demo.py             # in another; --interactive to type your own turns
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from openai import OpenAI

SYSTEM_PROMPT = (
    "You are a helpful assistant for a small bakery. The bakery opens at 7am and closes at 6pm, Tuesday "
    "to Sunday. It sells sourdough, rye, baguettes, croissants, cinnamon rolls and seasonal fruit tarts. "
    "Answer in one or two short sentences."
)
SCRIPTED_TURNS = (
    "When are you open?",
    "Which breads do you sell?",
    "Is there anything sweet?",
    "Are you open on Mondays?",
    "Thanks! What would you recommend for breakfast?",
)


def user_turns(interactive: bool) -> Iterator[str]:
    if not interactive:
        yield from SCRIPTED_TURNS
        return
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if line in ("", "/quit", "/exit"):
            return
        yield line


def chat(client: OpenAI, model: str, turns: Iterator[str], max_tokens: int) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for number, question in enumerate(turns, start=1):
        messages.append({"role": "user", "content": question})
        print(f"\n[turn {number}] user: {question}")
        print("assistant: ", end="", flush=True)
        start = time.perf_counter()
        ttft: float | None = None
        reply: list[str] = []
        usage = None
        stream = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - start
                reply.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
        total = time.perf_counter() - start
        messages.append({"role": "assistant", "content": "".join(reply)})
        cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
        prompt_tokens = usage.prompt_tokens if usage else 0
        share = f"{100 * cached / prompt_tokens:.0f}%" if prompt_tokens else "-"
        ttft_ms = f"{1000 * ttft:.0f} ms" if ttft is not None else "-"
        print(
            f"\n  time to first token {ttft_ms} | total {1000 * total:.0f} ms | prompt {prompt_tokens} tokens, "
            f"cached {cached} ({share})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none", help="needed only when the server has API keys")
    p.add_argument("--model", default=None, help="default: the model the server serves")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--interactive", action="store_true", help="type the user turns yourself")
    args = p.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"chatting with {model} at {args.base_url}")
    chat(client, model, user_turns(args.interactive), args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
