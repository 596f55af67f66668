"""A TCP forwarder a test can cut and restore: a network outage between a client and a shared server.

The machine's PostgreSQL is shared and must stay up, so an outage is simulated in between: `cut()`
closes every forwarded connection and from then on accepts new ones but never answers them (the
way a host that vanished looks to a client: only its connect timeout gets it out); `restore()`
forwards again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class TcpProxy:
    """Listens on a free loopback port and forwards each connection to `target` on threads of its own."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):  # wakes the acceptor blocked in accept() (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._drop_all()
        self._acceptor.join(timeout=5)

    def cut(self) -> None:
        """Drop every connection; new ones are accepted and then left unanswered."""
        self._cut.set()
        self._drop_all()

    def restore(self) -> None:
        """Forward again; the connections held unanswered during the cut are closed."""
        self._cut.clear()
        self._drop_all()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            self._track(client)
            if self._cut.is_set():
                continue  # a black hole: held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._drop(client)
                continue
            upstream.settimeout(None)
            self._track(upstream)
            if self._cut.is_set():  # cut while we connected: this one must not get through either
                self._drop(client)
                self._drop(upstream)
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._drop(source)
        self._drop(sink)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):  # already closed by the other side
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _drop_all(self) -> None:
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            self._drop(sock)
