"""A Generated frame's logprobs arrays, as the daemon reads them: one entry per token, or refused."""

from __future__ import annotations

import numpy as np
import pytest

from cachemgr.daemon.messages import BadMessage, _token_logprobs
from shared.ids import ids_to_bytes
from shared.protocol import Generated


def _frame(num_tokens: int, k: int, *, logprobs: int | None = None, top: int | None = None) -> Generated:
    return Generated(
        b"r" * 16,
        ids_to_bytes(list(range(num_tokens))),
        logprobs=np.arange(logprobs if logprobs is not None else num_tokens, dtype="<f4").tobytes(),
        top_ids=np.arange(top if top is not None else num_tokens * k, dtype="<i4").tobytes(),
        top_logprobs=np.arange(num_tokens * k, dtype="<f4").tobytes(),
    )


def test_entries_per_token() -> None:
    assert _token_logprobs(_frame(2, 3), 2) == (
        (0.0, [0, 1, 2], [0.0, 1.0, 2.0]),
        (1.0, [3, 4, 5], [3.0, 4.0, 5.0]),
    )
    assert _token_logprobs(_frame(2, 0), 2) == ((0.0, [], []), (1.0, [], []))


@pytest.mark.parametrize("bad", [{"logprobs": 3}, {"top": 5}, {"logprobs": 0}])
def test_arrays_that_do_not_fit_are_refused(bad: dict) -> None:
    with pytest.raises(BadMessage):
        _token_logprobs(_frame(2, 3, **bad), 2)
