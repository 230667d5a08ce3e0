"""The endpoint's key, its demo login and its CORS policy, on the ingress' real app without Ray's replicas.

The app is the one the ingress builds: Ray's `init()` (with its allow-every-origin CORS middleware), a route
standing for the model routes, `/healthz`, the root redirect, the comparison demo (real Gradio, mounted at /demo), then
`llm_ingress.guard`. Only the models behind it are a stand-in (`Asker`): nothing here reaches one.
tests/integration/test_serve_llm.py checks the same rules over HTTP against the served vLLM app.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.responses import RedirectResponse
from fastapi.testclient import TestClient

from inbol_ray.config import Config
from serve.api import DEMO_PATH, Limits
from serve.auth import COOKIE, LOGIN_PATH, check_exposure, cookie_token, is_loopback

KEY = "test-key-0123456789"
VAR = "INBOL_TEST_AUTH_KEY"
EVIL = "http://evil.example"
MAX_IMAGE_BYTES = 50_000


class Asker:
    """The models behind the demo; the tests here never ask them."""

    served = {"base": None, "cadpo": None}

    async def ask(self, image: bytes, question: str, mode: str = "answer", model: str | None = None) -> dict:
        raise AssertionError("no test here reaches a model")

    async def image_work(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def build(tmp_path: Path, key: str | None, cors_origins: list[str] | None = None) -> TestClient:
    from serve.compare_demo import mount_compare_demo
    from serve.llm_ingress import guard
    from serve.ray_llm import init

    cfg = Config(run_dir=str(tmp_path / "run"))
    serve = dataclasses.replace(cfg.serve, cors_origins=cors_origins or [], max_image_bytes=MAX_IMAGE_BYTES)
    cfg = dataclasses.replace(cfg, serve=serve)
    limits = Limits.from_config(cfg)
    app = init()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse(DEMO_PATH + "/")

    mount_compare_demo(app, Asker(), limits, cfg, path=DEMO_PATH)
    return TestClient(guard(app, cfg.serve, limits, key))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    with build(tmp_path_factory.mktemp("auth"), KEY) as c:
        yield c


def test_every_route_but_healthz_needs_the_bearer_key(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == 401
        assert KEY not in r.text
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for path in ("/demo/config", "/demo/", "/readyz", "/v1/chat/completions", "/no/such/route"):
        assert client.get(path).status_code == 401, path
    join = client.post("/demo/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
    assert join.status_code == 401  # the demo's event queue, not only its pages
    assert client.post("/demo/gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401


def test_the_demo_opens_with_a_login_cookie_that_is_not_the_key(client: TestClient) -> None:
    page = client.get("/demo/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and f'action="{LOGIN_PATH}"' in page.text  # a browser gets the form
    wrong = client.post(LOGIN_PATH, data={"key": "wrong"}, follow_redirects=False)
    assert wrong.status_code == 401 and "not right" in wrong.text and "set-cookie" not in wrong.headers
    ok = client.post(LOGIN_PATH, data={"key": KEY}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == DEMO_PATH + "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    token = cookie_token(KEY)
    assert f"{COOKIE}={token}" in cookie
    jar = {"Cookie": f"{COOKIE}={token}"}
    config = client.get("/demo/config", headers=jar)
    assert config.status_code == 200 and "I don't know" in config.text
    assert client.get("/demo/", headers=jar).status_code == 200
    assert client.get("/", headers=jar, follow_redirects=False).status_code == 307
    assert client.get("/v1/models", headers=jar).status_code == 401  # the cookie opens the demo only
    stale = {"Cookie": f"{COOKIE}={cookie_token('the previous key')}"}
    assert client.get("/demo/config", headers=stale).status_code == 401  # a new key voids old cookies


def test_the_demo_refuses_uploads_over_max_image_bytes(client: TestClient) -> None:
    """Gradio's `max_file_size` is the serving image cap: a larger upload is refused, not stored."""
    upload = "/demo/gradio_api/upload"
    small = client.post(
        upload, headers={"Authorization": f"Bearer {KEY}"}, files={"files": ("a.png", b"x" * 1000)}
    )
    assert small.status_code == 200, small.text
    big = client.post(upload, headers={"Authorization": f"Bearer {KEY}"},
                      files={"files": ("a.png", b"x" * (MAX_IMAGE_BYTES + 1))})  # fmt: skip
    assert big.status_code == 413, big.text


def test_cors_is_off_unless_origins_are_listed(client: TestClient, tmp_path: Path) -> None:
    """Ray's `init()` allows every origin with credentials; the guard takes that out before the app starts,
    and Gradio's own CORS (which answers any origin on a non-localhost host) defers to ours."""
    preflight = {"Origin": EVIL, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    for path in ("/v1/chat/completions", "/demo/gradio_api/queue/join"):
        r = client.options(path, headers=preflight)
        assert "access-control-allow-origin" not in r.headers, (path, r.headers)
    simple = client.get("/demo/config", headers={"Origin": EVIL, "Host": "demo.example.org",
                                                 "Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    with build(tmp_path, KEY, cors_origins=["https://app.example"]) as listed:
        r = listed.options("/v1/models", headers={**preflight, "Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in r.headers
        assert "access-control-allow-origin" not in listed.options("/v1/models", headers=preflight).headers


def test_without_a_key_everything_is_open_on_loopback(tmp_path: Path) -> None:
    with build(tmp_path, None) as open_client:
        assert open_client.get("/v1/models").status_code == 200
        assert open_client.get("/demo/config").status_code == 200
        assert open_client.post(LOGIN_PATH, data={"key": "x"}).status_code in (404, 405)  # no login route


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("10.0.0.5", False),
        ("localhost.evil.example", False),
        ("my-host", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_reachable_host_without_a_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    check_exposure("127.0.0.1", VAR, insecure=False)  # loopback: only this machine's users reach it
    with pytest.raises(SystemExit) as exit_:
        check_exposure("0.0.0.0", VAR, insecure=False)
    assert VAR in str(exit_.value.code) and "--insecure" in str(exit_.value.code)
    monkeypatch.setenv(VAR, "")  # an empty variable is no key
    with pytest.raises(SystemExit):
        check_exposure("10.1.2.3", VAR, insecure=False)
    with pytest.warns(UserWarning, match=VAR):
        check_exposure("0.0.0.0", VAR, insecure=True)
    monkeypatch.setenv(VAR, KEY)
    check_exposure("0.0.0.0", VAR, insecure=False)


def test_the_refusal_is_a_non_zero_exit_naming_the_variable() -> None:
    code = f"from serve.auth import check_exposure; check_exposure('0.0.0.0', {VAR!r}, insecure=False)"
    env = {k: v for k, v in os.environ.items() if k != VAR}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and f"set {VAR}" in done.stderr, done.stderr[-500:]
