"""Drives the stack's listener with the official `openai` Python SDK, as a client would.

Usage: openai_sdk.py BASE_URL API_KEY SCENARIO, where SCENARIO is

- `naive`: `stream=True` without `stream_options`, read with the naive loop
  (`chunk.choices[0].delta.content`), which fails on a chunk without choices;
- `include_usage`: `stream=True` with `stream_options={"include_usage": True}`: the usage
  chunk (`choices == []`) must arrive;
- `plain`: a chat completion, not streamed.

Prints one JSON object with what the client saw; exits non-zero on any exception.
"""

import json
import sys

import openai


def main() -> None:
    base_url, api_key, scenario = sys.argv[1:4]
    # The stack authenticates `Authorization: APIKEY <key>`; the SDK would send `Bearer`.
    client = openai.OpenAI(
        base_url=base_url,
        api_key="unused",
        default_headers={"Authorization": f"APIKEY {api_key}"},
        max_retries=0,
        timeout=30,
    )
    messages = [{"role": "user", "content": "hello there from the sdk"}]
    out = {"sdk_version": openai.__version__}
    if scenario == "naive":
        stream = client.chat.completions.create(
            model="sim", messages=messages, max_tokens=12, stream=True
        )
        text = []
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
        out.update(chunks=len(text), text="".join(text))
    elif scenario == "include_usage":
        stream = client.chat.completions.create(
            model="sim",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        usage = [c for c in chunks if not c.choices and c.usage is not None]
        out.update(
            chunks=len(chunks),
            usage_chunks=len(usage),
            usage=usage[-1].usage.model_dump() if usage else None,
        )
    elif scenario == "plain":
        completion = client.chat.completions.create(
            model="sim", messages=messages, max_tokens=12
        )
        out.update(
            text=completion.choices[0].message.content,
            usage=completion.usage.model_dump() if completion.usage else None,
        )
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
