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
        (None, "8.8.4.4", None),
    ],
)
def test_the_address_is_the_peers_unless_local_proxies_pass_on_the_one_they_were_reached(host, forwarded, expected):
    assert client_address(request(host, forwarded)) == expected
