"""space/visitors.py: who a visitor is, for the cap on their waiting model requests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from space.visitors import client_address


def request(host, forwarded=None):
    headers = {"x-forwarded-for": forwarded} if forwarded else {}
    return SimpleNamespace(client=SimpleNamespace(host=host) if host else None, headers=headers)


@pytest.mark.parametrize(
    "host, forwarded, expected",
    [
        ("93.184.216.34", "8.8.4.4", "93.184.216.34"),  # a public peer: its own address; a header is not trusted
        ("127.0.0.1", "8.8.4.4, 10.0.0.1", "8.8.4.4"),  # a tunnel on this machine passes the visitor's on
        ("10.1.2.3", "93.184.216.34", "93.184.216.34"),  # a hosting platform's proxy on a private network
        # A client's own header comes first and each proxy appends the address it was reached from: the claim on the
        # left is not taken, the address our proxies saw is, past every proxy of ours on the way.
        ("10.1.2.3", "1.1.1.1, 93.184.216.34", "93.184.216.34"),
        ("10.1.2.3", "1.1.1.1, 93.184.216.34, 10.0.0.7, 127.0.0.1", "93.184.216.34"),
        ("127.0.0.1", "not-an-address, 93.184.216.34", "93.184.216.34"),
        ("10.1.2.3", "192.168.1.20, 10.0.0.7", "192.168.1.20"),  # a private network end to end: the first
        ("10.1.2.3", " , ", None),
        ("127.0.0.1", None, None),  # this machine, nothing passed on: not known
        # A port is not part of the address: one client on many ports is one client.
        ("10.1.2.3", "93.184.216.34:50123", "93.184.216.34"),
        ("10.1.2.3", "[2606:4700::1111]:443, 10.0.0.7:80", "2606:4700::1111"),
        ("10.1.2.3", "2606:4700::1111", "2606:4700::1111"),
        # Proxies on carrier-grade NAT, link-local or IPv4-mapped addresses are ours too, not the visitor.
        ("100.64.3.4", "93.184.216.34, 100.70.0.1", "93.184.216.34"),
        ("::ffff:10.1.2.3", "93.184.216.34, fe80::1", "93.184.216.34"),
        (None, "8.8.4.4", None),
    ],
)
def test_the_address_is_the_peers_unless_local_proxies_pass_on_the_one_they_were_reached(host, forwarded, expected):
    assert client_address(request(host, forwarded)) == expected


def test_every_line_of_the_header_counts_in_order():
    """A proxy may add its own X-Forwarded-For line instead of extending the client's: the lines read as one list,
    so the client's own line cannot hide the address the proxy saw."""
    from starlette.datastructures import Headers

    headers = Headers(raw=[(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"93.184.216.34, 10.0.0.7")])
    assert client_address(SimpleNamespace(client=SimpleNamespace(host="10.1.2.3"), headers=headers)) == "93.184.216.34"


def _server(max_new: int, remember: int = 100, max_body_bytes: int = 4 << 20):
    """A Starlette app behind `NewSessionQuota` that echoes the session of each request it lets through."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from space.visitors import NewSessionQuota

    async def join(request):
        return JSONResponse({"session_hash": (await request.json()).get("session_hash")})

    async def sized(request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(
        routes=[Route(f"/gradio_api/{path}", join, methods=["POST"]) for path in ("queue/join", "run/x")]
        + [Route(f"/gradio_api/{path}", sized, methods=["POST"]) for path in ("cancel", "upload")],
        middleware=[Middleware(NewSessionQuota, max_new=max_new, remember=remember, max_body_bytes=max_body_bytes)],
    )
    return TestClient(app, client=("127.0.0.1", 5000))  # a local proxy: the address is X-Forwarded-For's


def test_one_address_may_start_only_so_many_sessions_and_keeps_using_them():
    """A script opening sessions by the thousand would push every visitor's session out of Gradio's
    `max_sessions`: beyond its quota an address is refused a new session, with a sentence, and keeps its own."""
    client = _server(max_new=2)

    def post(session, address, route="queue/join"):
        return client.post(f"/gradio_api/{route}", json={"session_hash": session}, headers={"x-forwarded-for": address})

    assert post("a1", "203.0.113.7").json() == {"session_hash": "a1"}
    assert post("a2", "203.0.113.7", route="run/x").status_code == 200
    refused = post("a3", "203.0.113.7")
    assert refused.status_code == 429 and "Too many new sessions from your address" in refused.json()["detail"]
    assert post("a1", "203.0.113.7").status_code == 200  # its sessions go on
    assert post("b1", "198.51.100.4").status_code == 200  # another address has its own quota
    unknown = client.post("/gradio_api/queue/join", json={"session_hash": "c1"})  # no address known: not counted
    assert unknown.status_code == 200
    # Without a session_hash the queue gives each request a session of its own: each one counts.
    anonymous = [
        client.post("/gradio_api/run/x", json={"data": []}, headers={"x-forwarded-for": "192.0.2.9"}).status_code
        for _ in range(3)
    ]
    assert anonymous == [200, 200, 429]
    # One IPv6 host may hold a whole /64: its addresses share one quota.
    v6 = [post(f"v6-{i}", f"2001:db8:1:2::{i + 1}").status_code for i in range(3)]
    assert v6 == [200, 200, 429] and post("v6-x", "2001:db8:1:3::1").status_code == 200
    assert client.post("/gradio_api/queue/join", content=b"x" * (5 << 20)).status_code == 413
    # gradio_client shows the sentence of a validation refusal only: a script is refused in that form.
    from gradio_client.utils import extract_validation_message

    scripted = client.post(
        "/gradio_api/queue/join",
        json={"session_hash": "a4"},
        headers={"x-forwarded-for": "203.0.113.7", "x-gradio-user": "api"},
    )
    assert scripted.status_code == 422 and "Too many new sessions" in extract_validation_message(scripted)


def test_the_request_body_limit_is_the_spaces_setting():
    """The Space's launch options hand `max_request_body_mb` to the middleware: a body past it is refused (413,
    with a sentence), one within it goes through."""
    from starlette.middleware import Middleware

    import app
    from ego import DEFAULT_SETTINGS
    from space.settings import SpaceSettings
    from space.visitors import BODY_TOO_LARGE, NewSessionQuota

    options = app.launch_options(DEFAULT_SETTINGS, SpaceSettings(max_request_body_mb=1))
    (quota,) = [
        m for m in options["app_kwargs"]["middleware"] if isinstance(m, Middleware) and m.cls is NewSessionQuota
    ]
    client = _server(max_new=100, max_body_bytes=quota.kwargs["max_body_bytes"])
    padding = " " * ((1 << 20) - 100)
    assert (
        client.post("/gradio_api/queue/join", content=f'{{"session_hash": "s1", "x": "{padding}"}}').status_code == 200
    )
    refused = client.post("/gradio_api/queue/join", content=b"x" * ((1 << 20) + 1))
    assert refused.status_code == 413 and refused.json() == {"detail": BODY_TOO_LARGE}


def test_every_body_but_an_uploads_is_capped_before_it_is_read_whole():
    """Gradio reads and parses a POST body in memory on every route (/cancel, /reset, /stream/..., and may echo a
    malformed one back): the cap holds for all of them, and a declared size past it is refused before the body
    arrives; uploads are files, counted by `UploadQuota` instead, and pass."""
    from space.visitors import BODY_TOO_LARGE

    client = _server(max_new=100, max_body_bytes=1 << 20)
    refused = client.post("/gradio_api/cancel", content=b"x" * ((1 << 20) + 1))
    assert refused.status_code == 413 and refused.json() == {"detail": BODY_TOO_LARGE}
    # gradio_client shows no sentence of a 413: it gets the validation refusal whose sentence it shows.
    scripted = client.post("/gradio_api/queue/join", content=b"x" * ((1 << 20) + 1), headers={"x-gradio-user": "api"})
    assert scripted.status_code == 422 and scripted.json()["detail"][0]["message"] == BODY_TOO_LARGE
    assert client.post("/gradio_api/cancel", content=b"x" * (1 << 20)).json() == {"bytes": 1 << 20}

    def claimed(route: str, size: int):
        """A body whose Content-Length claims `size` while one byte is sent: nothing past the claim is awaited."""
        return client.post(f"/gradio_api/{route}", content=b"x", headers={"content-length": str(size)})

    assert claimed("cancel", (1 << 20) + 1).status_code == 413
    assert claimed("queue/join", 5 << 30).status_code == 413
    assert client.post("/gradio_api/upload", content=b"x" * (3 << 20)).json() == {"bytes": 3 << 20}


def test_an_ipv4_mapped_address_is_its_ipv4_address_and_ipv6_hosts_are_their_network():
    from space.visitors import _network

    assert _network("::ffff:203.0.113.7") == "203.0.113.7" == _network("203.0.113.7")
    assert _network("::ffff:198.51.100.1") != _network("::ffff:203.0.113.7")  # not one quota for all of IPv4
    assert _network("2001:db8:1:2::7") == _network("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert _network("not-an-address") == "not-an-address" and _network(None) is None


def test_the_sessions_remembered_are_bounded():
    from space.visitors import NewSessionQuota

    quota = NewSessionQuota(None, max_new=1000, max_body_bytes=1 << 20, remember=3)
    for number in range(10):
        assert quota._admits(f"s{number}", "203.0.113.7")
    assert list(quota._seen) == ["s7", "s8", "s9"]
    # Addresses too: the ones that started a session longest ago are forgotten first.
    for number in range(10):
        assert quota._admits(f"t{number}", f"2001:db8:{number}::1")
    assert list(quota._started) == [f"2001:db8:{number}::/64" for number in (7, 8, 9)]
    # An address that keeps knocking at its cap is the last one forgotten, not the first.
    quota = NewSessionQuota(None, max_new=2, max_body_bytes=1 << 20, remember=3)
    assert [quota._admits(f"a{n}", "203.0.113.7") for n in range(3)] == [True, True, False]
    for number in range(2):
        assert quota._admits(f"o{number}", f"198.51.100.{number}")
    assert not quota._admits("a9", "203.0.113.7")
    assert quota._admits("o9", "198.51.100.9") and not quota._admits("a10", "203.0.113.7")
