"""The JWT attack list, against real gunicorn: every forged, stale, foreign or
garbage token is a 401 with `WWW-Authenticate: Bearer` (a valid token on
another user's path a 403), never a 500, and answered within a second.

Server `guarded` verifies HS256 with the shared secret and EdDSA / RS256 with a
JWKS (the other algorithms are in test_jwks.py), and requires an issuer and an
audience. Server `jwks_only` has no HMAC secret at all, which is where an HS256 token signed with a public key would
have to be verified if it were accepted.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import SECRET, gunicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwks_server import KeyServer
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from chat_blueprint.auth import JWKS_MIN_INTERVAL_S, JwksClient, SigningKeysUnavailable, TokenVerifier, Unauthorized

ISSUER = "https://auth.example"
AUDIENCE = "todo-api"
FAST_S = 1.0
# A kid the cache has not seen waits for a fresh fetch, at most one per interval.
UNKNOWN_KID_S = FAST_S + JWKS_MIN_INTERVAL_S
ED_KEY = Ed25519PrivateKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid: str, alg: str) -> dict:
    algorithm = OKPAlgorithm if alg == "EdDSA" else RSAAlgorithm
    jwk = json.loads(algorithm.to_jwk(private_key.public_key()))
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


JWKS = [public_jwk(ED_KEY, "ed-1", "EdDSA"), public_jwk(RSA_KEY, "rsa-1", "RS256")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(user_id: str = "victim", **changes) -> dict:
    now = int(time.time())
    payload = {"sub": user_id, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE, **changes}
    return {name: value for name, value in payload.items() if value is not None}


def sign(header: dict, payload: dict, key) -> str:
    """A JWS built by hand, so that any header (and any key) can be used."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    data = signing_input.encode()
    if header.get("alg") == "HS256":
        signature = hmac.new(key, data, hashlib.sha256).digest()
    elif header.get("alg") == "EdDSA":
        signature = key.sign(data)
    elif header.get("alg") == "RS256":
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = b""
    return f"{signing_input}.{b64(signature)}"


def hs256(payload: dict, secret: bytes = SECRET.encode(), **header) -> str:
    return sign({"alg": "HS256", "typ": "JWT", **header}, payload, secret)


def eddsa(payload: dict, kid: str = "ed-1", key=ED_KEY, **header) -> str:
    return sign({"alg": "EdDSA", "typ": "JWT", "kid": kid, **header}, payload, key)


def rs256(payload: dict, kid: str = "rsa-1", key=RSA_KEY) -> str:
    return sign({"alg": "RS256", "typ": "JWT", "kid": kid}, payload, key)


@pytest.fixture(scope="module")
def key_server():
    with KeyServer(JWKS) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(app_url, key_server):
    with gunicorn(app_url, BETTER_AUTH_JWKS_URL=key_server.url, JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE) as server:
        yield server


@pytest.fixture(scope="module")
def jwks_only(app_url, key_server):
    with gunicorn(app_url, BETTER_AUTH_SECRET="", BETTER_AUTH_JWKS_URL=key_server.url) as server:
        yield server


def get_tasks(server, token: str, user_id: str = "victim", within: float = FAST_S) -> requests.Response:
    started = time.monotonic()
    response = requests.get(f"{server.url}/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < within, f"answered in {elapsed:.2f}s"
    return response


def assert_401(response: requests.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("signer", [hs256, eddsa, rs256], ids=["HS256", "EdDSA", "RS256"])
def test_the_real_thing_is_accepted(guarded, signer):
    """The control: with the right key, issuer and audience, the same request is a 200.
    Tokens are signed when the test runs, not when it is collected: a long suite outlives them."""
    assert get_tasks(guarded, signer(claims())).status_code == 200


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"])
def test_alg_none(guarded, alg, signature):
    unsigned = sign({"alg": alg, "typ": "JWT"}, claims(), key=None).rsplit(".", 1)[0]
    assert_401(get_tasks(guarded, f"{unsigned}.{signature}"))


PUBLIC_KEY_SECRETS = {
    "RSA PEM": RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo),
    "RSA PKCS1 PEM": RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
    "RSA JWK": json.dumps(JWKS[1]).encode(),
    "Ed25519 PEM": ED_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo),
    "Ed25519 raw": ED_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    "Ed25519 JWK": json.dumps(JWKS[0]).encode(),
}


@pytest.mark.parametrize("secret", PUBLIC_KEY_SECRETS.values(), ids=PUBLIC_KEY_SECRETS.keys())
@pytest.mark.parametrize("kid", [None, "rsa-1", "ed-1"])
@pytest.mark.parametrize("server", ["guarded", "jwks_only"])
def test_hs256_signed_with_the_public_key(request, server, secret, kid):
    """Algorithm confusion: the public key, as published, used as the HMAC secret."""
    header = {"kid": kid} if kid else {}
    assert_401(get_tasks(request.getfixturevalue(server), hs256(claims(), secret, **header)))


def test_asymmetric_algorithm_other_than_the_keys(guarded):
    """A token that names the Ed25519 key but claims RS256 (and the reverse)."""
    assert_401(get_tasks(guarded, rs256(claims(), kid="ed-1")))
    assert_401(get_tasks(guarded, sign({"alg": "EdDSA", "kid": "rsa-1"}, claims(), ED_KEY)))
    assert_401(get_tasks(guarded, sign({"alg": "ES256", "kid": "ed-1"}, claims(), None)))


@pytest.mark.parametrize("kid", ["no-such-key", "", "../../etc/passwd", "/dev/null", "file:///etc/passwd",
                                 "http://127.0.0.1:9/jwks", "ed-1' OR '1'='1", "ed-1\x00", "x" * 2000])
def test_kid_pointing_at_nothing_or_at_a_path(guarded, kid):
    assert_401(get_tasks(guarded, eddsa(claims(), kid=kid, key=Ed25519PrivateKey.generate()), within=UNKNOWN_KID_S))


@pytest.mark.parametrize("kid", [["ed-1"], {"kid": "ed-1"}, 1, True])
def test_kid_that_is_not_a_string(guarded, kid):
    assert_401(get_tasks(guarded, sign({"alg": "EdDSA", "kid": kid}, claims(), ED_KEY)))


def test_forged_token_with_a_real_kid(guarded):
    assert_401(get_tasks(guarded, eddsa(claims(), kid="ed-1", key=Ed25519PrivateKey.generate())))


def test_jku_and_x5u_pointing_elsewhere_are_ignored(guarded):
    """The header may name its own key set; only the configured JWKS counts."""
    attacker = Ed25519PrivateKey.generate()
    with KeyServer([public_jwk(attacker, "evil", "EdDSA")]) as evil:
        token = eddsa(claims(), kid="evil", key=attacker, jku=evil.url, x5u=evil.url)
        assert_401(get_tasks(guarded, token, within=UNKNOWN_KID_S))
        assert evil.fetches == 0


@pytest.mark.parametrize("changes", [
    {"exp": -60},  # seconds from the moment the test runs, see RELATIVE
    {"nbf": 600},
    {"iat": 600},
    {"exp": None},
    {"sub": None},
    {"exp": "never"},
    {"iat": "yesterday"},
], ids=["expired", "not-yet-valid", "issued-in-the-future", "no-exp", "no-sub", "exp-not-a-number",
        "iat-not-a-number"])
@pytest.mark.parametrize("signer", [hs256, eddsa, rs256])
def test_stale_or_incomplete_claims(guarded, signer, changes):
    now = int(time.time())
    changes = {name: now + value if name in RELATIVE and isinstance(value, int) else value
               for name, value in changes.items()}
    assert_401(get_tasks(guarded, signer(claims(**changes))))


RELATIVE = ("exp", "nbf", "iat")


@pytest.mark.parametrize("token", [
    b64(os.urandom(4500)),
    ".".join(b64(os.urandom(1500)) for _ in range(3)),
    "eyJ" + "A" * 6000,
    "eyJhbGciOiJIUzI1NiJ9." + "." * 6000,
    b64(b"{" * 4600) + ".e30.",
    b64(b"[" * 2300 + b"]" * 2300) + ".e30.",
], ids=["random", "random-three-parts", "header-prefix", "dots", "unclosed-json", "deep-json"])
def test_six_kilobytes_of_garbage(guarded, token):
    assert len(token) >= 6000
    assert_401(get_tasks(guarded, token))


def test_a_header_over_the_token_limit_is_a_401_in_json(guarded):
    """Tokens up to 16 KiB are read; a longer Authorization header reaches the
    app all the same (gunicorn reads header fields up to 32 KiB) and is a 401."""
    assert_401(get_tasks(guarded, "A" * 9000))
    for length in (16 * 1024 + 1, 30_000):
        response = get_tasks(guarded, "A" * length)
        assert_401(response)
        assert "too long" in response.json()["error"]["message"]


def test_a_header_over_the_servers_limit_never_reaches_the_app(guarded):
    """Over 32 KiB, gunicorn refuses the header field itself (431, as the
    OpenAPI document says), before any token parsing."""
    response = get_tasks(guarded, "A" * 40_000)
    assert response.status_code == 431


@pytest.mark.parametrize("changes", [
    {"iss": "https://evil.example"},
    {"aud": "another-api"},
    {"aud": ["another-api"]},
    {"iss": None},
    {"aud": None},
], ids=["wrong-iss", "wrong-aud", "wrong-aud-list", "no-iss", "no-aud"])
@pytest.mark.parametrize("signer", [hs256, eddsa])
def test_wrong_issuer_or_audience(guarded, signer, changes):
    assert_401(get_tasks(guarded, signer(claims(**changes))))


@pytest.mark.parametrize("signer", [hs256, eddsa])
def test_another_users_valid_token_is_403(guarded, signer):
    response = get_tasks(guarded, signer(claims("mallory")), user_id="victim")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_a_flood_of_unknown_kids_costs_at_most_one_fetch_per_interval(guarded, key_server):
    """Each unknown kid could force a refetch: requests waiting together share
    one, and there is at most one per interval, however many kids arrive."""
    get_tasks(guarded, eddsa(claims()))
    before = key_server.fetches
    started = time.monotonic()

    def invented(_):
        token = eddsa(claims(), kid=uuid.uuid4().hex, key=ED_KEY)
        # waits for at most two fetches, one interval apart; a loaded machine adds a second
        return get_tasks(guarded, token, within=2 * FAST_S + 2 * JWKS_MIN_INTERVAL_S)

    with ThreadPoolExecutor(max_workers=10) as pool:
        for response in pool.map(invented, range(60)):
            assert_401(response)
    elapsed = time.monotonic() - started
    assert key_server.fetches - before <= elapsed / JWKS_MIN_INTERVAL_S + 1


def test_a_failing_jwks_is_retried_at_most_once_per_interval():
    """An unknown key while the JWKS is down is a 503 (the token may be fine),
    answered at once: the failed fetch is not retried before retry_s."""
    with KeyServer(JWKS) as keys:
        keys.failing = True
        verifier = TokenVerifier(jwks=JwksClient(keys.url, retry_s=60))
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises(SigningKeysUnavailable):
                verifier.user_id("Bearer " + eddsa(claims()))
        assert time.monotonic() - started < FAST_S
        assert keys.fetches == 1


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"[]", b'{"keys": "none"}'])
def test_a_jwks_that_is_not_a_key_set_is_a_503(body):
    with KeyServer(JWKS) as keys:
        keys.body = body
        verifier = TokenVerifier(jwks=JwksClient(keys.url))
        with pytest.raises(SigningKeysUnavailable):
            verifier.user_id("Bearer " + eddsa(claims()))


@pytest.mark.parametrize("body", [b'{"keys": []}', b'{"keys": [{"kty": "??"}]}',
                                  b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'])
def test_a_key_set_without_a_usable_key_is_a_401(body):
    with KeyServer(JWKS) as keys:
        keys.body = body
        verifier = TokenVerifier(jwks=JwksClient(keys.url))
        with pytest.raises(Unauthorized):
            verifier.user_id("Bearer " + eddsa(claims()))


def test_a_key_removed_from_the_jwks_stops_verifying():
    """Revocation: once the cached key set expires, a removed key is refused.
    (A per-kid cache without expiry would keep accepting it.)"""
    with KeyServer(JWKS) as keys:
        verifier = TokenVerifier(jwks=JwksClient(keys.url, lifespan_s=0.5, min_interval_s=0))
        token = "Bearer " + eddsa(claims())
        assert verifier.user_id(token) == "victim"
        keys.keys = [JWKS[1]]
        time.sleep(0.6)
        with pytest.raises(Unauthorized):
            verifier.user_id(token)
