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
        ("93.184.216.34", "203.0.113.7", "93.184.216.34"),  # a public peer: its own address; a header is not trusted
        ("127.0.0.1", "203.0.113.7, 10.0.0.1", "203.0.113.7"),  # a tunnel on this machine passes the visitor's on
        ("10.1.2.3", "203.0.113.9", "203.0.113.9"),  # a hosting platform's proxy on a private network
        ("127.0.0.1", None, None),  # this machine, nothing passed on: not known
        (None, "203.0.113.7", None),
    ],
)
def test_the_address_is_the_peers_unless_a_local_or_private_proxy_passes_one_on(host, forwarded, expected):
    assert client_address(request(host, forwarded)) == expected
