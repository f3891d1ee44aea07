from __future__ import annotations

from collections.abc import Sequence

import pytest

from computeworker.engine.stop import StopStringMatcher
from shared.detokenizer import IncrementalDetokenizer

VOCAB = ["Hel", "lo", " W", "or", "ld", "!", "\n\n", "User", ":", "\xe2", "\x82\xac"]


def _decode(ids: Sequence[int]) -> str:
    # Tokens 9 and 10 are the two halves of the UTF-8 bytes of "€" (E2 82 AC), as byte-level BPE splits it.
    raw = b"".join(VOCAB[i].encode("latin-1") for i in ids)
    return raw.decode("utf-8", errors="replace")


def _matcher(stops: list[str]) -> StopStringMatcher:
    return StopStringMatcher(stops, IncrementalDetokenizer(_decode))


def _feed(matcher: StopStringMatcher, ids: list[int]) -> list[str | None]:
    return [matcher.push(i) for i in ids]


def test_stop_string_spanning_three_tokens() -> None:
    m = _matcher(["o Wor"])
    assert _feed(m, [0, 1, 2]) == [None, None, None]
    assert m.push(3) == "o Wor"
    assert m.text == "Hello Wor"
    with pytest.raises(ValueError, match="already matched"):
        m.push(4)


def test_earliest_match_wins_and_ties_go_to_list_order() -> None:
    m = _matcher(["World", "lo W"])
    assert _feed(m, [0, 1, 2]) == [None, None, "lo W"]
    m = _matcher(["\n\nUser:", "\n\n"])
    assert _feed(m, [4, 6]) == [None, "\n\n"]
    m = _matcher(["\n\nUser:"])
    assert _feed(m, [4, 6, 7, 8]) == [None, None, None, "\n\nUser:"]


def test_no_false_match_and_split_character() -> None:
    m = _matcher(["€!", "xyz"])
    assert _feed(m, [0, 9]) == [None, None]  # half a character: no text yet
    assert m.text == "Hel"
    assert m.push(10) is None
    assert m.text == "Hel€"
    assert m.push(5) == "€!"


def test_bad_stops_rejected() -> None:
    with pytest.raises(ValueError):
        _matcher([])
    with pytest.raises(ValueError):
        _matcher(["ok", ""])
