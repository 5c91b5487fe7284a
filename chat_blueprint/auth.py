"""Bearer token -> user id. Nothing else in the code base knows about JWT.

HS256 tokens are verified with `BETTER_AUTH_SECRET`. When
`BETTER_AUTH_JWKS_URL` is set, tokens signed with the asymmetric keys Better
Auth's JWT plugin publishes (EdDSA, ES256, ES512, RS256, PS256) are verified
against that JWKS too. The algorithm list is always explicit, and the
algorithm family is chosen by the key, never by the token alone (no
HS256-with-a-public-key, no ES256 with a P-521 key).
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass

import jwt

from .errors import RETRY_AFTER_S, ApiError

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = ["EdDSA", "ES256", "ES512", "RS256", "PS256"]
# What a key of each type (and curve) can verify; a key's own `alg` narrows it further.
KEY_ALGORITHMS = {
    ("RSA", None): ("RS256", "PS256"),
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-521"): ("ES512",),
    ("OKP", "Ed25519"): ("EdDSA",),
    ("OKP", "Ed448"): ("EdDSA",),
}
MAX_TOKEN_BYTES = 16 * 1024
# A user id is 1..255 characters (CONTRACT section 3): every key leads with it,
# and a much longer one (a few thousand random characters) overflows a B-tree
# index row, so that every write of its user failed as a 503.
MAX_USER_ID_CHARS = 255
LEEWAY_S = 5
JWKS_LIFESPAN_S = 300
JWKS_MIN_INTERVAL_S = 1.0
JWKS_RETRY_S = 2.0
JWKS_MAX_STALE_S = 3600
JWKS_TIMEOUT_S = 5
JWKS_MAX_BYTES = 1024 * 1024
JWKS_MAX_WAITING = 32


class Unauthorized(ApiError):
    def __init__(self, message: str):
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    def __init__(self, message="the token does not belong to this user"):
        super().__init__(403, "forbidden", message)


class SigningKeysUnavailable(ApiError):
    """The token names a key we do not have and the JWKS cannot be fetched:
    the token may well be fine, our dependency is not, so 503 and not 401."""

    def __init__(self, message="the signing keys could not be fetched; retry shortly"):
        super().__init__(503, "signing_keys_unavailable", message, headers={"Retry-After": RETRY_AFTER_S})


@dataclass(frozen=True)
class SigningKey:
    key: object
    algorithms: tuple[str, ...]


def signing_key_from_jwk(jwk) -> SigningKey | None:
    """The key and the algorithms it may verify, or None for a key we cannot use."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    algorithms = KEY_ALGORITHMS.get((kty, None if kty == "RSA" else jwk.get("crv")), ())
    if "alg" in jwk:
        algorithms = tuple(name for name in algorithms if name == jwk["alg"])
    if not algorithms:
        return None
    try:
        return SigningKey(jwt.PyJWK(jwk, algorithm=algorithms[0]).key, algorithms)
    except (jwt.PyJWTError, TypeError, ValueError, KeyError):
        return None


class JwksClient:
    """The keys of the configured JWKS, fetched at once when a token names a
    key we have not seen, so a rotation fails no request.

    - A token whose `kid` is in a set fetched less than `lifespan_s` ago is
      verified with no fetch.
    - An unknown `kid` waits for a fetch that started after the request came
      in: one fetch at a time per process, at most one per `min_interval_s`,
      and every request waiting meanwhile is answered by it. A flood of
      invented kids thus costs at most one fetch per interval, each such
      request waits about an interval at most, and no more than
      `max_waiting` wait at once (beyond that: 503).
    - When the set has expired, one request refreshes it while the others go
      on with the cached keys; a key removed from the JWKS stops verifying.
    - While the JWKS cannot be fetched (error, timeout, not a key set), a
      known key keeps verifying for up to `max_stale_s` after the last good
      fetch, and an unknown one is a 503 (`SigningKeysUnavailable`). A failed
      fetch is not retried for `retry_s`, so requests fail fast meanwhile.
    """

    def __init__(self, url: str, *, lifespan_s=JWKS_LIFESPAN_S, min_interval_s=JWKS_MIN_INTERVAL_S,
                 retry_s=JWKS_RETRY_S, max_stale_s=JWKS_MAX_STALE_S, timeout_s=JWKS_TIMEOUT_S,
                 max_waiting=JWKS_MAX_WAITING):
        self.url = url
        self.lifespan_s = lifespan_s
        self.min_interval_s = min_interval_s
        self.retry_s = retry_s
        self.max_stale_s = max_stale_s
        self.timeout_s = timeout_s
        self._changed = threading.Condition()
        self._waiting = threading.BoundedSemaphore(max_waiting)
        # (keys by kid, monotonic start of the fetch that got them): replaced whole, so read without the lock.
        self._keys: tuple[dict, float] = ({}, float("-inf"))
        self._attempted_at = float("-inf")
        self._in_flight = False
        self._failed = False

    def signing_key(self, kid) -> SigningKey:
        asked_at = time.monotonic()
        keys, fetched_at = self._keys
        if kid in keys:
            if asked_at - fetched_at >= self.lifespan_s:
                self._refresh_in_passing(asked_at)
            return self._lookup(kid)
        if not self._waiting.acquire(blocking=False):
            raise SigningKeysUnavailable("too many tokens name unknown signing keys; retry shortly")
        try:
            self._fetch_since(kid, asked_at)
            return self._lookup(kid)
        finally:
            self._waiting.release()

    def _refresh_in_passing(self, now: float) -> None:
        with self._changed:
            if self._in_flight or now - self._attempted_at < (self.retry_s if self._failed else self.min_interval_s):
                return
            self._begin_fetch()
        self._run_fetch()

    def _fetch_since(self, kid, asked_at: float) -> None:
        """Return once a fetch that started after `asked_at` has ended (or `kid` is known)."""
        deadline = asked_at + self.min_interval_s + 2 * self.timeout_s
        with self._changed:
            while kid not in self._keys[0]:
                now = time.monotonic()
                if now >= deadline:
                    raise SigningKeysUnavailable()
                if self._in_flight:
                    self._changed.wait(deadline - now)
                    continue
                if self._attempted_at >= asked_at:
                    return  # answered by a fetch that started after we asked
                if self._failed and now - self._attempted_at < self.retry_s:
                    return
                pause = self._attempted_at + self.min_interval_s - now
                if pause > 0:
                    self._changed.wait(pause)
                    continue
                self._begin_fetch()
                break
            else:
                return
        self._run_fetch()

    def _lookup(self, kid) -> SigningKey:
        keys, fetched_at = self._keys
        key = keys.get(kid)
        if self._failed:
            if key is not None and time.monotonic() - fetched_at < self.max_stale_s:
                return key
            raise SigningKeysUnavailable()
        if key is None:
            raise Unauthorized("the token's signing key is unknown")
        return key

    def _begin_fetch(self) -> None:
        """Called with the lock held: this thread fetches, the others wait for it."""
        self._in_flight = True
        self._attempted_at = time.monotonic()

    def _run_fetch(self) -> None:
        keys = None
        try:
            keys = self._download()
        except Exception as exc:  # noqa: BLE001 - any failure of the dependency is "unavailable"
            log.warning("JWKS fetch failed: %s", type(exc).__name__)
        finally:
            with self._changed:
                if keys is not None:
                    self._keys = (keys, self._attempted_at)
                self._failed = keys is None
                self._in_flight = False
                self._changed.notify_all()

    def _download(self) -> dict:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - http(s) only
            body = response.read(JWKS_MAX_BYTES + 1)
        if len(body) > JWKS_MAX_BYTES:
            raise ValueError("the JWKS is too large")
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("the JWKS endpoint did not answer a key set")
        keys = {}
        for jwk in document["keys"]:
            signing_key = signing_key_from_jwk(jwk)
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            if signing_key is not None and (kid is None or isinstance(kid, str)):
                keys[kid] = signing_key
        return keys


class TokenVerifier:
    """Verifies Better Auth JWTs with the configured secret and/or JWKS."""

    def __init__(self, secret=None, jwks_url=None, issuer=None, audience=None, jwks: JwksClient | None = None):
        self.secret = secret
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwks if jwks is not None else (JwksClient(jwks_url) if jwks_url else None)

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.auth_secret, settings.jwks_url, settings.jwt_issuer, settings.jwt_audience)

    def user_id(self, authorization: str | None) -> str:
        """Return the verified `sub` of an `Authorization: Bearer` header, or raise Unauthorized
        (SigningKeysUnavailable when the JWKS is needed and cannot be fetched)."""
        token = _bearer_token(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is malformed") from None
        algorithm = header.get("alg")
        if algorithm in HMAC_ALGORITHMS and self.secret:
            key, algorithms = self.secret, HMAC_ALGORITHMS
        elif algorithm in JWKS_ALGORITHMS and self.jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise Unauthorized("the token's key id is not a string")
            signing_key = self.jwks.signing_key(kid)
            if algorithm not in signing_key.algorithms:
                raise Unauthorized("the token's algorithm does not match its signing key")
            key, algorithms = signing_key.key, [algorithm]
        else:
            raise Unauthorized("the token's algorithm is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is invalid: {_reason(exc)}") from None
        except (TypeError, ValueError):
            # Fail closed on whatever else a crafted token makes the library trip over.
            raise Unauthorized("the token is invalid: it could not be decoded") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip() or "\x00" in subject:
            raise Unauthorized("the token has no usable subject")
        if len(subject) > MAX_USER_ID_CHARS:
            raise Unauthorized(f"the token's subject is over {MAX_USER_ID_CHARS} characters")
        iat = claims.get("iat")
        if isinstance(iat, (int, float)) and iat > time.time() + LEEWAY_S:
            raise Unauthorized("the token was issued in the future")
        return subject


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer token")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("the bearer token is too long")
    return token


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim!r}"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    return "it could not be decoded"


def mint_token(secret: str, user_id: str, ttl_s: int = 3600, **claims) -> str:
    """An HS256 token like the ones Better Auth issues, for local use and tests."""
    now = int(time.time())
    payload = {"sub": user_id, "iat": now, "exp": now + ttl_s, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")
