"""Chat with a running rp_ray app through the official `openai` client (streams the reply to stdout).

    python jobs/chat.py --model haruhi "阿虚:「早」"
    python jobs/chat.py --url http://127.0.0.1:8000 --model base --system "你是凉宫春日。" "你好"

The API key comes from --api-key-file or the RP_RAY_API_KEY environment variable. `--model` names the base
model, an adapter or a character (GET /v1/models lists them; --list prints them).
"""

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("message", nargs="?", help="the user message")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL (default %(default)s)")
    ap.add_argument("--model", default="haruhi", help="base model, adapter or character (default %(default)s)")
    ap.add_argument("--system", help="a system prompt (replaces a character's own)")
    ap.add_argument("--api-key-file", help="file holding the API key (default: $RP_RAY_API_KEY)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--list", action="store_true", help="list the served models and characters, then exit")
    a = ap.parse_args(argv)
    key = (
        Path(a.api_key_file).read_text(encoding="utf-8").strip() if a.api_key_file else os.environ.get("RP_RAY_API_KEY")
    )
    if not key:
        ap.error("no API key: set RP_RAY_API_KEY or pass --api-key-file")
    from openai import APIError, OpenAI

    client = OpenAI(base_url=a.url.rstrip("/") + "/v1", api_key=key, max_retries=0, timeout=300)
    try:
        if a.list:
            for m in client.models.list().data:
                print(f"{m.id}\t{m.kind}\t{getattr(m, 'display_name', '') or ''}")
            return 0
        if not a.message:
            ap.error("give a message (or --list)")
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.message}
        ]
        stream = client.chat.completions.create(
            model=a.model, messages=messages, temperature=a.temperature, max_tokens=a.max_tokens, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    except APIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
