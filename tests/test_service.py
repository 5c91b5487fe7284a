"""Service routes, configuration, the CLI, and database outages as 503."""
from __future__ import annotations

import os
import subprocess
import sys

import jwt
import pytest
from support import ROOT, SECRET, built_app, make_user

from chat_blueprint.config import ConfigError, load_settings, normalize_database_url
from devtools.ports import free_port


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_when_isolation_is_in_force(client):
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json() == {"status": "ready"}


def test_readyz_and_api_refuse_a_superuser(superuser_url):
    with built_app(superuser_url.rsplit("/", 1)[0] + "/chat") as app:
        client = app.test_client()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "superuser" in ready.get_json()["error"]["message"]
        user = make_user()
        refused = client.get(f"/api/{user.id}/tasks", headers=user.headers)
        assert refused.status_code == 503
        assert refused.get_json()["error"]["code"] == "isolation_not_in_force"


def unreachable_url() -> str:
    return f"postgresql://nobody:secret@127.0.0.1:{free_port()}/chat"


def test_database_down_is_503_with_retry_after():
    with built_app(unreachable_url()) as app:
        client = app.test_client()
        user = make_user()
        for response in (client.get(f"/api/{user.id}/tasks", headers=user.headers), client.get("/readyz")):
            assert response.status_code == 503
            assert response.headers["Retry-After"].isdigit()
            assert response.get_json()["error"]["code"] == "database_unavailable"
        assert client.get("/healthz").status_code == 200


def test_openapi_document_covers_the_routes(client):
    document = client.get("/api/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths["/api/{user_id}/tasks"]) >= {"get", "post", "parameters"}
    assert set(paths["/api/{user_id}/tasks/{task_id}"]) >= {"get", "put", "delete"}
    assert "patch" in paths["/api/{user_id}/tasks/{task_id}/complete"]
    task = document["components"]["schemas"]["Task"]
    assert set(task["properties"]) == {"id", "user_id", "title", "description", "completed", "created_at",
                                       "updated_at"}
    create = paths["/api/{user_id}/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create["$ref"].endswith("TaskCreate")


def flask_cli(*args, **env) -> subprocess.CompletedProcess:
    """The real `flask --app wsgi ...` command line, with only `env` (and PATH) set."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], **env})


def test_mint_token_needs_only_the_secret():
    result = flask_cli("mint-token", "erin", "--ttl", "120", BETTER_AUTH_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "erin" and claims["exp"] - claims["iat"] == 120


def test_mint_token_without_the_secret_says_so_in_one_line():
    result = flask_cli("mint-token", "erin")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["Error: BETTER_AUTH_SECRET is not set (required to mint HS256 "
                                                  "tokens)"]


def test_mint_token_warns_about_a_short_secret_in_one_line():
    result = flask_cli("mint-token", "erin", BETTER_AUTH_SECRET="short")
    assert result.returncode == 0
    assert jwt.decode(result.stdout.strip(), options={"verify_signature": False})["sub"] == "erin"
    assert len(result.stderr.strip().splitlines()) == 1 and "32 bytes" in result.stderr


def test_mint_token_refuses_a_blank_user():
    result = flask_cli("mint-token", " ", BETTER_AUTH_SECRET=SECRET)
    assert result.returncode == 2 and "USER_ID" in result.stderr and "Traceback" not in result.stderr


def test_mint_token_is_a_command_of_this_app_only(tmp_path):
    """Another Flask app installed beside this package does not get it."""
    (tmp_path / "other.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "other", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert "mint-token" not in result.stdout and "prune" not in result.stdout
    assert "mint-token" in flask_cli("--help").stdout


@pytest.mark.parametrize("command", [("db", "upgrade"), ("prune",)])
def test_a_command_that_needs_the_database_says_so_in_one_line(command):
    result = flask_cli(*command, BETTER_AUTH_SECRET=SECRET)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: DATABASE_URL is not set (a postgresql:// URL is required)"]


def test_a_bad_setting_under_the_flask_command_is_one_line():
    result = flask_cli("db", "upgrade", DATABASE_URL="postgresql://h/db", ASSISTANT="openai")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: ASSISTANT_BASE_URL is not set (required when "
                                                  "ASSISTANT=openai)"]


@pytest.mark.parametrize("env, variable", [
    ({}, "DATABASE_URL"),
    ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://h:notaport/db"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://h/db", "CHAT_HISTORY_LIMIT": "many"}, "CHAT_HISTORY_LIMIT"),
    ({"DATABASE_URL": "postgresql://h/db", "MESSAGE_MAX_CHARS": "0"}, "MESSAGE_MAX_CHARS"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT": "magic"}, "ASSISTANT"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT": "openai"}, "ASSISTANT_BASE_URL"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_TIMEOUT_S": "-1"}, "ASSISTANT_TIMEOUT_S"),
    ({"DATABASE_URL": "postgresql://h/db", "DATABASE_PREPARED_STATEMENTS": "maybe"}, "DATABASE_PREPARED_STATEMENTS"),
    ({"DATABASE_URL": "postgresql://h/db", "BETTER_AUTH_JWKS_URL": "not a url"}, "BETTER_AUTH_JWKS_URL"),
    ({"DATABASE_URL": "postgresql://h/db", "CHAT_RATE_LIMIT": "lots"}, "CHAT_RATE_LIMIT"),
    ({"DATABASE_URL": "postgresql://h/db", "CHAT_RATE_LIMIT": "0/minute"}, "CHAT_RATE_LIMIT"),
    ({"DATABASE_URL": "postgresql://h/db", "CHAT_RATE_LIMIT": "5/fortnight"}, "CHAT_RATE_LIMIT"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_TEMPERATURE": "warm"}, "ASSISTANT_TEMPERATURE"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_TEMPERATURE": "2.5"}, "ASSISTANT_TEMPERATURE"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_TEMPERATURE": "-0.1"}, "ASSISTANT_TEMPERATURE"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_TEMPERATURE": "nan"}, "ASSISTANT_TEMPERATURE"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_MAX_TOKENS": "0"}, "ASSISTANT_MAX_TOKENS"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_MAX_TOKENS": "1.5"}, "ASSISTANT_MAX_TOKENS"),
    ({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_USER_HASH_KEY": "short"}, "ASSISTANT_USER_HASH_KEY"),
    ({"DATABASE_URL": "postgresql://h/db", "CHAT_HISTORY_MAX_CHARS": "0"}, "CHAT_HISTORY_MAX_CHARS"),
    ({"DATABASE_URL": "postgresql://h/db", "CHAT_HISTORY_MAX_CHARS": "lots"}, "CHAT_HISTORY_MAX_CHARS"),
])
def test_bad_settings_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert message.startswith(variable) and "\n" not in message


def test_model_settings_are_read_with_their_defaults():
    defaults = load_settings({"DATABASE_URL": "postgresql://h/db"})
    assert (defaults.assistant_temperature, defaults.assistant_max_tokens, defaults.chat_history_max_chars) == \
        (None, None, 48_000)
    chosen = load_settings({"DATABASE_URL": "postgresql://h/db", "ASSISTANT_TEMPERATURE": "0", "ASSISTANT_MAX_TOKENS":
                            "1024", "CHAT_HISTORY_MAX_CHARS": "8000", "BETTER_AUTH_SECRET": "s" * 32})
    assert (chosen.assistant_temperature, chosen.assistant_max_tokens, chosen.chat_history_max_chars) == \
        (0.0, 1024, 8000)
    assert chosen.assistant_user_key == "s" * 32  # the `user` hash key defaults to the auth secret


def test_serving_needs_a_way_to_verify_tokens():
    with pytest.raises(ConfigError, match="^BETTER_AUTH_SECRET"):
        load_settings({"DATABASE_URL": "postgresql://h/db"}).require_auth()
    load_settings({"DATABASE_URL": "postgresql://h/db", "BETTER_AUTH_JWKS_URL": "https://a.example/jwks"}).require_auth()


@pytest.mark.parametrize("url", ["postgres://u:p@h:5432/db", "postgresql://u:p@h:5432/db",
                                 "postgresql+psycopg://u:p@h:5432/db"])
def test_database_url_schemes_all_use_psycopg(url):
    assert normalize_database_url(url) == "postgresql+psycopg://u:p@h:5432/db"
