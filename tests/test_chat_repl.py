"""The terminal chat (``rp-ray chat``, ``rp_ray.cli.chat``): its pure helpers and loop with a fake client, its
start-up errors as a command, and a real session in tmux against the session's shared app (greeting, streamed
replies, /model, /reset, /exit and Ctrl-D)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import KEY, PROMPTS, REPO

from rp_ray.cli.chat import (
    ChatError,
    ChatREPL,
    build_messages,
    estimate_tokens,
    message_text,
    parse_command,
    printable,
    read_api_key,
    server_root,
    trim_history,
)
from rp_ray.cluster import free_port

RP_RAY = str(Path(sys.executable).parent / "rp-ray")  # the installed command a user types


def test_server_root_and_key(tmp_path):
    assert server_root("http://h:8000/v1/") == server_root(" http://h:8000 ") == "http://h:8000"
    (tmp_path / "k").write_text("file-key-1\n")
    assert read_api_key(str(tmp_path / "k"), {"RP_RAY_API_KEY": "env-key"}) == "file-key-1"
    assert read_api_key(None, {"RP_RAY_API_KEY": " env-key \n"}) == "env-key"
    for args, match in [
        ((None, {}), "no API key: pass --api-key-file FILE or set RP_RAY_API_KEY"),
        ((str(tmp_path / "missing"), {}), "does not exist"),
    ]:
        with pytest.raises(ChatError, match=match):
            read_api_key(*args)


def test_commands_are_told_from_messages():
    assert parse_command("/model  base ") == ("/model", "base")
    assert parse_command("/RESET") == ("/reset", "")
    assert parse_command("你好") is None and parse_command("//etc") is None
    assert message_text("//etc/passwd") == "/etc/passwd" and message_text("hi") == "hi"
    assert printable("「哼」\x1b[2J\r\n\t\x85") == "「哼」\\x1b[2J\\x0d\n\t\\x85"  # shown, not obeyed


def _turns(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"问题{i}" * 10}, {"role": "assistant", "content": f"回答{i}" * 10}]
    return out


def test_trim_history_drops_the_oldest_turns_first():
    history = [*_turns(3), {"role": "user", "content": "最后"}]
    assert trim_history("S", history, estimate_tokens, 10_000) == (history, 0)
    full = estimate_tokens(build_messages("S", history))
    kept, dropped = trim_history("S", history, estimate_tokens, full - 1)
    assert dropped == 1 and kept == history[2:]  # the oldest user message and its reply went together
    kept, dropped = trim_history("S", history, estimate_tokens, 1)
    assert kept == history[-1:] and dropped == 3  # the message being sent is always kept
    kept, dropped = trim_history(None, history, estimate_tokens, 10_000, max_messages=4)
    assert kept == history[-3:] and dropped == 2
    assert build_messages("S", history[-1:]) == [{"role": "system", "content": "S"}, history[-1]]
    assert estimate_tokens([{"role": "user", "content": "你好"}]) == 6 + 8 + 1  # UTF-8 bytes, not characters


class FakeStream:
    def __init__(self, parts, fail=None):
        self.parts, self.fail, self.closed = parts, fail, False

    def __iter__(self):
        for p in self.parts:
            yield SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=p))])
        if self.fail:
            raise self.fail

    def close(self):
        self.closed = True


class FakeClient:
    """What the REPL uses of ``openai.OpenAI``: models.list() and chat.completions.create(stream=True)."""

    def __init__(self):
        self.sent, self.replies, self.streams = [], [], []
        data = [
            SimpleNamespace(id="base", kind="base"),
            SimpleNamespace(id="haruhi", kind="character", display_name="凉宫春日", greeting="「你好！」"),
        ]
        self.models = SimpleNamespace(list=lambda: SimpleNamespace(data=data))
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **kw):
        self.sent.append(kw)
        reply = self.replies.pop(0)  # a list of pieces, (pieces, the error after them), or an error at once
        if isinstance(reply, BaseException):
            raise reply
        stream = FakeStream(*reply) if isinstance(reply, tuple) else FakeStream(reply)
        self.streams.append(stream)
        return stream


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def repl(lines, replies, tokenize=None, **kw):
    client, out = FakeClient(), Recorder()
    client.replies = list(replies)
    feed = iter(lines)

    def read(prompt):
        out.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    r = ChatREPL(client, "haruhi", out=out, read=read, tokenize=tokenize, **kw)
    return r, client, out


def test_the_loop_streams_replies_and_runs_commands():
    conn = openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions"))
    r, client, out = repl(
        [
            "你好",
            "/system 你是春日。",
            "再见",
            "/reset",
            "/model nobody",
            "/model base",
            "嗯",
            "/bogus",
            "坏了",
            "/exit",
        ],
        [["「", "哼", "」"], ["「走", "了」"], ["ok"], (["半"], conn)],
        temperature=0.0,
        max_tokens=16,
    )
    assert r.run() == 0
    text = out.getvalue()
    assert text.startswith("[haruhi] /help") and "凉宫春日> 「你好！」" in text  # the greeting opens the chat
    assert "凉宫春日> 「哼」\n" in text and {"「", "哼", "」"} <= set(out.writes)  # each piece written as it came
    first, second, third, fourth = client.sent
    assert first["messages"] == [{"role": "user", "content": "你好"}] and first["stream"]
    assert (first["model"], first["temperature"], first["max_tokens"]) == ("haruhi", 0.0, 16)
    assert second["messages"] == [
        {"role": "system", "content": "你是春日。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "「哼」"},
        {"role": "user", "content": "再见"},
    ]
    assert "(history cleared)" in text and "no model 'nobody' on the server; it serves: base, haruhi" in text
    assert third["model"] == "base" and third["messages"] == [
        {"role": "system", "content": "你是春日。"},
        {"role": "user", "content": "嗯"},
    ]
    assert "base> ok" in text and "unknown command /bogus" in text
    assert "error: cannot reach the server" in text and "Traceback" not in text
    assert fourth["messages"][-1] == {"role": "user", "content": "坏了"} and client.streams[-1].closed
    assert r.session.history[-1] == {"role": "assistant", "content": "ok"}  # the failed turn is not kept
    assert text.rstrip().endswith("bye")


def test_the_history_is_trimmed_with_the_servers_count():
    counted = []

    def tokenize(body):
        if "prompt" in body:
            return {"count": 1, "max_model_len": 100, "tokens": [1]}
        counted.append(len(body["messages"]))
        return {"count": 30 * len(body["messages"]), "max_model_len": 100, "tokens": []}

    r, client, out = repl(["一", "二", "三"], [["a"], ["b"], ["c"]], tokenize=tokenize, max_tokens=20)
    assert r.context == 100
    r.run()
    # 80 tokens for the prompt: 2 messages fit, 4 do not (the oldest turn goes), as the server counted
    assert [len(s["messages"]) for s in client.sent] == [1, 1, 1]
    assert "(dropped the 1 oldest turn to fit the context)" in out.getvalue() and counted == [3, 3]


def _chat_command(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RP_RAY, "chat", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_start_up_errors_are_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RP_RAY_API_KEY"}
    r = subprocess.run(
        [RP_RAY, "chat", "--model", "haruhi"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: no API key: pass --api-key-file FILE or set RP_RAY_API_KEY"
    down = f"http://127.0.0.1:{free_port()}"
    r = _chat_command("--model", "haruhi", "--base-url", down, env={"RP_RAY_API_KEY": "some-key-123"})
    assert r.returncode == 2 and f"error: cannot reach the server at {down}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_start_up_errors_against_the_app(app, tmp_path):
    key = tmp_path / "key"
    key.write_text(KEY)
    r = _chat_command("--model", "haruhi", "--base-url", app.url, env={"RP_RAY_API_KEY": "wrong-key-123"})
    assert r.returncode == 2 and "error: the server refused the API key" in r.stderr and "Traceback" not in r.stderr
    r = _chat_command("--model", "nobody", "--base-url", f"{app.url}/v1", "--api-key-file", str(key))
    assert (
        r.returncode == 2 and "error: no model 'nobody' on the server; it serves: base, a1, a2, haruhi, aoi" in r.stderr
    )


class Tmux:
    """One chat in a tmux session on a tmux server of its own (its own socket): never another user's sessions."""

    def __init__(self, name: str, command: str, cwd: Path):
        self.sock = ["tmux", "-L", name]
        subprocess.run(
            [*self.sock, "new-session", "-d", "-s", name, "-x", "200", "-y", "50", "-c", str(cwd), command], check=True
        )
        subprocess.run([*self.sock, "set-option", "-t", name, "remain-on-exit", "on"], check=True)
        self.name = name

    def screen(self) -> str:
        return subprocess.run(
            [*self.sock, "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name], capture_output=True, text=True
        ).stdout

    def dead(self) -> bool:
        r = subprocess.run(
            [*self.sock, "display", "-p", "-t", self.name, "#{pane_dead}"], capture_output=True, text=True
        )
        return r.stdout.strip() == "1"

    def type(self, text: str) -> None:
        subprocess.run([*self.sock, "send-keys", "-t", self.name, "-l", text], check=True)
        subprocess.run([*self.sock, "send-keys", "-t", self.name, "Enter"], check=True)

    def key(self, key: str) -> None:
        subprocess.run([*self.sock, "send-keys", "-t", self.name, key], check=True)

    def wait(self, check, timeout: float = 300) -> str:
        t0 = time.monotonic()
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            assert time.monotonic() - t0 < timeout, f"timed out; the screen:\n{screen}"
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([*self.sock, "kill-server"], capture_output=True)


def _squash(s: str) -> str:
    return "".join(s.split())


def _reply(screen: str, label: str) -> str:
    """The last reply labelled ``label`` on the screen (it may span lines), up to the next prompt."""
    return screen.split(label)[-1].split("\nyou> ")[0]


def _prompts(screen: str) -> int:
    return sum(1 for line in screen.splitlines() if line.startswith("you> "))


@pytest.mark.slow
def test_terminal_chat_in_tmux(app, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    base = f"{RP_RAY} chat --base-url {app.url} --api-key-file {key}"
    chat = Tmux(f"rpchat{os.getpid()}", f"{base} --model haruhi --temperature 0 --max-tokens 24", REPO)
    try:
        screen = chat.wait(lambda s: "you> " in s)
        assert "[haruhi] /help for commands" in screen and "凉宫春日> 「你好！」" in screen  # the card's greeting
        chat.type(PROMPTS[0])
        screen = chat.wait(lambda s: _prompts(s) == 2)
        assert _squash(_reply(screen, "凉宫春日> ")) == _squash(
            printable(app.ref[("haruhi", PROMPTS[0])])
        )  # the greedy reply
        chat.type("/model base")
        chat.wait(lambda s: "(switched to base; the history is kept)" in s and _prompts(s) == 3)
        chat.type("/reset")
        chat.wait(lambda s: "(history cleared)" in s and _prompts(s) == 4)
        chat.type(PROMPTS[1])
        screen = chat.wait(lambda s: _prompts(s) == 5)
        assert _squash(_reply(screen, "base> ")) == _squash(
            printable(app.ref[("base", PROMPTS[1])])
        )  # nothing before it sent
        chat.type("/exit")
        screen = chat.wait(lambda s: chat.dead())
        assert "bye" in screen and "Traceback" not in screen
    finally:
        chat.close()
    eof = Tmux(f"rpeof{os.getpid()}", f"{base} --model a1", REPO)
    try:
        eof.wait(lambda s: "you> " in s)
        eof.key("C-d")
        screen = eof.wait(lambda s: eof.dead())
        assert "bye" in screen and "Traceback" not in screen
    finally:
        eof.close()
