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


class Unauthorized(ApiError):
    def __init__(self, message: str):
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="api"'})


class Forbidden(ApiError):
    def __init__(self, message="the token does not belong to this user"):
        super().__init__(403, "forbidden", message)


class TokenVerifier:
    """Verifies Better Auth JWTs with the configured secret and/or JWKS."""

    def __init__(self, secret=None, jwks_url=None, issuer=None, audience=None):
        self.secret = secret
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5) if jwks_url else None

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
            key, algorithms = self._jwks_key(token), JWKS_ALGORITHMS
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
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip() or "\x00" in subject:
            raise Unauthorized("the token has no usable subject")
        iat = claims.get("iat")
        if isinstance(iat, (int, float)) and iat > time.time() + LEEWAY_S:
            raise Unauthorized("the token was issued in the future")
        return subject

    def _jwks_key(self, token: str):
        try:
            return self.jwks.get_signing_key_from_jwt(token).key
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
