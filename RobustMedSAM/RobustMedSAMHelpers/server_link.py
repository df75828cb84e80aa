"""Slicer's side of the inference server, event-driven: nothing here blocks the main
thread or runs on a Python thread (Slicer's PythonQt keeps the GIL while Qt idles, so a
Python worker thread would starve; docs/slicer.md).

- :class:`LocalServer`: ``<python> -m RobustMedSAMLib serve --port 0`` on 127.0.0.1 in a
  ``QProcess``; its one-line JSON ready message (URL, token) is read from stdout through
  ``readyReadStandardOutput``; the last lines of its stderr make the error when it dies.
- :class:`ServerLink`: HTTP/1.1 requests on non-blocking sockets, framed by ``h11`` (a
  sans-IO library: it never touches a socket), stepped by one ``QTimer`` every
  :data:`TICK_MS` with at most :data:`TICK_BUDGET_S` of socket work per tick. Callbacks run
  on the main thread, from the timer.
- :class:`LinkSession` and :class:`Operation`: a server session on one volume along one
  axis (its mask mirrored from the answers' patches) and the cancellable request chains
  of the protocol (upload, slice, propagate, encode-ahead; docs/server.md).

Torch-free: only numpy, h11 and the library's protocol module are imported, so a remote
server needs no torch in Slicer's Python.
"""

from __future__ import annotations

import collections
import json
import logging
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import CancelledError, InputError, ServerError
from RobustMedSAMLib.server.protocol import (
    VOLUME_MEDIA_TYPE,
    OpenedSession,
    VolumeHeader,
    changed_extent,
    decode_patch,
    encode_patch,
    parse_answer,
    volume_body_parts,
)

log = logging.getLogger(__name__)

TICK_MS = 20
"""The link's timer interval: how often sockets are serviced while requests are open."""
TICK_BUDGET_S = 0.008
"""Socket work per tick (send, receive, compress the upload): the main thread stays free."""
DEATH_GRACE_MS = 2000
"""How long a lost connection to a local server waits for the process's own report."""
JOB_WAIT_S = 0.25
"""Long-poll of a job: the server answers at its end or after this with its progress."""
UPLOAD_SLAB_BYTES = 2**20
"""Raw voxel bytes compressed per piece of the upload (a few ms each)."""
RECV_BYTES = 256 * 1024
SEND_BYTES = 256 * 1024
STDERR_LINES = 20

Done = Callable[[Any], None]
Failed = Callable[[Exception], None]


def _no_op(*_args) -> None:
    return None


def _h11():
    """``h11``, imported on first use: the module must load in a Slicer whose Python does
    not have it yet, so that the panel can offer to install it."""
    import h11

    return h11


# --- one HTTP exchange --------------------------------------------------------------


class Call:
    """One request and its answer on a connection of its own (closed after it).

    ``body``: bytes, or an iterable of byte pieces produced a few per tick (the volume
    upload is compressed that way). ``on_done(answer_dict)`` or ``on_error(exception)``
    runs exactly once, unless :meth:`abort` comes first.
    """

    def __init__(self, link: ServerLink, method: str, path: str, body, content_type: str,
                 on_done: Done, on_error: Failed, timeout: float) -> None:  # fmt: skip
        self.link, self.method, self.path = link, method, path
        self.content_type = content_type
        self.on_done, self.on_error = on_done, on_error
        self.deadline = time.monotonic() + timeout
        self.finished = False
        self._parts: Iterator[bytes] | None = None
        self._pieces: list[bytes] = []
        if body is None:
            self._body: bytes | None = b""
        elif isinstance(body, bytes | bytearray):
            self._body = bytes(body)
        elif isinstance(body, dict | list):
            self._body = json.dumps(body).encode()
        else:
            self._body, self._parts = None, iter(body)
        self._sock: socket.socket | None = None
        self._connected = False
        self._handshaken = link.scheme != "https"
        self._out = memoryview(b"")
        self._h11 = _h11().Connection(_h11().CLIENT)
        self._status = 0
        self._payload = bytearray()

    # the state machine: produce body -> connect -> (TLS) -> send -> receive
    def step(self, until: float) -> None:
        """Do what can be done without waiting, until ``until`` (monotonic seconds)."""
        try:
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"no answer within {self.link.timeout:.0f} s")
            if self._body is None and not self._produce(until):
                return
            if self._sock is None:
                self._open()
            if not self._connected and not self._connect():
                return
            if not self._handshaken and not self._handshake():
                return
            while len(self._out) and time.monotonic() < until:
                sent = self._sock.send(self._out[:SEND_BYTES])
                self._out = self._out[sent:]
            if not len(self._out):
                self._receive(until)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
            return
        except ssl.SSLError as error:
            self._fail(ServerError(
                f"TLS with {self.link.url} failed ({error}); if the server's certificate is "
                "from your own CA or self-signed, give that certificate (CA file)"
            ))  # fmt: skip
        except (OSError, _h11().ProtocolError, TimeoutError) as error:
            self._close()
            self.link.connection_failed(self, error)

    def _produce(self, until: float) -> bool:
        """Pull body pieces within the budget; True once the whole body is there."""
        while time.monotonic() < until:
            piece = next(self._parts, None)
            if piece is None:
                self._body, self._parts = b"".join(self._pieces), None
                self._pieces = []
                return True
            self._pieces.append(piece)
        return False

    def _open(self) -> None:
        h11 = _h11()
        family, kind, proto, _, address = self.link.address()
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._address = sock, address
        error = sock.connect_ex(address)
        if error not in (0, 115, 36, 10035, 11):  # 0, EINPROGRESS (Linux, macOS), WSA, EAGAIN
            raise ConnectionRefusedError(error, "connect failed")
        headers = [
            ("Host", self.link.host_header),
            ("Authorization", f"Bearer {self.link.token}"),
            ("Content-Length", str(len(self._body))),
            ("Connection", "close"),
        ]
        if self._body:
            headers.append(("Content-Type", self.content_type))
        request = h11.Request(method=self.method, target=self.link.prefix + self.path,
                              headers=headers)  # fmt: skip
        wire = self._h11.send(request) + self._h11.send(h11.Data(data=self._body))
        self._out = memoryview(wire + self._h11.send(h11.EndOfMessage()))
        self._body = b""

    def _connect(self) -> bool:
        _, writable, _ = select.select([], [self._sock], [], 0)
        if not writable:
            return False
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise ConnectionRefusedError(error, "connection refused")
        self._connected = True
        if not self._handshaken:
            self._sock = self.link.tls_context().wrap_socket(
                self._sock, server_hostname=self.link.host, do_handshake_on_connect=False
            )
        return True

    def _handshake(self) -> bool:
        self._sock.do_handshake()  # SSLWant* until it completes
        self._handshaken = True
        return True

    def _receive(self, until: float) -> None:
        h11 = _h11()
        while time.monotonic() < until:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                data = self._sock.recv(RECV_BYTES)  # BlockingIOError: nothing yet
                self._h11.receive_data(data)
                if not data and self._h11.their_state is not h11.DONE:
                    raise ConnectionResetError("the server closed the connection mid-answer")
            elif isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._payload += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._finish()
                return

    def _finish(self) -> None:
        self._close()
        try:
            answer = parse_answer(self._status, bytes(self._payload),
                                  f"{self.method} {self.path}", self.link.url)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - the protocol's error, for on_error
            self._deliver(self.on_error, error)
        else:
            self._deliver(self.on_done, answer)

    def _fail(self, error: Exception) -> None:
        self._close()
        self._deliver(self.on_error, error)

    def _deliver(self, callback, value) -> None:
        self.finished = True
        try:
            callback(value)
        except Exception:  # a callback's own bug must not stop the timer's other work
            log.exception("RobustMedSAM: a server answer's callback failed")

    def _close(self) -> None:
        self.finished = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def abort(self) -> None:
        """Drop the request: its socket is closed and no callback runs."""
        self._close()


# --- the link: calls stepped by a timer ---------------------------------------------


class ServerLink:
    """Requests to one server (``url``, bearer ``token``), stepped by a QTimer.

    ``qt``: Slicer's ``qt`` module (a stand-in in the headless tests). ``address`` is
    resolved once, here (a remote name's DNS look-up is the one blocking step).
    """

    def __init__(self, url: str, token: str, qt, timeout: float = 600.0,
                 cafile: str | None = None) -> None:  # fmt: skip
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server URL {url!r} is not http://HOST:PORT or https://HOST:PORT")
        self.url, self.token, self.timeout = url.rstrip("/"), token.strip(), timeout
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.cafile = cafile
        self.qt = qt
        self.died: Exception | None = None  # set when the server process is known dead
        self.wait_for_death = False  # a local server: a lost connection may be its death
        self.held: list[tuple[Call, Exception]] = []
        self._address = None
        self._tls = None
        self.calls: list[Call] = []
        self.timer = qt.QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.connect("timeout()", self.tick)

    def address(self):
        if self._address is None:
            try:
                self._address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            except OSError as error:
                raise ConnectionError(f"cannot resolve {self.host}: {error}") from None
        return self._address

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self.cafile)
        return self._tls

    def connection_error(self, error: Exception) -> Exception:
        """The one error a failed exchange reports: the server's death when known."""
        if self.died is not None:
            return self.died
        return ServerError(
            f"the server at {self.url} stopped answering ({type(error).__name__}: {error}); "
            "check that it is running — nothing was written"
        )

    def connection_failed(self, call: Call, error: Exception) -> None:
        """A call lost its connection. For a local server that may be its death, whose
        report (exit code, stderr) comes a moment later through QProcess: the call waits
        up to :data:`DEATH_GRACE_MS` for :meth:`fail_all`, so the user gets that one
        error rather than a bare "connection reset"."""
        if self.died is not None or not self.wait_for_death:
            call._deliver(call.on_error, self.connection_error(error))
            return
        self.held.append((call, error))
        self.qt.QTimer.singleShot(DEATH_GRACE_MS, lambda: self._release(call))

    def _release(self, call: Call) -> None:
        for held in [h for h in self.held if h[0] is call]:
            self.held.remove(held)
            call._deliver(call.on_error, self.connection_error(held[1]))

    def request(self, method: str, path: str, body=None, on_done: Done = _no_op,
                on_error: Failed = _no_op, content_type: str = "application/json",
                timeout: float | None = None) -> Call:  # fmt: skip
        """Queue one request; its callbacks run from :meth:`tick` on the main thread."""
        call = Call(self, method, path, body, content_type, on_done, on_error,
                    timeout or self.timeout)  # fmt: skip
        if self.died is not None:
            call._fail(self.died)
            return call
        self.calls.append(call)
        if not self.timer.isActive():
            self.timer.start()
        return call

    def tick(self) -> None:
        """The timer's slot: step each open call within :data:`TICK_BUDGET_S` in all."""
        until = time.monotonic() + TICK_BUDGET_S
        for call in list(self.calls):
            if not call.finished:
                call.step(until)
            if time.monotonic() >= until:
                break
        self.calls = [c for c in self.calls if not c.finished]
        if not self.calls:
            self.timer.stop()

    def fail_all(self, error: Exception) -> None:
        """The server is gone: every open call and every later one fails with ``error``."""
        self.died = error
        calls, self.calls = self.calls, []
        held, self.held = self.held, []
        self.timer.stop()
        for call in calls:
            if not call.finished:
                call._fail(error)
        for call, _lost in held:
            call._deliver(call.on_error, error)

    def close(self) -> None:
        """Drop every open call (no callbacks) and stop the timer."""
        for call in self.calls:
            call.abort()
        self.calls = []
        self.timer.stop()


# --- the local server process -------------------------------------------------------


def qbytes(data) -> bytes:
    """A PythonQt ``QByteArray`` (or bytes) as bytes."""
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raw = data.data()
    return raw if isinstance(raw, bytes) else bytes(raw, "latin-1")


def serve_arguments(model: str, device: str = "auto", checkpoint: str | None = None) -> list[str]:
    """``-m RobustMedSAMLib serve`` on 127.0.0.1, a free port, a token made for this start
    (it comes back in the ready line, through the private stdout pipe)."""
    arguments = ["-m", "RobustMedSAMLib", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--model", model, "--device", device]  # fmt: skip
    return arguments + (["--checkpoint", str(checkpoint)] if checkpoint else [])


class LocalServer:
    """A server process (``python`` + ``arguments``, e.g. :func:`serve_arguments`) in a
    QProcess.

    ``on_ready(url, token, info)`` once its ready line arrives; ``on_died(error)`` once if
    it ends before :meth:`stop` (the error holds its exit code and last stderr lines).
    ``python``: the interpreter (Slicer's own PythonSlicer, where the dependency check
    installs torch); ``pythonpath``: folders to put first on its PYTHONPATH (the one
    holding ``RobustMedSAMLib``).
    """

    def __init__(self, qt, python: str, arguments: Iterable[str], pythonpath: Iterable[str],
                 on_ready: Callable[[str, str, dict], None], on_died: Failed) -> None:  # fmt: skip
        self.qt, self.python, self.arguments = qt, python, list(arguments)
        self.pythonpath = [str(p) for p in pythonpath]
        self.on_ready, self.on_died = on_ready, on_died
        self.info: dict | None = None
        self.stopping = False
        self._stdout = b""
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._partial = b""
        self.process = None

    def start(self) -> None:
        qt = self.qt
        process = self.process = qt.QProcess()
        environment = qt.QProcessEnvironment.systemEnvironment()
        existing = environment.value("PYTHONPATH")
        paths = self.pythonpath + ([existing] if existing else [])
        environment.insert("PYTHONPATH", _pathsep().join(paths))
        environment.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(environment)
        process.connect("readyReadStandardOutput()", self._read_stdout)
        process.connect("readyReadStandardError()", self._read_stderr)
        process.connect("finished(int,QProcess::ExitStatus)", self._finished)
        process.connect("errorOccurred(QProcess::ProcessError)", self._error)
        process.start(self.python, self.arguments)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.state() != self.qt.QProcess.NotRunning

    def _read_stdout(self) -> None:
        self._stdout += qbytes(self.process.readAllStandardOutput())
        if self.info is None and b"\n" in self._stdout:
            line = self._stdout.split(b"\n", 1)[0]
            try:
                info = json.loads(line)
                url, token = info["url"], info["token"]
            except (ValueError, KeyError, TypeError):
                self._report(f"its first line was not the ready message: {line[:200]!r}")
                self.stop()
                return
            self.info = info
            self.on_ready(url, token, info)

    def _read_stderr(self) -> None:
        text = self._partial + qbytes(self.process.readAllStandardError())
        *lines, self._partial = text.split(b"\n")
        for line in lines:
            if line.strip():
                self._stderr.append(line.decode(errors="replace").rstrip())
                log.debug("server: %s", self._stderr[-1])

    def _finished(self, code: int = 0, status: int = 0) -> None:
        self._read_stderr()
        if self._partial.strip():
            self._stderr.append(self._partial.decode(errors="replace").rstrip())
            self._partial = b""
        if not self.stopping:
            self._report(f"it stopped with exit code {code}")

    def _error(self, error: int = 0) -> None:
        if error == self.qt.QProcess.FailedToStart and not self.stopping:
            self._report(f"{self.python} could not be started")

    def _report(self, what: str) -> None:
        if self.stopping:
            return
        self.stopping = True  # one report only
        tail = "\n".join(self._stderr) or "(nothing on stderr)"
        self.on_died(ServerError(
            f"the RobustMedSAM server ({self.python} {' '.join(self.arguments)}) failed: "
            f"{what}. Its last messages:\n{tail}"
        ))  # fmt: skip

    def stop(self, kill_after_ms: int = 5000) -> None:
        """Ask it to end (SIGTERM; killed after ``kill_after_ms`` if still there)."""
        self.stopping = True
        process = self.process
        if process is None or process.state() == self.qt.QProcess.NotRunning:
            return
        process.terminate()
        self.qt.QTimer.singleShot(kill_after_ms, lambda: process.state() and process.kill())

    @property
    def messages(self) -> list[str]:
        """The server's last stderr lines."""
        return list(self._stderr)


def _pathsep() -> str:
    import os

    return os.pathsep


# --- sessions and operations --------------------------------------------------------


class Operation:
    """A handle on a chain of requests (e.g. upload -> segment -> poll the job).

    :meth:`cancel`: a job already running on the server is cancelled there (the server
    changes nothing); then ``on_error(CancelledError)`` runs, once. Callbacks run on the
    main thread. ``state``: ``running``, ``done``, ``failed`` or ``cancelled``.
    """

    def __init__(self, on_done: Done | None = None, on_error: Failed | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        self.on_done, self.on_error = on_done or _no_op, on_error or _no_op
        self.on_progress = on_progress or _no_op
        self.state = "running"
        self.cancel_requested = False
        self.call: Call | None = None
        self.job_session: LinkSession | None = None  # set while a server job runs

    @property
    def running(self) -> bool:
        return self.state == "running"

    def cancel(self) -> None:
        if not self.running or self.cancel_requested:
            return
        self.cancel_requested = True
        if self.job_session is None:  # nothing runs on the server yet: stop here
            if self.call is not None:
                self.call.abort()
            self.fail(CancelledError("cancelled"))
        # else: the job's next poll answer sends the cancel (LinkSession.run_job)

    def done(self, *values) -> None:
        if self.running:
            self.state = "done"
            self._safely(self.on_done, *values)

    def fail(self, error: Exception) -> None:
        if self.running:
            self.state = "cancelled" if isinstance(error, CancelledError) else "failed"
            self._safely(self.on_error, error)

    def step(self, call_maker: Callable[[Done, Failed], Call], then: Done) -> None:
        """Issue the next request of the chain; ``then(answer)`` continues it."""
        if not self.running:
            return
        if self.cancel_requested and self.job_session is None:
            self.fail(CancelledError("cancelled"))
            return

        def answered(answer) -> None:
            if self.running:
                try:
                    then(answer)
                except Exception as error:  # noqa: BLE001 - reported as this operation's
                    self.fail(error)

        self.call = call_maker(answered, self.fail)

    @staticmethod
    def _safely(callback, *values) -> None:
        try:
            callback(*values)
        except Exception:
            log.exception("RobustMedSAM: a request's callback failed")


class LinkSession(OpenedSession):
    """A session on the server: one volume along one axis; ``mask`` mirrors the server's
    current ``(K, J, I)`` mask (kept equal by applying each answer's patch) and
    ``touched`` bounds where it may be non-zero."""

    def __init__(self, link: ServerLink, opened: dict[str, Any]) -> None:
        super().__init__(opened)
        self.link = link
        self.touched: tuple[slice, ...] | None = None

    @staticmethod
    def open(
        link: ServerLink,
        array: np.ndarray,
        ijk_to_ras: np.ndarray,
        axis,
        window,
        name: str,
        operation: Operation,
        then: Callable[[LinkSession], None],
    ) -> None:
        """Upload a ``(K, J, I)`` volume (compressed a slab per tick); ``then(session)``."""
        header = VolumeHeader(tuple(array.shape), array.dtype.name,
                              np.asarray(ijk_to_ras, float).tolist(), axis,
                              None if window is None else tuple(float(v) for v in window),
                              None, name)  # fmt: skip
        parts = volume_body_parts(array, header, slab_bytes=UPLOAD_SLAB_BYTES)
        operation.step(
            lambda done, failed: link.request(
                "POST", "/v1/sessions", parts, done, failed, VOLUME_MEDIA_TYPE
            ),  # fmt: skip
            lambda opened: then(LinkSession(link, opened)),
        )

    def apply(self, patch: dict | None) -> tuple[slice, ...] | None:
        """Apply an answer's patch to the mirror; the extent it covered (None: no change)."""
        if patch is None:
            return None
        extent, block = decode_patch(patch, self.shape)
        self.mask[extent] = block
        self.touched = union_extent(self.touched, extent)
        return extent

    def slice_extent(self, index: int) -> tuple[slice, ...]:
        extent = [slice(0, n) for n in self.shape]
        extent[self.axis] = slice(index, index + 1)
        return tuple(extent)

    def mask_patch(self, index: int, slice_mask: np.ndarray) -> tuple[dict | None, tuple]:
        """The ``/mask`` patch that leaves only ``slice_mask`` ``(rows, cols)`` on slice
        ``index`` (everything the mirror holds elsewhere cleared) and the new mirror's
        extent; only ``touched`` and that slice are looked at."""
        seed = self.slice_extent(index)
        region = union_extent(self.touched, seed)
        wanted = np.zeros([s.stop - s.start for s in region], dtype=bool)
        inner = tuple(
            slice(s.start - r.start, s.stop - r.start) for s, r in zip(seed, region, strict=True)
        )
        wanted[inner] = np.expand_dims(np.asarray(slice_mask, bool), self.axis)
        differ = changed_extent(self.mask[region], wanted)
        if differ is None:
            return None, seed
        patch = encode_patch(wanted, differ)
        patch["offset"] = [r.start + d.start for r, d in zip(region, differ, strict=True)]
        return patch, seed

    def run_job(self, operation: Operation, kind: str, body: dict, then: Done) -> None:
        """Start job ``kind`` and long-poll it; progress to ``operation.on_progress``;
        ``then(result)`` when done, the job's error (CancelledError too) otherwise."""
        from RobustMedSAMLib.server.protocol import error_for

        sent = []

        def state(view: dict) -> None:
            if operation.cancel_requested and view["state"] == "running" and not sent:
                sent.append(self.link.request("POST", f"{self.path}/cancel", {}))
            if view["state"] == "running":
                if view.get("total"):
                    operation._safely(operation.on_progress, view["done"], view["total"])
                operation.step(
                    lambda done, failed: self.link.request(
                        "GET", f"{self.path}/job?wait={JOB_WAIT_S}", None, done, failed
                    ),
                    state,
                )
                return
            operation.job_session = None
            if view["state"] == "done":
                if view.get("total"):
                    operation._safely(operation.on_progress, view["done"], view["total"])
                then(view["result"])
                return
            error = view.get("error") or {}
            operation.fail(error_for(error.get("error", ""), error.get("detail", "the job failed")))

        operation.step(
            lambda done, failed: self.link.request(
                "POST", f"{self.path}/{kind}", body, done, failed
            ),  # fmt: skip
            state,
        )
        operation.job_session = self  # from now on a cancel goes to the server


def union_extent(a: tuple[slice, ...] | None, b: tuple[slice, ...]) -> tuple[slice, ...]:
    """The smallest box holding two KJI boxes (``a`` None: ``b``)."""
    if a is None:
        return b
    pairs = zip(a, b, strict=True)
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in pairs)
