"""Drives the stack's listener with the official `openai` Python SDK, as a client would.

Usage: openai_sdk.py BASE_URL API_KEY SCENARIO, where SCENARIO is

- `naive`: `stream=True` without `stream_options`, read with the naive loop
  (`chunk.choices[0].delta.content`), which fails on a chunk without choices;
- `include_usage`: `stream=True` with `stream_options={"include_usage": True}`: the usage
  chunk (`choices == []`) must arrive;
- `plain`: a chat completion, not streamed;
- `rate_limited`: chat completions without retries (`max_retries=0`) until one is refused:
  the SDK must raise `openai.RateLimitError`, whose response's headers are printed;
- `retried`: the budget spent as in `rate_limited`, then one chat completion with retries on
  (`max_retries=3`) through an `httpx` client that records each attempt's time: the SDK waits
  the advertised `retry-after-ms` after the 429, then succeeds.

Prints one JSON object with what the client saw; exits non-zero on any other exception.
"""

import json
import sys
import time

import openai

try:  # openai >= 3 speaks httpx2; older releases httpx
    import httpx2 as httpx
except ImportError:
    import httpx

MESSAGES = [{"role": "user", "content": "hello there from the sdk"}]


def make_client(base_url, api_key, max_retries=0, http_client=None):
    # The stack authenticates `Authorization: APIKEY <key>`; the SDK would send `Bearer`.
    return openai.OpenAI(
        base_url=base_url,
        api_key="unused",
        default_headers={"Authorization": f"APIKEY {api_key}"},
        max_retries=max_retries,
        timeout=30,
        http_client=http_client,
    )


def refusal(client):
    """Chat completions until one is refused: the `openai.RateLimitError`'s details and how
    many were served before it."""
    for served in range(20):
        try:
            client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=12)
        except openai.RateLimitError as e:
            headers = e.response.headers
            return {
                "served_before": served,
                "status": e.status_code,
                "code": e.code,
                "retry_after": headers.get("retry-after"),
                "retry_after_ms": headers.get("retry-after-ms"),
                "headers": {k: v for k, v in headers.items() if "ratelimit" in k},
            }
    raise SystemExit("never refused")


def retried(base_url, api_key):
    """One chat completion with retries on, each HTTP attempt's times recorded (monotonic
    seconds): `sent` when the request leaves, `received` when its response's headers came."""
    attempts = []

    def on_request(request):
        attempts.append({"sent": time.monotonic()})

    def on_response(response):
        attempts[-1].update(
            received=time.monotonic(),
            status=response.status_code,
            retry_after=response.headers.get("retry-after"),
            retry_after_ms=response.headers.get("retry-after-ms"),
        )

    http = httpx.Client(event_hooks={"request": [on_request], "response": [on_response]})
    client = make_client(base_url, api_key, max_retries=3, http_client=http)
    completion = client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=12)
    gaps_ms = [
        (later["sent"] - earlier["received"]) * 1000
        for earlier, later in zip(attempts, attempts[1:])
    ]
    return {
        "attempts": [
            {k: a.get(k) for k in ("status", "retry_after", "retry_after_ms")} for a in attempts
        ],
        "gaps_ms": gaps_ms,
        "text": completion.choices[0].message.content,
    }


def main() -> None:
    base_url, api_key, scenario = sys.argv[1:4]
    client = make_client(base_url, api_key)
    messages = MESSAGES
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
    elif scenario == "rate_limited":
        out.update(refusal(client))
    elif scenario == "retried":
        refused = refusal(client)
        if int(refused["retry_after_ms"]) < 1500:
            # The window resets in a moment: spend the next one, so that the first attempt
            # below is refused too.
            time.sleep(int(refused["retry_after_ms"]) / 1000 + 0.1)
            refused = refusal(client)
        out.update(refused=refused, retried=retried(base_url, api_key))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
