"""The streaming endpoint driven by the AI SDK's own client (the `ai` npm
package's AbstractChat and DefaultChatTransport, the core `useChat` wraps),
against real gunicorn and PostgreSQL. `make test` installs the package."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from support import connect, gunicorn, make_user
from fake_llm import streamed

CHECK = Path(__file__).resolve().parent / "ai_sdk"


def run_client(server, user, *texts) -> dict:
    node = shutil.which("node")
    if node is None:
        raise AssertionError("node is not installed: this test needs Node.js 18 or later")
    if not (CHECK / "node_modules" / "ai").is_dir():
        raise AssertionError(f"the ai package is missing: run `npm install --no-package-lock --prefix {CHECK}`"
                             " (make test does)")
    finished = subprocess.run([node, str(CHECK / "chat_check.mjs"), server.url, user.id, user.token, *texts],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def test_use_chat_core_runs_a_conversation(app_url):
    with gunicorn(app_url, workers=1) as server:
        user = make_user()
        result = run_client(server, user, "hello from the AI SDK", "and a second turn")
    assert result["status"] == "ready" and result["errors"] == []
    roles = [message["role"] for message in result["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    replies = [message for message in result["messages"] if message["role"] == "assistant"]
    texts = ["".join(part["text"] or "" for part in reply["parts"] if part["type"] == "text") for reply in replies]
    with connect(app_url, user.id) as conn:
        stored = conn.execute("select id, content from message where role = 'assistant' and conversation_id = %s"
                              " order by id", (result["conversationId"],)).fetchall()
    assert texts == [content for _, content in stored]
    assert texts[0].startswith("turn 1:") and texts[1].startswith("turn 2:")
    assert [reply["metadata"]["assistant_message_id"] for reply in replies] == [row_id for row_id, _ in stored]
    assert all(reply["metadata"]["conversation_id"] == result["conversationId"] for reply in replies)
    assert all(part["state"] == "done" for reply in replies for part in reply["parts"] if part["type"] == "text")


def test_use_chat_core_sees_tool_calls_and_errors(app_url, llm):
    llm.script(streamed(["Adding it."], finish_reason="tool_calls",
                        calls=[{"id": "call_7", "name": "add_task", "arguments": {"title": "milk"}}]),
               streamed(["half"], cut_after=2))
    with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="fake-model") as server:
        result = run_client(server, make_user(), "add milk", "this one breaks")
    first = result["messages"][1]
    tool = next(part for part in first["parts"] if part["type"] == "tool-add_task")
    assert tool["toolCallId"] == "call_7" and tool["input"] == {"title": "milk"} and tool["state"] == "input-available"
    assert result["status"] == "error" and result["errors"], result


def test_use_chat_core_resumes_on_a_second_chat_and_stops(app_url, llm):
    """`resumeStream()` on a second chat object (a reload) while the first one's
    reply streams: both end with the same message. Then `stop()` beside a call
    to the stop route: the client stops reading, the server stops the reply."""
    pieces = [f"part{n} " for n in range(15)]
    llm.script(streamed(pieces, interval_s=0.2), streamed(pieces, interval_s=0.2))
    user = make_user()
    with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="fake-model", CHAT_STREAM_FLUSH_S="0.5") as server:
        node = shutil.which("node")
        finished = subprocess.run([node, str(CHECK / "resume_check.mjs"), server.url, user.id, user.token],
                                  capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    first, reloaded = result["first"]["messages"], result["reloaded"]["messages"]
    assert result["first"]["status"] == result["reloaded"]["status"] == "ready"
    assert first[-1]["text"] == reloaded[-1]["text"] == "".join(pieces)
    assert reloaded[-1]["id"] == first[-1]["id"] and reloaded[-1]["role"] == "assistant"
    assert result["stopRoute"]["stopped"] is True
    reply = result["stoppedMessages"][-1]
    assert reply["status"] == "stopped" and reply["id"] == result["stopRoute"]["assistant_message_id"]
    assert reply["content"] != "".join(pieces) and "".join(pieces).startswith(reply["content"])


def test_use_chat_unmodified_sends_regenerates_and_edits(app_url):
    """Nothing customised: the transport's own body, the chat's own id. After
    each step the chat's messages (ids, roles, texts) are the server's
    `?format=ui` page."""
    user = make_user()
    with gunicorn(app_url, workers=1) as server:
        finished = subprocess.run([shutil.which("node"), str(CHECK / "use_chat_check.mjs"), server.url, user.id,
                                   user.token], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert result["status"] == "ready" and result["errors"] == [], result
    for step in result["steps"]:
        assert step["client"] == step["server"], step
    sizes = [len(step["server"]) for step in result["steps"]]
    assert sizes == [2, 4, 4, 2], sizes
    edit = result["steps"][-1]["server"]
    assert edit[0]["text"] == "first question, edited" and edit[0]["id"] == result["steps"][0]["server"][0]["id"]
    regenerated = result["steps"][2]["server"]
    assert regenerated[3]["id"] != result["steps"][1]["server"][3]["id"]
