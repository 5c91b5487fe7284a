"""Bearer token -> user id. Nothing else in the code base knows about JWT.

HS256 tokens are verified with `BETTER_AUTH_SECRET`. When
`BETTER_AUTH_JWKS_URL` is set, tokens signed with the asymmetric keys Better
Auth's JWT plugin publishes (EdDSA, ES256, RS256) are verified against that
JWKS too. The algorithm list is always explicit, and the algorithm family is
chosen by the key, never by the token alone (no HS256-with-a-public-key).
"""
from __future__ import annotations

import time

import jwt

from .errors import ApiError

HMAC_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = ["EdDSA", "ES256", "RS256"]
MAX_TOKEN_BYTES = 8192
LEEWAY_S = 5
JWKS_LIFESPAN_S = 300
JWKS_COOLDOWN_S = 30
JWKS_RETRY_S = 5
JWKS_TIMEOUT_S = 5


class Unauthorized(ApiError):
    def __init__(self, message: str):
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    def __init__(self, message="the token does not belong to this user"):
        super().__init__(403, "forbidden", message)


class JwksClient(jwt.PyJWKClient):
    """The keys of the configured JWKS, which no token can make us fetch often.

    The key set is cached for `lifespan_s`. A `kid` missing from it forces a
    refetch at most once per `cooldown_s` (PyJWKClient's cooldown), so a
    flood of made-up kids costs no fetch per request. A failed fetch is not
    retried for `retry_s`: while the endpoint is down or answers garbage,
    requests fail fast instead of each queueing on the client's lock for a
    fetch. There is no per-kid cache without expiry: a key removed from the
    JWKS stops verifying once the cached set expires.
    """

    def __init__(self, url: str, *, lifespan_s=JWKS_LIFESPAN_S, cooldown_s=JWKS_COOLDOWN_S, retry_s=JWKS_RETRY_S):
        super().__init__(url, cache_keys=False, cache_jwk_set=True, lifespan=lifespan_s, timeout=JWKS_TIMEOUT_S,
                         cooldown_duration=cooldown_s)
        self.retry_s = retry_s
        self._retry_at = 0.0

    def fetch_data(self):
        if time.monotonic() < self._retry_at:
            raise jwt.PyJWKClientConnectionError("the last fetch failed; not retrying yet")
        try:
            return super().fetch_data()
        except (jwt.PyJWTError, ValueError) as exc:
            self._retry_at = time.monotonic() + self.retry_s
            if isinstance(exc, ValueError):
                raise jwt.PyJWKClientConnectionError("the JWKS endpoint did not answer JSON") from None
            raise


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
        """Return the verified `sub` of an `Authorization: Bearer` header, or raise Unauthorized."""
        token = _bearer_token(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is malformed") from None
        algorithm = header.get("alg")
        if algorithm in HMAC_ALGORITHMS and self.secret:
            key, algorithms = self.secret, HMAC_ALGORITHMS
        elif algorithm in JWKS_ALGORITHMS and self.jwks is not None:
            signing_key = self._jwks_key(token)
            if signing_key.algorithm_name != algorithm:
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
        iat = claims.get("iat")
        if isinstance(iat, (int, float)) and iat > time.time() + LEEWAY_S:
            raise Unauthorized("the token was issued in the future")
        return subject

    def _jwks_key(self, token: str) -> jwt.PyJWK:
        try:
            return self.jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError:
            raise Unauthorized("the signing keys could not be fetched") from None
        except jwt.PyJWTError:
            raise Unauthorized("the token's signing key is unknown") from None


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
