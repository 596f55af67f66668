"""Download headers and control-plane blob URLs: any file name yields one safe Content-Disposition."""

from __future__ import annotations

import re
from urllib.parse import unquote

from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.storage.urls import content_disposition

# RFC 6266's grammar: a disposition type, then `; name=value` with a token or a quoted-string value.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"'
_PARAM = rf";\s*({_TOKEN})\s*=\s*({_QUOTED}|{_TOKEN})"


def _params(header: str) -> dict[str, str]:
    """The header's parameters, after checking that all of it parses (nothing a name could add)."""
    assert re.fullmatch(rf"attachment(?:{_PARAM})*", header), header
    found = re.findall(_PARAM, header)
    assert len({name for name, _ in found}) == len(found), f"a parameter repeats: {header}"
    return dict(found)


@settings(max_examples=300, deadline=None)
@given(name=st.text(min_size=1, max_size=400))
@example(name='a"; filename=evil.sh; x="y.csv')
@example(name="line\r\nSet-Cookie: session=stolen.csv")
@example(name="semi;colon,comma.csv")
@example(name="日本語のデータ.jsonl")
@example(name="\ud800lone-surrogate.csv")
@example(name="x" * 5000 + ".parquet")
def test_any_file_name_gives_one_filename_and_one_utf8_filename(name: str) -> None:
    header = content_disposition(name)
    assert header.isascii() and "\r" not in header and "\n" not in header
    assert len(header) < 1500
    params = _params(header)
    assert set(params) == {"filename", "filename*"}, params
    fallback = params["filename"]
    assert fallback.startswith('"') and fallback.endswith('"') and '"' not in fallback[1:-1]
    assert params["filename*"].startswith("UTF-8''")
    decoded = unquote(params["filename*"].removeprefix("UTF-8''"), errors="replace")
    if (
        len(name) <= 150
        and "/" not in name
        and "\\" not in name
        and name.encode("utf-8", "replace") == name.encode("utf-8", "surrogatepass")
    ):
        assert decoded == name


def test_long_names_keep_their_extension() -> None:
    header = content_disposition("a" * 300 + ".jsonl")
    assert header.startswith('attachment; filename="' + "a" * 144 + '.jsonl"')
