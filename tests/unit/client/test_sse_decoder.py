"""`tuneforge._sse`: event data out of a text/event-stream body however the bytes are chunked."""

from __future__ import annotations

import json

import pytest
from tuneforge._sse import SSEDecoder, iter_sse_data
from tuneforge.watcher import parse_frame

QUEUED = {"data": None, "meta": {"is_completed": False, "status": "queued", "steps": 0, "total_steps": 0}}
STEP = {
    "data": {"steps": 2, "checkpoint_number": 1, "train_metrics_loss": 0.75, "validation_metrics_loss": None},
    "meta": {"is_completed": False, "model_uuid": "j-1", "status": "training", "steps": 2, "total_steps": 4},
}
# What the server writes: a keep-alive comment while queued, then `data: <frame>` events.
BODY = (": keep-alive\n\n" + f"data: {json.dumps(QUEUED)}\n\n" + f"data: {json.dumps(STEP)}\n\n").encode()


def _feed_all(chunks: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_whole_body_yields_each_frame_and_skips_the_keep_alive() -> None:
    assert [json.loads(event) for event in _feed_all([BODY])] == [QUEUED, STEP]


@pytest.mark.parametrize("cut", range(1, len(BODY)))
def test_a_split_anywhere_yields_the_same_events(cut: int) -> None:
    assert _feed_all([BODY[:cut], BODY[cut:]]) == _feed_all([BODY])


def test_byte_at_a_time_yields_the_same_events() -> None:
    assert list(iter_sse_data(BODY[i : i + 1] for i in range(len(BODY)))) == _feed_all([BODY])


def test_events_are_returned_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: tw") == ["one"]
    assert decoder.feed(b"o\n\n") == ["two"]


def test_keep_alive_comments_alone_yield_nothing() -> None:
    assert _feed_all([b": keep-alive\n\n", b":\n\n", b": ping\r\n\r\n"]) == []


def test_crlf_split_between_chunks_is_one_line_end_not_two() -> None:
    # Read as two line ends, the LF would be a blank line and cut the event in two.
    assert _feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == ["a\nb"]


def test_bare_cr_line_endings_are_accepted() -> None:
    assert _feed_all([b"data: a\r\rdata: b\r\r"]) == ["a", "b"]


def test_multi_line_data_is_joined_with_newlines_and_one_leading_space_dropped() -> None:
    assert _feed_all([b"data: first\ndata:second\ndata:  indented\ndata\n\n"]) == [
        "first\nsecond\n indented\n"
    ]


def test_other_fields_are_ignored() -> None:
    assert _feed_all([b"event: metrics\nid: 7\nretry: 1000\ndata: x\n\n"]) == ["x"]
    assert _feed_all([b"event: metrics\nid: 7\n\n"]) == []


def test_a_utf8_character_split_across_chunks_is_decoded_whole() -> None:
    encoded = "data: café 🚀\n\n".encode()
    cut = encoded.index("é".encode()) + 1
    assert _feed_all([encoded[:cut], encoded[cut : cut + 3], encoded[cut + 3 :]]) == ["café 🚀"]


def test_a_leading_byte_order_mark_is_dropped() -> None:
    assert _feed_all([b"\xef\xbb", b"\xbfdata: x\n\n"]) == ["x"]


def test_an_event_cut_off_by_the_end_of_the_body_is_not_yielded() -> None:
    assert _feed_all([b"data: complete\n\ndata: cut off\n"]) == ["complete"]


def test_event_data_parses_as_predibase_metrics_frames() -> None:
    queued, step = (parse_frame(event) for event in _feed_all([BODY]))
    assert queued is not None and step is not None
    assert (queued.data.steps, queued.meta.status, queued.meta.is_completed) == (None, "queued", False)
    assert (step.data.steps, step.data.train_metrics_loss, step.data.validation_metrics_loss) == (
        2,
        0.75,
        None,
    )
    assert (step.meta.job_uuid, step.meta.total_steps) == ("j-1", 4)


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '{"data": {"steps": "many"}}'])
def test_data_that_is_not_a_frame_parses_to_none(data: str) -> None:
    assert parse_frame(data) is None
