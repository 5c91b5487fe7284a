"""Better Auth's JWKS as it really is: every algorithm its `jwt` plugin can
sign with, keys that rotate, an endpoint that goes away, tokens that carry a
whole user row (CONTRACT section 3)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import requests
from support import SECRET, built_app, gunicorn
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwks_server import KeyServer
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from chat_blueprint.auth import (
    JWKS_MIN_INTERVAL_S,
    MAX_TOKEN_BYTES,
    JwksClient,
    SigningKeysUnavailable,
    TokenVerifier,
    Unauthorized,
)
from devtools.ports import free_port


def new_key(kind: str):
    if kind == "Ed25519":
        return Ed25519PrivateKey.generate()
    if kind == "Ed448":
        return Ed448PrivateKey.generate()
    if kind == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "P-521":
        return ec.generate_private_key(ec.SECP521R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid: str, alg: str | None) -> dict:
    """The public half as Better Auth publishes it (with `alg`), or without `alg`."""
    if isinstance(private_key, (Ed25519PrivateKey, Ed448PrivateKey)):
        family = OKPAlgorithm
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        family = ECAlgorithm
    else:
        family = RSAAlgorithm
    jwk = json.loads(family.to_jwk(private_key.public_key()))
    jwk.update(kid=kid, use="sig")
    if alg:
        jwk["alg"] = alg
    return jwk


def signed(private_key, alg: str, kid: str, user_id: str = "carol", **claims) -> str:
    now = int(time.time())
    payload = {"sub": user_id, "iat": now, "exp": now + 900, **claims}
    return jwt.encode(payload, private_key, algorithm=alg, headers={"kid": kid})


def assert_401(response):
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json()["error"]["code"] == "unauthorized"


# Every algorithm Better Auth's jwt plugin signs with, and the key it uses.
BETTER_AUTH_ALGORITHMS = [("EdDSA", "Ed25519"), ("EdDSA", "Ed448"), ("ES256", "P-256"), ("ES512", "P-521"),
                          ("RS256", "RSA"), ("PS256", "RSA")]


@pytest.mark.parametrize("with_alg", [True, False], ids=["jwk-with-alg", "jwk-without-alg"])
@pytest.mark.parametrize("alg, kind", BETTER_AUTH_ALGORITHMS, ids=[f"{a}-{k}" for a, k in BETTER_AUTH_ALGORITHMS])
def test_every_better_auth_algorithm_is_accepted(app_url, alg, kind, with_alg):
    key = new_key(kind)
    with KeyServer([public_jwk(key, "k1", alg if with_alg else None)]) as jwks, \
            built_app(app_url, BETTER_AUTH_JWKS_URL=jwks.url) as app:
        response = app.test_client().get("/api/carol/tasks",
                                         headers={"Authorization": "Bearer " + signed(key, alg, "k1")})
        assert response.status_code == 200, response.get_json()
        forged = signed(new_key(kind), alg, "k1")
        assert_401(app.test_client().get("/api/carol/tasks", headers={"Authorization": f"Bearer {forged}"}))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ecdsa_by_hand(private_key, alg: str, kid: str) -> str:
    """ES256 over whatever curve the key has (PyJWT itself refuses to sign that)."""
    header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps({"sub": "carol", "exp": int(time.time()) + 600}).encode())
    der = private_key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    size = (private_key.curve.key_size + 7) // 8
    return f"{header}.{payload}.{b64(r.to_bytes(size, 'big') + s.to_bytes(size, 'big'))}"


@pytest.mark.parametrize("case", ["RS256-on-a-PS256-key", "PS256-on-an-RS256-key", "ES256-on-a-P-521-key",
                                  "ES384-not-on-the-list", "HS256-with-the-public-key"])
def test_an_algorithm_the_key_does_not_allow_is_401(app_url, case):
    """Each token is signed by the very key its kid names, under an algorithm
    that key does not allow; only the algorithm check can refuse it."""
    if case.startswith(("RS256", "PS256")):
        key = new_key("RSA")
        token_alg, jwk_alg = case[:5], "PS256" if case.startswith("RS256") else "RS256"
        jwk, token = public_jwk(key, "k1", jwk_alg), signed(key, token_alg, "k1")
        reason = "does not match its signing key"
    elif case.startswith("ES256"):
        key = new_key("P-521")
        jwk, token = public_jwk(key, "k1", None), ecdsa_by_hand(key, "ES256", "k1")
        reason = "does not match its signing key"
    elif case.startswith("ES384"):
        key = new_key("P-384")
        jwk, token = public_jwk(key, "k1", "ES384"), signed(key, "ES384", "k1")
        reason = "not accepted"
    else:
        key = new_key("RSA")
        jwk = public_jwk(key, "k1", "RS256")
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        payload = b64(json.dumps({"sub": "carol", "exp": int(time.time()) + 60}).encode())
        mac = hmac.new(json.dumps(jwk).encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
        token = f"{header}.{payload}.{b64(mac)}"
        reason = "not accepted"
    with KeyServer([jwk]) as jwks, built_app(app_url, BETTER_AUTH_SECRET="", BETTER_AUTH_JWKS_URL=jwks.url) as app:
        response = app.test_client().get("/api/carol/tasks", headers={"Authorization": f"Bearer {token}"})
        assert_401(response)
        assert reason in response.get_json()["error"]["message"]


def test_a_new_key_is_fetched_at_once():
    """A rotation: the first token signed with the new key is accepted, with one fetch."""
    old, new = new_key("Ed25519"), new_key("P-256")
    with KeyServer([public_jwk(old, "old", "EdDSA")]) as jwks:
        verifier = TokenVerifier(jwks=JwksClient(jwks.url))
        assert verifier.user_id("Bearer " + signed(old, "EdDSA", "old")) == "carol"
        assert jwks.fetches == 1
        jwks.keys.append(public_jwk(new, "new", "ES256"))
        for _ in range(3):
            assert verifier.user_id("Bearer " + signed(new, "ES256", "new")) == "carol"
            assert verifier.user_id("Bearer " + signed(old, "EdDSA", "old")) == "carol"
        assert jwks.fetches == 2


def test_two_rotations_in_a_row_fail_nothing():
    """A second rotation right after the first waits for the next fetch (at most
    one per interval) instead of being refused."""
    keys = [new_key("Ed25519") for _ in range(3)]
    with KeyServer([public_jwk(keys[0], "k0", "EdDSA")]) as jwks:
        verifier = TokenVerifier(jwks=JwksClient(jwks.url))
        assert verifier.user_id("Bearer " + signed(keys[0], "EdDSA", "k0")) == "carol"
        for number in (1, 2):
            jwks.keys.append(public_jwk(keys[number], f"k{number}", "EdDSA"))
            started = time.monotonic()
            assert verifier.user_id("Bearer " + signed(keys[number], "EdDSA", f"k{number}")) == "carol"
            assert time.monotonic() - started < JWKS_MIN_INTERVAL_S + 1
        assert jwks.fetches == 3


def test_an_unknown_key_while_the_jwks_is_unreachable_is_a_503(app_url):
    key = new_key("Ed25519")
    unreachable = f"http://127.0.0.1:{free_port()}/api/auth/jwks"
    with built_app(app_url, BETTER_AUTH_JWKS_URL=unreachable) as app:
        client = app.test_client()
        response = client.get("/api/carol/tasks", headers={"Authorization": "Bearer " + signed(key, "EdDSA", "k1")})
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert response.get_json()["error"]["code"] == "signing_keys_unavailable"
        assert "WWW-Authenticate" not in response.headers
        # HS256 tokens do not need the JWKS and keep working.
        hs256 = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
        assert client.get("/api/carol/tasks", headers={"Authorization": f"Bearer {hs256}"}).status_code == 200


def test_an_unknown_key_while_the_jwks_fails_is_a_503(app_url):
    key = new_key("P-256")
    with KeyServer([public_jwk(key, "k1", "ES256")]) as jwks, \
            built_app(app_url, BETTER_AUTH_JWKS_URL=jwks.url) as app:
        jwks.failing = True
        response = app.test_client().get("/api/carol/tasks",
                                         headers={"Authorization": "Bearer " + signed(key, "ES256", "k1")})
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        jwks.failing = False
        time.sleep(2.1)  # past the retry interval after a failed fetch
        response = app.test_client().get("/api/carol/tasks",
                                         headers={"Authorization": "Bearer " + signed(key, "ES256", "k1")})
        assert response.status_code == 200


def test_known_keys_keep_verifying_while_the_jwks_is_down():
    """An outage of the auth server does not log everybody out: a key fetched
    before keeps verifying (up to max_stale_s), an unknown one is a 503."""
    key = new_key("Ed25519")
    with KeyServer([public_jwk(key, "k1", "EdDSA")]) as jwks:
        client = JwksClient(jwks.url, lifespan_s=0.2, min_interval_s=0, retry_s=0, max_stale_s=1.5)
        verifier = TokenVerifier(jwks=client)
        assert verifier.user_id("Bearer " + signed(key, "EdDSA", "k1")) == "carol"
        jwks.failing = True
        time.sleep(0.3)
        assert verifier.user_id("Bearer " + signed(key, "EdDSA", "k1")) == "carol"
        with pytest.raises(SigningKeysUnavailable):
            verifier.user_id("Bearer " + signed(new_key("Ed25519"), "EdDSA", "k2"))
        time.sleep(1.5)
        with pytest.raises(SigningKeysUnavailable):
            verifier.user_id("Bearer " + signed(key, "EdDSA", "k1"))
        assert jwks.fetches >= 3


def test_waiting_for_a_slow_jwks_is_bounded():
    """Requests that wait together for a fetch share it; beyond max_waiting, 503 at once."""
    key = new_key("Ed25519")
    with KeyServer([public_jwk(key, "k1", "EdDSA")]) as jwks:
        jwks.delay_s = 1.0
        verifier = TokenVerifier(jwks=JwksClient(jwks.url, max_waiting=3))

        def verify(number):
            try:
                return verifier.user_id("Bearer " + signed(key, "EdDSA", "k1", user_id=f"u{number}"))
            except SigningKeysUnavailable:
                return "503"

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(verify, range(8)))
        assert answers.count("503") == 5, answers
        assert all(answer == f"u{number}" for number, answer in enumerate(answers) if answer != "503")
        assert jwks.fetches == 1


def sized_token(length: int, key=SECRET, alg="HS256", headers=None) -> str:
    """A token of exactly `length` characters: a Better Auth user row padded out.
    (Unpadded base64 skips some lengths, so the header may grow by a field.)"""
    now = int(time.time())
    row = {"sub": "carol", "iat": now, "exp": now + 900, "name": "Carol", "email": "carol@example.com",
           "emailVerified": True, "image": None, "createdAt": "2025-01-01T00:00:00.000Z"}
    for pad in ("", "a", "ab", "abc"):
        header = {**(headers or {}), **({"x-pad": pad} if pad else {})}
        base = len(jwt.encode({**row, "bio": ""}, key, algorithm=alg, headers=header))
        estimate = max(0, (length - base) * 3 // 4)
        for size in range(max(0, estimate - 8), estimate + 8):
            token = jwt.encode({**row, "bio": "x" * size}, key, algorithm=alg, headers=header)
            if len(token) == length:
                return token
    raise AssertionError(f"no token of {length} characters")


def test_a_16_kib_token_is_read_and_a_longer_one_is_a_401(app_url):
    with built_app(app_url) as app:
        client = app.test_client()
        token = sized_token(MAX_TOKEN_BYTES)
        assert client.get("/api/carol/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        too_long = sized_token(MAX_TOKEN_BYTES + 1)
        response = client.get("/api/carol/tasks", headers={"Authorization": f"Bearer {too_long}"})
        assert_401(response)
        assert "too long" in response.get_json()["error"]["message"]


ROTATION_KINDS = itertools.cycle([("EdDSA", "Ed25519"), ("ES256", "P-256"), ("ES512", "P-521"), ("RS256", "RSA"),
                                  ("PS256", "RSA")])


@pytest.fixture(scope="module")
def auth_server():
    """A JWKS of the tests' own, like Better Auth's /api/auth/jwks, starting with one key."""
    first = new_key("Ed25519")
    with KeyServer([public_jwk(first, "k0", "EdDSA")]) as jwks:
        jwks.first_key = first
        yield jwks


@pytest.fixture(scope="module")
def two_workers(app_url, auth_server):
    with gunicorn(app_url, workers=2, threads=8, BETTER_AUTH_JWKS_URL=auth_server.url) as server:
        yield server


def test_rotation_under_load_on_two_workers_fails_no_request(auth_server, two_workers):
    """Better Auth rotates its keys (`jwks.rotationInterval`): it publishes the
    new key and signs with it from then on, the old ones stay published. With
    clients signing with the newest key all along, across ten rotations on two
    gunicorn workers, not one request fails."""
    jwks, server = auth_server, two_workers
    current = {"key": jwks.first_key, "alg": "EdDSA", "kid": "k0"}
    fetches_before = jwks.fetches
    done = threading.Event()
    answers, used = [], set()

    def client():
        with requests.Session() as session:
            while not done.is_set():
                signing = dict(current)
                user_id = f"rot-{uuid.uuid4().hex[:8]}"
                token = signed(signing["key"], signing["alg"], signing["kid"], user_id=user_id)
                response = session.get(f"{server.url}/api/{user_id}/tasks",
                                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
                answers.append((signing["kid"], response.status_code, response.text[:200]))
                used.add(signing["kid"])

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for number in range(1, 11):
            time.sleep(0.5)
            alg, kind = next(ROTATION_KINDS)
            key = new_key(kind)
            jwks.keys = [*jwks.keys, public_jwk(key, f"k{number}", alg)]
            current.update(key=key, alg=alg, kid=f"k{number}")
        time.sleep(1.0)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
    failed = [answer for answer in answers if answer[1] != 200]
    assert not failed, failed[:5]
    assert len(answers) >= 60
    assert used >= {f"k{number}" for number in range(11)}
    # Each worker fetches once per new key, not once per request.
    assert jwks.fetches - fetches_before <= 2 * 2 * 11, jwks.fetches - fetches_before


def test_a_16_kib_token_through_gunicorn(auth_server, two_workers):
    """Better Auth puts the whole user row in its claims: a 16 KiB token is read
    through the real HTTP server; a longer Authorization header is a 401 in JSON."""
    key = new_key("Ed25519")
    auth_server.keys = [*auth_server.keys, public_jwk(key, "big", "EdDSA")]
    url = f"{two_workers.url}/api/carol/tasks"
    for token in (sized_token(MAX_TOKEN_BYTES), sized_token(MAX_TOKEN_BYTES, key, "EdDSA", {"kid": "big"})):
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 200, response.text
    for length in (MAX_TOKEN_BYTES + 1, 30_000):
        response = requests.get(url, headers={"Authorization": "Bearer " + sized_token(length)}, timeout=10)
        assert response.status_code == 401
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == "unauthorized"
