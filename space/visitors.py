"""One visitor cannot fill the queue: a cap on the model requests each visitor has queued or running.

Gradio's queue serves requests in order and its only limit (`queue_max_size`) is shared by everyone: over a
public link, one script (or one impatient visitor) could fill it, and every other visitor would be turned away.
`limit_requests_per_visitor` wraps the queue's `push` (what `/gradio_api/queue/join` calls): a request for the
model from a visitor who already has `max_waiting_requests_per_visitor` of them queued or running is refused
with a sentence (HTTP 400; the browser shows it as an error notice) before it takes a place. A visitor is their
session and, where it is known, their client address: a script that opens new sessions is still one address.
"""

from __future__ import annotations

import asyncio
import ipaddress

TOO_MANY = (
    "You already have {count} requests waiting for the model; wait for an answer (or stop one) before sending another."
)


def client_address(request) -> str | None:
    """The visitor's address: the connection's, or, when the connection comes from this machine or a private
    network (a tunnel such as `--share`'s, a local proxy, a hosting platform's proxy, through which every
    visitor would otherwise share one address), the address those proxies were reached from: the last public
    address of X-Forwarded-For (the leftmost address when all are private); None when it is not known.

    Proxies append the address they were reached from, so the header reads "what the client claimed, ..., the
    client, our proxies": a client can write any entry left of its own but none right of it. Reading from the
    right past our own (private) proxies gives the client; the first entry would be whatever the client wrote."""
    host = getattr(getattr(request, "client", None), "host", None)
    if not host or not _is_local(host):
        return host or None
    chain = [entry.strip() for entry in (request.headers.get("x-forwarded-for") or "").split(",") if entry.strip()]
    for entry in reversed(chain):
        if not _is_local(entry):
            return entry
    return chain[0] if chain else None


def _is_local(address: str) -> bool:
    """This machine or a private network: one of our own proxies. Something that is not an address (a name, a
    port-suffixed or garbled entry) is taken as the client's own, never as a proxy."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    return ip.is_loopback or ip.is_private


def _requests_for(queue, concurrency_ids: set[str]) -> list:
    """The events of `concurrency_ids` that are waiting in `queue` or running."""
    waiting = [
        event
        for concurrency_id in concurrency_ids
        for event in getattr(queue.event_queue_per_concurrency_id.get(concurrency_id), "queue", [])
    ]
    running = [event for job in queue.active_jobs if job for event in job]
    return [event for event in [*waiting, *running] if event.concurrency_id in concurrency_ids]


def limit_requests_per_visitor(demo, concurrency_id: str | tuple[str, ...], max_requests: int) -> None:
    """Refuse a request of `concurrency_id` (one or several: their requests count together) from a session or
    address with `max_requests` already there."""
    concurrency_ids = {concurrency_id} if isinstance(concurrency_id, str) else set(concurrency_id)
    queue = demo._queue
    push = queue.push
    joining = asyncio.Lock()  # count and join as one step: two requests sent together cannot both slip under

    async def push_within_limit(body, request, username):
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is None or fn.concurrency_id not in concurrency_ids:
            return await push(body, request, username)
        async with joining:
            address = client_address(request)
            theirs = _requests_for(queue, concurrency_ids)
            same_session = sum(body.session_hash is not None and e.session_hash == body.session_hash for e in theirs)
            same_address = sum(address is not None and client_address(e.request) == address for e in theirs)
            if max(same_session, same_address) >= max_requests:
                return False, TOO_MANY.format(count=max(same_session, same_address)), "error"
            return await push(body, request, username)

    queue.push = push_within_limit
