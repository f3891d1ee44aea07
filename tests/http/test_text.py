from __future__ import annotations

from collections.abc import Sequence

import pytest

from cachemgr.http.text import TextAssembler


class _PiecesDetokenizer:
    """Each token id stands for a fixed piece of text; `tail` is text only finish() releases."""

    def __init__(self, pieces: dict[int, str], tail: str = "") -> None:
        self.pieces = pieces
        self.tail = tail

    def add(self, token_ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in token_ids)

    def finish(self) -> str:
        return self.tail


def _pieces_decoder(pieces: dict[int, str], tail: str = "") -> _PiecesDetokenizer:
    return _PiecesDetokenizer(pieces, tail)


WORDS = {1: "Hello", 2: " wor", 3: "ld", 4: "!", 5: " EN", 6: "D", 7: " more", 8: "\n\nUs", 9: "er:"}


def test_no_stop_emits_everything_as_it_comes() -> None:
    a = TextAssembler(_pieces_decoder(WORDS))
    assert [a.push([1]), a.push([2, 3]), a.push([4]), a.finish()] == ["Hello", " world", "!", ""]
    assert a.text == "Hello world!"
    assert not a.stopped


def test_stop_string_inside_one_token_is_cut() -> None:
    a = TextAssembler(_pieces_decoder({1: "abc", 2: "dXYZef"}), stop=["XYZ"])
    assert a.push([1]) == "abc"
    assert a.push([2]) == "d"
    assert a.stopped and a.stop_text == "XYZ"
    assert a.text == "abcd"
    assert a.push([1]) == ""
    assert a.finish() == ""


def test_tail_that_may_start_a_stop_string_is_held() -> None:
    a = TextAssembler(_pieces_decoder({1: "abX", 2: "Y", 3: "Q"}), stop=["XYZ"])
    assert a.push([1]) == "ab"
    assert a.push([2]) == ""
    assert a.push([3]) == "XYQ"


def test_stop_string_across_tokens_is_never_partially_emitted() -> None:
    a = TextAssembler(_pieces_decoder(WORDS), stop=["\n\nUser:"])
    assert a.push([1]) == "Hello"
    assert a.push([8]) == ""  # "\n\nUs" could still become the stop string
    assert a.push([9]) == ""
    assert a.stopped and a.text == "Hello" and a.stop_text == "\n\nUser:"


def test_held_back_prefix_released_when_it_does_not_complete() -> None:
    a = TextAssembler(_pieces_decoder(WORDS), stop=[" END"])
    assert a.push([1, 5]) == "Hello"
    assert a.push([7]) == " EN more"
    assert a.push([5]) == ""
    assert a.finish() == " EN"
    assert a.text == "Hello EN more EN"


def test_earliest_of_several_stop_strings_wins() -> None:
    a = TextAssembler(_pieces_decoder({1: "one two three"}), stop=["three", "two"])
    assert a.push([1]) == "one "
    assert a.stop_text == "two"


def test_stop_string_completed_by_the_flushed_tail() -> None:
    a = TextAssembler(_pieces_decoder({1: "ab"}, tail="cd"), stop=["bc"])
    assert a.push([1]) == "a"
    assert a.finish() == ""
    assert (a.stopped, a.text, a.stop_text) == (True, "a", "bc")


def test_empty_stop_string_refused() -> None:
    with pytest.raises(ValueError):
        TextAssembler(_pieces_decoder(WORDS), stop=[""])
