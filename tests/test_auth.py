"""Authentication per CONTRACT section 3: every failure kind is a 401 with
`WWW-Authenticate: Bearer`; a valid token on another user's path is 403."""
from __future__ import annotations

import base64
import json
import random
import string
import time
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwks_server import KeyServer
from jwt.algorithms import OKPAlgorithm
from support import SECRET, built_app, make_user
from test_chat import counting_statements

from chat_blueprint.auth import LEEWAY_S


def token(claims=None, secret=SECRET, algorithm="HS256", drop=(), headers=None):
    now = int(time.time())
    payload = {"sub": "carol", "iat": now, "exp": now + 600, **(claims or {})}
    for name in drop:
        payload.pop(name)
    return jwt.encode(payload, secret, algorithm=algorithm, headers=headers)


def unsigned(claims) -> str:
    def part(value):
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def get_tasks(client, authorization, user_id="carol"):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.get(f"/api/{user_id}/tasks", headers=headers)


def assert_401(response):
    assert response.status_code == 401, response.get_json()
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json()["error"]["code"] == "unauthorized"


def test_valid_token_is_accepted(client):
    assert get_tasks(client, f"Bearer {token()}").status_code == 200


@pytest.mark.parametrize("authorization", [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Basic Y2Fyb2w6cGFzcw==",
    "Bearer garbage",
    "Bearer a.b.c",
    "Bearer " + "A" * 6000,
    "Bearer " + "x" * 9000,
])
def test_missing_or_malformed_is_401(client, authorization):
    assert_401(get_tasks(client, authorization))


def test_wrong_secret_is_401(client):
    assert_401(get_tasks(client, "Bearer " + token(secret="another-secret-that-is-also-long-enough-000000")))


def test_expired_is_401(client):
    assert_401(get_tasks(client, "Bearer " + token({"exp": int(time.time()) - 60})))


def test_not_yet_valid_is_401(client):
    assert_401(get_tasks(client, "Bearer " + token({"nbf": int(time.time()) + 600})))


def test_issued_in_the_future_is_401(client):
    assert_401(get_tasks(client, "Bearer " + token({"iat": int(time.time()) + 600})))


@pytest.mark.parametrize("claim, inside, outside", [("exp", -2, -10), ("nbf", 2, 10), ("iat", 2, 10)])
def test_clocks_may_disagree_by_the_documented_five_seconds(client, claim, inside, outside):
    """README and docs/better-auth.md promise LEEWAY_S (5 s) of clock skew, no more."""
    assert LEEWAY_S == 5
    assert get_tasks(client, "Bearer " + token({claim: int(time.time()) + inside})).status_code == 200
    assert_401(get_tasks(client, "Bearer " + token({claim: int(time.time()) + outside})))


def test_alg_none_is_401(client):
    assert_401(get_tasks(client, "Bearer " + unsigned({"sub": "carol", "exp": int(time.time()) + 600})))


@pytest.mark.parametrize("claims, drop", [({}, ("sub",)), ({}, ("exp",)), ({"sub": ""}, ()), ({"sub": 42}, ()),
                                          ({"exp": "tomorrow"}, ())])
def test_missing_or_bad_claims_are_401(client, claims, drop):
    assert_401(get_tasks(client, "Bearer " + token(claims, drop=drop)))


def test_other_hmac_algorithms_are_401(client):
    assert_401(get_tasks(client, "Bearer " + token(algorithm="HS512")))


def test_token_in_query_or_cookie_is_ignored(client):
    valid = token()
    assert_401(client.get(f"/api/carol/tasks?token={valid}&access_token={valid}"))
    client.set_cookie("token", valid)
    client.set_cookie("better-auth.session_token", valid)
    assert_401(client.get("/api/carol/tasks"))


def test_path_mismatch_is_403(client):
    response = get_tasks(client, f"Bearer {token()}", user_id="dave")
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"


def random_id(length: int, alphabet=string.ascii_letters + string.digits) -> str:
    return "".join(random.choices(alphabet, k=length))


@pytest.mark.parametrize("length", [256, 4000])
def test_a_subject_over_255_characters_is_401_and_reaches_no_database(client, monkeypatch, length):
    """The finding: a token whose `sub` held ~3,600 random characters made every
    write of its user a 503 (the key's index row overflowed); a token is now
    refused before any statement runs."""
    user_id = random_id(length)
    with counting_statements(monkeypatch) as sent:
        response = client.post(f"/api/{user_id}/tasks", json={"title": "t"},
                               headers={"Authorization": "Bearer " + token({"sub": user_id})})
    assert_401(response)
    assert sent == []


def test_a_subject_of_255_characters_of_any_script_is_served(client):
    user_id = random_id(255, [chr(code) for code in range(0x20000, 0x2A6DF)])  # four UTF-8 bytes each
    headers = {"Authorization": "Bearer " + token({"sub": user_id})}
    path = f"/api/{quote(user_id, safe='')}/tasks"
    assert client.post(path, json={"title": "t"}, headers=headers).status_code == 201
    assert [task["user_id"] for task in client.get(path, headers=headers).get_json()] == [user_id]


@pytest.mark.parametrize("length", [256, 4000])
def test_a_path_user_id_over_255_characters_is_403_before_any_statement(client, monkeypatch, length):
    """It cannot be a verified `sub`, so it is refused as another user's path,
    before anything reaches the database."""
    with counting_statements(monkeypatch) as sent:
        response = client.post(f"/api/{random_id(length)}/tasks", json={"title": "t"},
                               headers={"Authorization": f"Bearer {token()}"})
    assert response.status_code == 403 and response.get_json()["error"]["code"] == "forbidden"
    assert sent == []


def test_auth_comes_before_body_checks(client):
    response = client.post("/api/carol/tasks", data=b"{", content_type="text/plain")
    assert_401(response)


def test_issuer_and_audience_are_checked_when_configured(app_url):
    with built_app(app_url, JWT_ISSUER="https://auth.example", JWT_AUDIENCE="todo-api") as app:
        client = app.test_client()
        good = token({"iss": "https://auth.example", "aud": "todo-api"})
        assert get_tasks(client, f"Bearer {good}").status_code == 200
        for claims in ({"iss": "https://evil.example", "aud": "todo-api"}, {"iss": "https://auth.example", "aud": "x"},
                       {"aud": "todo-api"}, {"iss": "https://auth.example"}):
            assert_401(get_tasks(client, "Bearer " + token(claims)))


def eddsa_token(private_key, kid, user_id):
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + 600}, private_key, algorithm="EdDSA",
                      headers={"kid": kid})


def test_jwks_eddsa_tokens(app_url):
    key = Ed25519PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="key-1", alg="EdDSA", use="sig")
    with KeyServer([jwk]) as jwks, built_app(app_url, BETTER_AUTH_JWKS_URL=jwks.url) as app:
        client = app.test_client()
        user = make_user("jwks")
        accepted = client.get(f"/api/{user.id}/tasks",
                              headers={"Authorization": "Bearer " + eddsa_token(key, "key-1", user.id)})
        assert accepted.status_code == 200
        stranger = Ed25519PrivateKey.generate()
        for forged in (eddsa_token(stranger, "key-1", user.id), eddsa_token(stranger, "key-2", user.id)):
            assert_401(client.get(f"/api/{user.id}/tasks", headers={"Authorization": f"Bearer {forged}"}))
        # HS256 tokens keep working beside the JWKS.
        assert client.get(f"/api/{user.id}/tasks", headers=user.headers).status_code == 200
