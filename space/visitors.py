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
import json
import re
import time
from collections import OrderedDict, deque

from starlette.requests import Request
from starlette.responses import JSONResponse

from space.uploads import UPLOAD_ROUTE, content_length

TOO_MANY_SESSIONS = (
    "Too many new sessions from your address in the last hour; please wait a while, or keep using the session "
    "you have (one client, one page)."
)
_SESSION_ROUTE = re.compile(r"/gradio_api/(?:queue/join|run/|call/|api/)")
"""The routes whose body names the session a request belongs to (and which start it if it is new)."""
BODY_TOO_LARGE = "This request is too large; send files as uploads (see the HTTP API's docs)."
NO_SUCH_FUNCTION = 'There is no such function; the page\'s "Use via API" link lists the endpoints and their names.'


class NewSessionQuota:
    """ASGI middleware: every POST body but an upload's (`space.uploads.UploadQuota` counts those) is at most
    `max_body_bytes` (a larger one gets 413 before it is read whole: Gradio's routes read and parse a body in
    memory, and answers to a malformed one may echo it back); a client address (`client_address`, its /64 for
    IPv6; unknown ones are not counted) may start at most `max_new` sessions in `window_s`; a request that would
    start one more gets 429 with a sentence (JSON, as Gradio's own refusals, so that the page shows it; 422 in the
    validation form to gradio_client).

    Gradio keeps `max_sessions` sessions and drops the least recently used beyond: a script that opens sessions
    by the thousand would otherwise push every visitor's concepts out within seconds. Sessions are told apart by
    the `session_hash` of a request's body; the hashes seen recently are remembered (twice `max_sessions` of
    them), so a session's later requests are not counted again.
    """

    def __init__(self, app, *, max_new: int, max_body_bytes: int, window_s: float = 3600.0, remember: int = 2000):
        self.app = app
        self.max_new, self.window_s, self.remember = max_new, window_s, remember
        self.max_body_bytes = max_body_bytes
        """A larger request body is refused (413): files come through the upload route, not in a request's body."""
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._started: OrderedDict[str, deque[float]] = OrderedDict()

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope.get("method") == "POST" and not UPLOAD_ROUTE.search(scope["path"])):
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _too_large(scope)(scope, receive, send)
            return
        body, more = b"", True  # read whole (up to the limit), then handed on as one message
        while more and len(body) <= self.max_body_bytes:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if len(body) > self.max_body_bytes:
            await _too_large(scope)(scope, receive, send)
            return
        request = Request(scope)
        starts = _SESSION_ROUTE.search(scope["path"]) is not None
        if starts and not self._admits(_session_hash(body), client_address(request)):
            # As Gradio's own refusals: JSON whose "detail" the page shows as the error's sentence (and
            # gradio_client, as a validation refusal: `_refusal`).
            _, detail, kind = _refusal(TOO_MANY_SESSIONS, request)
            status = 422 if kind == "validator_error" else 429
            await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _admits(self, session_hash: str | None, address: str | None) -> bool:
        """Whether a request of `session_hash` (None: a body without one, which the queue serves in a session of
        its own, so it starts one every time) from `address` may go on."""
        if session_hash is not None and session_hash in self._seen:
            self._seen.move_to_end(session_hash)
            return True
        address = _network(address)
        if address is not None:
            now = time.monotonic()
            started = self._started.setdefault(address, deque())
            self._started.move_to_end(address)  # also when refused: an address at its cap is not forgotten first
            while started and now - started[0] > self.window_s:
                started.popleft()
            if len(started) >= self.max_new:
                return False
            started.append(now)
            # Bounded, in constant time per request: the addresses that started a session longest ago are forgotten
            # first (one host cycling through many IPv6 networks must not grow this without end).
            while len(self._started) > self.remember:
                self._started.popitem(last=False)
        if session_hash is not None:
            self._seen[session_hash] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return True


def _network(address: str | None) -> str | None:
    """An IPv4 address itself (also written IPv4-mapped, "::ffff:1.2.3.4"); an IPv6 address's /64 network, which
    one host may fill with addresses."""
    try:
        ip = ipaddress.ip_address(address) if address is not None else None
    except ValueError:
        return address
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip is not None and ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


def _session_hash(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    value = document.get("session_hash") if isinstance(document, dict) else None
    return value if isinstance(value, str) and value else None


def _too_large(scope) -> JSONResponse:
    """The refusal of a request body over the limit: HTTP 413 with the sentence as its `detail`; to `gradio_client`
    (which shows no sentence of a 413) the 422 validation refusal whose sentence it shows (`_refusal`)."""
    _, detail, kind = _refusal(BODY_TOO_LARGE, Request(scope))
    return JSONResponse({"detail": detail}, status_code=422 if kind == "validator_error" else 413)


def _refusal(sentence: str, request) -> tuple:
    """What the queue's `push` returns to refuse a request with `sentence`, in the form its client shows: the page
    (and curl) read a 400's `detail` sentence; `gradio_client` (header x-gradio-user: api) shows the sentence of
    a 422 validation refusal only (a 400 reaches the script as a bare HTTP error), so it gets that form."""
    headers = getattr(request, "headers", None) or {}
    if headers.get("x-gradio-user") == "api":
        return (
            False,
            [{"__type__": "validate", "is_valid": False, "parameter_name": "request", "message": sentence}],
            ("validator_error"),
        )
    return False, sentence, "error"


TOO_MANY = (
    "You already have {count} requests waiting for the model; wait for an answer (or stop one) before sending another."
)


def client_address(request) -> str | None:
    """The visitor's address: the connection's, or, when the connection comes from this machine or a network that
    is not the Internet (a tunnel such as `--share`'s, a local proxy, a hosting platform's proxy, through which
    every visitor would otherwise share one address), the address those proxies were reached from: the last
    Internet address of X-Forwarded-For (the leftmost address when none is: a private network end to end); None
    when it is not known.

    Proxies append the address they were reached from, so the header reads "what the client claimed, ..., the
    client, our proxies": a client can write any entry left of its own but none right of it. Reading from the
    right past our own proxies gives the client; the first entry would be whatever the client wrote. Several
    header lines read as one list, in order (as the HTTP standard has it); an entry's port is not part of the
    address."""
    host = getattr(getattr(request, "client", None), "host", None)
    if not host or not _is_local(host):
        return host or None
    chain = [
        address
        for line in _header_lines(getattr(request, "headers", None) or {}, "x-forwarded-for")
        for address in map(_without_port, line.split(","))
        if address
    ]
    for entry in reversed(chain):
        if not _is_local(entry):
            return entry
    return chain[0] if chain else None


def _header_lines(headers, name: str) -> list[str]:
    """Every line of header `name`: Starlette's headers keep repeated lines apart, a plain mapping (a request
    Gradio copied for its queue) holds one."""
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:
        return list(getlist(name))
    value = headers.get(name)
    return [value] if value else []


def _without_port(entry: str) -> str:
    """ "93.184.216.34:5678" -> "93.184.216.34", "[2001:db8::1]:443" -> "2001:db8::1"; a bare IPv6 address (several
    colons) and anything else as written, stripped."""
    entry = entry.strip()
    if entry.startswith("[") and "]" in entry:
        return entry[1 : entry.index("]")]
    host, colon, port = entry.rpartition(":")
    if colon and host.count(":") == 0 and port.isdigit():
        return host
    return entry


def _is_local(address: str) -> bool:
    """This machine or a network that is not the Internet (private, carrier-grade NAT, link-local: where our own
    proxies live). Something that is not an address (a name, a garbled entry) is taken as the client's own, never
    as a proxy."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_loopback


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
        if fn is None and body.fn_index is not None:  # Gradio's push would fail with a traceback in the log
            return _refusal(NO_SUCH_FUNCTION, request)
        if fn is None or fn.concurrency_id not in concurrency_ids:
            return await push(body, request, username)
        async with joining:
            # One visitor is one IPv6 /64, as for new sessions: a host may rotate through its network's addresses.
            address = _network(client_address(request))
            theirs = _requests_for(queue, concurrency_ids)
            same_session = sum(body.session_hash is not None and e.session_hash == body.session_hash for e in theirs)
            same_address = sum(address is not None and _network(client_address(e.request)) == address for e in theirs)
            if max(same_session, same_address) >= max_requests:
                return _refusal(TOO_MANY.format(count=max(same_session, same_address)), request)
            return await push(body, request, username)

    queue.push = push_within_limit
