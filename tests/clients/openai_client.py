"""The official `openai` Python package against infergate's OpenAI front, unchanged.

    openai_client.py BASE_URL KEY OTHER_TENANTS_KEY TOKENIZER_JSON

The model is triton-models/tiny_chat (it says the last user turn back, token by token), so
each answer's text is known here. Usage is checked against the tokenizer's own count (the
`tokenizers` package on the model's tokenizer.json), the prompt rendered by hand from the
model's template. Prints one line per check and "N passed, M failed".
"""
import sys
import traceback

import openai
from tokenizers import Tokenizer

BASE, KEY, OTHER_KEY, TOKENIZER = sys.argv[1:5]
MODEL = "tiny-chat"
tok = Tokenizer.from_file(TOKENIZER)
client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)

passed, failed = 0, 0


def count(text):
    return len(tok.encode(text, add_special_tokens=False).ids)


def rendered(messages):
    """tiny_chat's chat_template, written out by hand."""
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return out + "<|assistant|>\n"


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"PASS {name}")
    except Exception:
        failed += 1
        print(f"FAIL {name}\n{traceback.format_exc()}")


def expect_error(cls, status, fn, param=None, code=None):
    try:
        fn()
    except cls as e:
        assert e.status_code == status, (e.status_code, e)
        body = e.body or {}
        assert isinstance(body, dict) and "message" in body, body
        if param is not None:
            assert body.get("param") == param, body
        if code is not None:
            assert body.get("code") == code, body
        return
    raise AssertionError(f"expected {cls.__name__}")


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, world! Say hi to the cat"},
]
SAID = "Hello, world! Say hi to the cat"


def models_list():
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL], ids
    assert client.models.retrieve(MODEL).id == MODEL
    # The other tenant may call another model only: it sees that one, and ours is unknown to it.
    other = openai.OpenAI(base_url=BASE, api_key=OTHER_KEY, max_retries=0)
    assert [m.id for m in other.models.list()] == ["tiny-echo"]
    expect_error(
        openai.NotFoundError, 404,
        lambda: other.chat.completions.create(model=MODEL, messages=CHAT),
        code="model_not_found",
    )


def chat():
    r = client.chat.completions.create(model=MODEL, messages=CHAT)
    assert r.object == "chat.completion" and r.model == MODEL, r
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == SAID, c
    assert c.finish_reason == "stop", c
    assert r.usage.prompt_tokens == count(rendered(CHAT)), (r.usage, count(rendered(CHAT)))
    assert r.usage.completion_tokens == count(SAID) == 9, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def chat_stream():
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == SAID, text
    # One chunk per token the model sent, then the finish, then usage alone.
    pieces = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) == count(SAID), len(pieces)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last
    assert last.usage.prompt_tokens == count(rendered(CHAT)), last.usage
    assert last.usage.completion_tokens == count(SAID), last.usage


def sampling():
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert r.choices[0].message.content == "Hello, world", r.choices[0]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3, r
    r = client.chat.completions.create(model=MODEL, messages=CHAT, stop=["Say", "cat"])
    assert r.choices[0].message.content == "Hello, world! ", r.choices[0]
    assert r.choices[0].finish_reason == "stop"
    # temperature and seed reach the model: a shuffle of the same tokens, the same each time.
    a = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0.8, seed=7, top_p=0.9)
    b = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0.8, seed=7, top_p=0.9)
    ta, tb = a.choices[0].message.content, b.choices[0].message.content
    assert ta == tb and ta != SAID, (ta, tb)
    assert sorted(tok.encode(ta).tokens) == sorted(tok.encode(SAID).tokens), ta
    # n choices, each seeded apart.
    r = client.chat.completions.create(model=MODEL, messages=CHAT, n=3, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    assert len({c.message.content for c in r.choices}) > 1, r.choices
    assert r.usage.completion_tokens == 3 * count(SAID), r.usage


def completions():
    r = client.completions.create(model=MODEL, prompt="one two three, four", max_tokens=16)
    assert r.object == "text_completion", r
    assert r.choices[0].text == "one two three, four" and r.choices[0].finish_reason == "stop", r
    assert r.usage.prompt_tokens == count("one two three, four") == 5, r.usage
    assert r.usage.completion_tokens == 5, r.usage
    parts = list(client.completions.create(model=MODEL, prompt="red green blue", stream=True))
    assert "".join(p.choices[0].text for p in parts) == "red green blue", parts
    assert parts[-1].choices[0].finish_reason == "stop", parts[-1]
    # Two prompts: a choice each.
    r = client.completions.create(model=MODEL, prompt=["one two", "three"])
    assert [c.text for c in r.choices] == ["one two", "three"], r.choices


def errors():
    expect_error(openai.NotFoundError, 404,
                 lambda: client.chat.completions.create(model="gpt-9", messages=CHAT),
                 param="model", code="model_not_found")
    bad = openai.OpenAI(base_url=BASE, api_key="sk-not-a-key-0123456789", max_retries=0)
    expect_error(openai.AuthenticationError, 401,
                 lambda: bad.chat.completions.create(model=MODEL, messages=CHAT),
                 code="invalid_api_key")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5),
                 param="temperature")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=CHAT, top_p=1.5),
                 param="top_p")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=CHAT, n=0),
                 param="n")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=0),
                 param="max_tokens")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=[]),
                 param="messages")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(
                     model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
                 param="messages")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=CHAT,
                                                        extra_body={"temprature": 1}),
                 param="temprature")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(model=MODEL, messages=CHAT,
                                                        frequency_penalty=1.0),
                 param="frequency_penalty")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.completions.create(model=MODEL, prompt=[1, 2, 3]),
                 param="prompt")


def batch():
    import io
    import json
    import time
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": f"one two {i}"}]}}
             for i in range(10)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.bytes == len(data) and f.purpose == "batch", f
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    deadline = time.time() + 60
    while b.status not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, b
        time.sleep(0.2)
        b = client.batches.retrieve(b.id)
    assert b.status == "completed" and b.request_counts.completed == 10, b
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    got = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in out}
    assert got == {f"q{i}": f"one two {i}" for i in range(10)}, got


for name, fn in [("models.list", models_list), ("chat", chat), ("chat stream", chat_stream),
                 ("sampling", sampling), ("completions", completions), ("errors", errors), ("batch", batch)]:
    check(name, fn)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
