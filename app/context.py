"""The long-lived objects one control-plane process builds from Settings and hands to every request."""

from __future__ import annotations

from dataclasses import dataclass

from anyio import CapacityLimiter
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db.session import make_engine, make_session_factory
from app.queue import JobQueue
from app.settings import Settings
from app.signing import Signer
from app.storage import BlobStore, open_blob_store


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: BlobStore
    # Upload tokens are handed to clients between the two halves of an upload.
    upload_signer: Signer
    # Producer side of the job queue (connects lazily, on the first send).
    queue: JobQueue
    # Threads the metrics streams' database polls may hold at once, apart from the request handlers'.
    stream_limiter: CapacityLimiter

    @classmethod
    def from_settings(cls, settings: Settings) -> AppContext:
        engine = make_engine(
            settings.database_url, connect_timeout_seconds=settings.database_connect_timeout_seconds
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            store=open_blob_store(settings),
            upload_signer=Signer(settings.secret_key, "upload"),
            queue=JobQueue(settings),
            stream_limiter=CapacityLimiter(settings.metrics_stream_threads),
        )

    def close(self) -> None:
        self.queue.close()
        self.engine.dispose()
