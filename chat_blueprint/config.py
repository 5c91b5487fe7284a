"""Settings from the environment, validated once at start-up.

Every problem is reported as a `ConfigError` whose message is one line naming
the variable, so an operator sees at once what to fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A missing or contradictory setting. The message names the variable."""


ASSISTANTS = ("builtin", "openai")

# Every default lives here, once; the rest of the package reads them from Settings.
DEFAULT_APP_DB_ROLE = "chat_app"
DEFAULT_ASSISTANT_TIMEOUT_S = 30.0
DEFAULT_CHAT_HISTORY_LIMIT = 50
DEFAULT_CHAT_HISTORY_MAX_CHARS = 48_000
DEFAULT_MESSAGE_MAX_CHARS = 16_000
DEFAULT_POOL_SIZE = 5
DEFAULT_POOL_TIMEOUT_S = 10.0
DEFAULT_IDEMPOTENCY_TTL_S = 86_400
DEFAULT_STREAM_KEEPALIVE_S = 15.0  # also the most a stream may go without one
DEFAULT_STREAM_FLUSH_S = 1.0
DEFAULT_MAX_TURNS_PER_PROCESS = 500
STREAM_FLUSH_RANGE_S = (0.1, 10.0)
DEFAULT_ISOLATION_CHECK_INTERVAL_S = 60.0
DEFAULT_WRITE_RATE_LIMIT = (600, 60)
DEFAULT_STATEMENT_TIMEOUT_S = 10.0
DEFAULT_LOCK_TIMEOUT_S = 5.0
DEFAULT_EXPORT_RATE_LIMIT = (6, 3600)
DEFAULT_EXPORT_MAX_BYTES = 512 * 1024**2  # a spooled export's file; a user whose document is larger gets a 507
DEFAULT_EXPORT_CONCURRENCY = 4  # exports spooled or being sent at once, per worker process
MAX_BODY_BYTES = 1024 * 1024  # a request body, chunked or not (413 beyond)


@dataclass(frozen=True)
class Settings:
    database_url: str | None  # None only for commands that need no database (mint-token)
    app_db_role: str
    auth_secret: str | None
    jwks_url: str | None
    jwt_issuer: str | None
    jwt_audience: str | None
    assistant: str
    assistant_base_url: str | None
    assistant_api_key: str | None
    assistant_model: str | None
    assistant_timeout_s: float
    assistant_system_prompt: str | None
    assistant_temperature: float | None
    assistant_max_tokens: int | None
    assistant_user_key: str | None  # HMAC key of the `user` field; None: no `user` is sent
    prepared_statements: bool
    chat_history_limit: int
    chat_history_max_chars: int
    message_max_chars: int
    pool_size: int
    pool_timeout_s: float
    idempotency_ttl_s: int
    chat_rate_limit: tuple[int, int] | None  # (turns, period in seconds), shared by every instance
    write_rate_limit: tuple[int, int] | None  # (writes, period in seconds); None: off
    stream_keepalive_s: float
    stream_flush_s: float  # how far a produced reply's stored content may lag, and how soon a stop is seen
    chat_max_turns_per_process: int  # turns one worker answers at once; more are refused (503 server_busy)
    isolation_check_interval_s: float
    cors_origins: tuple[str, ...] | None  # ("*",) for every origin
    statement_timeout_s: float
    lock_timeout_s: float
    export_rate_limit: tuple[int, int] | None  # (exports, period in seconds) per user; None: off
    export_max_bytes: int
    export_concurrency: int

    def require_auth(self) -> None:
        """Serving and minting need a way to verify tokens."""
        if not self.auth_secret and not self.jwks_url:
            raise ConfigError(
                "BETTER_AUTH_SECRET is not set (required to verify tokens unless BETTER_AUTH_JWKS_URL is set)")


def read_auth_secret(env=None) -> str | None:
    env = os.environ if env is None else env
    return env.get("BETTER_AUTH_SECRET") or None


def required_auth_secret(env=None) -> str:
    """The HS256 secret alone, for commands that need nothing else (`mint-token`)."""
    secret = read_auth_secret(env)
    if not secret:
        raise ConfigError("BETTER_AUTH_SECRET is not set (required to mint HS256 tokens)")
    return secret


def normalize_database_url(url: str) -> str:
    """Accept postgres://, postgresql:// and postgresql+psycopg://; always use psycopg 3."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ConfigError("DATABASE_URL must start with postgresql://, postgres:// or postgresql+psycopg://")
    normalized = f"postgresql+psycopg://{rest}"
    try:
        parts = urlsplit(normalized)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL is malformed: {exc}") from None
    return normalized


def _get(env, name, default=None):
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _int(env, name, default, minimum=1, maximum=None):
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return value


def _float(env, name, default):
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _temperature(env, name):
    """A sampling temperature, 0 to 2 (the range OpenAI accepts; the others accept it too)."""
    raw = _get(env, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 2:
        raise ConfigError(f"{name} must be a number between 0 and 2, got {raw!r}")
    return value


def _user_key(env) -> str | None:
    """The key of the `user` field's keyed hash: ASSISTANT_USER_HASH_KEY, or by
    default BETTER_AUTH_SECRET (a secret the model server never sees, shared by
    every instance, so one user's hash is the same everywhere); `off`, or
    neither set, sends no `user`."""
    raw = _get(env, "ASSISTANT_USER_HASH_KEY")
    if raw is not None and raw.lower() == "off":
        return None
    if raw is not None and len(raw) < 16:
        raise ConfigError("ASSISTANT_USER_HASH_KEY must be at least 16 characters (or 'off')")
    return raw or read_auth_secret(env)


def _on_off(env, name, default):
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be 'on' or 'off', got {raw!r}")


PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}


def _rate(env, name, default=None):
    """'N/second', 'N/minute', 'N/hour' or 'N/day'; `off` means no limit, unset the default."""
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() == "off":
        return None
    count, _, period = raw.partition("/")
    try:
        turns = int(count)
    except ValueError:
        turns = 0
    if turns < 1 or period.strip().lower() not in PERIODS:
        raise ConfigError(f"{name} must look like '20/minute' (per second, minute, hour or day) or be 'off', "
                          f"got {raw!r}")
    return turns, PERIODS[period.strip().lower()]


def _http_url(env, name):
    raw = _get(env, name)
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw


def _origins(env, name):
    """Comma-separated origins (scheme, host, optional port) or `*`; unset means no CORS."""
    raw = _get(env, name)
    if raw is None:
        return None
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    if entries == ["*"]:
        return ("*",)
    origins = []
    for entry in entries:
        if entry == "*":
            raise ConfigError(f"{name} is either '*' or a list of origins, not both")
        parts = urlsplit(entry)
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/")
                or parts.query or parts.fragment or "@" in parts.netloc or entry.endswith(("?", "#"))):
            raise ConfigError(f"{name} must be comma-separated origins like https://app.example.com or "
                              f"http://localhost:3000 (no path), or '*'; got {entry!r}")
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    if not origins:
        raise ConfigError(f"{name} names no origin; unset it for no CORS")
    return tuple(dict.fromkeys(origins))


def load_settings(env=None, *, require_database: bool = True) -> Settings:
    """Read and validate every setting; raise ConfigError on the first problem.

    Without `require_database`, a missing DATABASE_URL is allowed (None): the
    Flask CLI builds the app for `mint-token`, which needs no database, and
    the commands that do need one say so in one line when they run."""
    env = os.environ if env is None else env
    database_url = _get(env, "DATABASE_URL")
    if database_url is None and require_database:
        raise ConfigError("DATABASE_URL is not set (a postgresql:// URL is required)")
    assistant = (_get(env, "ASSISTANT", "builtin")).lower()
    if assistant not in ASSISTANTS:
        raise ConfigError(f"ASSISTANT must be one of {', '.join(ASSISTANTS)}, got {assistant!r}")
    settings = Settings(
        database_url=normalize_database_url(database_url) if database_url is not None else None,
        app_db_role=_get(env, "APP_DB_ROLE", DEFAULT_APP_DB_ROLE),
        auth_secret=read_auth_secret(env),
        jwks_url=_http_url(env, "BETTER_AUTH_JWKS_URL"),
        jwt_issuer=_get(env, "JWT_ISSUER"),
        jwt_audience=_get(env, "JWT_AUDIENCE"),
        assistant=assistant,
        assistant_base_url=_http_url(env, "ASSISTANT_BASE_URL"),
        assistant_api_key=env.get("ASSISTANT_API_KEY") or None,
        assistant_model=_get(env, "ASSISTANT_MODEL"),
        assistant_timeout_s=_float(env, "ASSISTANT_TIMEOUT_S", DEFAULT_ASSISTANT_TIMEOUT_S),
        assistant_system_prompt=env.get("ASSISTANT_SYSTEM_PROMPT") or None,
        assistant_temperature=_temperature(env, "ASSISTANT_TEMPERATURE"),
        assistant_max_tokens=_int(env, "ASSISTANT_MAX_TOKENS", None, maximum=10_000_000),
        assistant_user_key=_user_key(env),
        prepared_statements=_on_off(env, "DATABASE_PREPARED_STATEMENTS", True),
        chat_history_limit=_int(env, "CHAT_HISTORY_LIMIT", DEFAULT_CHAT_HISTORY_LIMIT, maximum=10_000),
        chat_history_max_chars=_int(env, "CHAT_HISTORY_MAX_CHARS", DEFAULT_CHAT_HISTORY_MAX_CHARS,
                                    maximum=100_000_000),
        message_max_chars=_int(env, "MESSAGE_MAX_CHARS", DEFAULT_MESSAGE_MAX_CHARS, maximum=1_000_000),
        pool_size=_int(env, "DATABASE_POOL_SIZE", DEFAULT_POOL_SIZE, maximum=1_000),
        pool_timeout_s=_float(env, "DATABASE_POOL_TIMEOUT_S", DEFAULT_POOL_TIMEOUT_S),
        idempotency_ttl_s=_int(env, "IDEMPOTENCY_TTL_S", DEFAULT_IDEMPOTENCY_TTL_S),
        chat_rate_limit=_rate(env, "CHAT_RATE_LIMIT"),
        write_rate_limit=_rate(env, "WRITE_RATE_LIMIT", DEFAULT_WRITE_RATE_LIMIT),
        stream_keepalive_s=_float(env, "CHAT_STREAM_KEEPALIVE_S", DEFAULT_STREAM_KEEPALIVE_S),
        stream_flush_s=_float(env, "CHAT_STREAM_FLUSH_S", DEFAULT_STREAM_FLUSH_S),
        chat_max_turns_per_process=_int(env, "CHAT_MAX_TURNS_PER_PROCESS", DEFAULT_MAX_TURNS_PER_PROCESS,
                                        maximum=100_000),
        isolation_check_interval_s=_float(env, "ISOLATION_CHECK_INTERVAL_S", DEFAULT_ISOLATION_CHECK_INTERVAL_S),
        cors_origins=_origins(env, "CORS_ORIGINS"),
        statement_timeout_s=_float(env, "DATABASE_STATEMENT_TIMEOUT_S", DEFAULT_STATEMENT_TIMEOUT_S),
        lock_timeout_s=_float(env, "DATABASE_LOCK_TIMEOUT_S", DEFAULT_LOCK_TIMEOUT_S),
        export_rate_limit=_rate(env, "EXPORT_RATE_LIMIT", DEFAULT_EXPORT_RATE_LIMIT),
        export_max_bytes=_int(env, "EXPORT_MAX_BYTES", DEFAULT_EXPORT_MAX_BYTES, minimum=1024, maximum=1024**4),
        export_concurrency=_int(env, "EXPORT_CONCURRENCY", DEFAULT_EXPORT_CONCURRENCY, maximum=1_000),
    )
    if settings.stream_keepalive_s > DEFAULT_STREAM_KEEPALIVE_S:
        raise ConfigError(f"CHAT_STREAM_KEEPALIVE_S must be at most {DEFAULT_STREAM_KEEPALIVE_S:g} "
                          "(seconds between keep-alives of a stream)")
    low, high = STREAM_FLUSH_RANGE_S
    if not low <= settings.stream_flush_s <= high:
        raise ConfigError(f"CHAT_STREAM_FLUSH_S must be between {low:g} and {high:g} seconds, "
                          f"got {settings.stream_flush_s:g}")
    if settings.assistant == "openai":
        if not settings.assistant_base_url:
            raise ConfigError("ASSISTANT_BASE_URL is not set (required when ASSISTANT=openai)")
        if not settings.assistant_model:
            raise ConfigError("ASSISTANT_MODEL is not set (required when ASSISTANT=openai)")
    return settings
