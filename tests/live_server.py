"""A live tuneforge control plane over real HTTP, for SDK, client and worker tests."""

from __future__ import annotations


class LiveServer:
    """The app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, settings: object) -> None:
        import socket
        import threading

        import uvicorn

        from app.main import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)  # type: ignore[arg-type]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def mint_token(self, tenant: str, user: str = "alice") -> str:
        from app.db.session import transaction
        from app.services import auth

        with transaction(self.app.state.ctx.sessions) as session:
            return auth.create_token(session, auth.get_or_create_user(session, tenant, user))
