"""The pure bookkeeping of resumable requests: what a worker keeps of their output,
what a reattach from token M gets, how long a finished output stays, which frontend
reads which request."""

from __future__ import annotations

import pytest

from dynrt.runtime.protocol import TokenFrame, TokenLogprobs, Usage
from dynrt.worker.frontend_requests import FrontendRequests
from dynrt.worker.retained_output import (
    ATTACHED_FINISH_RETENTION,
    RetainedOutput,
    RetainedOutputs,
    retention_after_finish,
)


def lp(i: int) -> TokenLogprobs:
    return TokenLogprobs(logprob=-float(i), top_ids=[i], top_logprobs=[-float(i)])


def test_replay_from_m_is_every_token_after_m_and_nothing_before() -> None:
    out = RetainedOutput("r", 30.0)
    out.append(TokenFrame(token_ids=[1, 2, 3]))
    out.append(TokenFrame(token_ids=[4]))
    out.append(TokenFrame(token_ids=[5, 6]))
    assert out.replay(0) == TokenFrame(token_ids=[1, 2, 3, 4, 5, 6])
    assert out.replay(2) == TokenFrame(token_ids=[3, 4, 5, 6])
    # The caller has everything: an empty frame (it tells the caller the reattach worked).
    assert out.replay(6) == TokenFrame(token_ids=[])
    assert not out.finished


def test_caller_claiming_more_tokens_than_retained_cannot_replay() -> None:
    out = RetainedOutput("r", 30.0)
    out.append(TokenFrame(token_ids=[1, 2]))
    assert out.can_replay_from(2) and not out.can_replay_from(3) and not out.can_replay_from(-1)
    with pytest.raises(ValueError):
        out.replay(3)


def test_replay_of_a_finished_request_carries_finish_reason_usage_and_logprobs() -> None:
    usage = Usage(prompt_tokens=7, completion_tokens=4)
    out = RetainedOutput("r", 30.0)
    out.append(TokenFrame(token_ids=[1, 2], logprobs=[lp(1), lp(2)]))
    out.append(TokenFrame(token_ids=[3, 4], finish_reason="length", usage=usage, logprobs=[lp(3), lp(4)]))
    assert out.finished
    assert out.replay(1) == TokenFrame(token_ids=[2, 3, 4], finish_reason="length", usage=usage,
                                       logprobs=[lp(2), lp(3), lp(4)])
    assert out.replay(4) == TokenFrame(token_ids=[], finish_reason="length", usage=usage, logprobs=[])
    with pytest.raises(ValueError):
        out.append(TokenFrame(token_ids=[5]))


def test_no_logprobs_kept_when_none_were_asked_for() -> None:
    out = RetainedOutput("r", 30.0)
    out.append(TokenFrame(token_ids=[1]))
    out.append(TokenFrame(token_ids=[], finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1)))
    assert out.logprobs is None and out.replay(0).logprobs is None


def test_retention_after_finish_is_the_grace_when_detached_else_capped() -> None:
    assert retention_after_finish(30.0, detached=True) == 30.0
    assert retention_after_finish(30.0, detached=False) == ATTACHED_FINISH_RETENTION == 10.0
    assert retention_after_finish(4.0, detached=False) == 4.0


def test_registry_counts_detached_running_and_finished_outputs() -> None:
    outputs = RetainedOutputs()
    running = outputs.open("a", 30.0)
    detached = outputs.open("b", 30.0)
    finished = outputs.open("c", 30.0)
    detached.detached = True
    finished.append(TokenFrame(token_ids=[1], finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1)))
    assert (len(outputs), outputs.detached_running(), outputs.finished()) == (3, 1, 1)
    finished.frontend_id = "fe-a"
    assert outputs.finished_read_by("fe-a") == [finished] and outputs.finished_read_by("fe-b") == []
    finished.detached = True  # already nobody's: not returned again
    assert outputs.finished_read_by("fe-a") == []
    with pytest.raises(ValueError):
        outputs.open("a", 30.0)
    assert outputs.get("a") is running
    assert outputs.drop("b") is detached and outputs.drop("b") is None
    assert (outputs.detached_running(), outputs.finished()) == (0, 1)
    assert sorted(outputs.clear()) == ["a", "c"] and len(outputs) == 0


def test_frontend_requests_move_with_a_reattach_and_leave_with_their_frontend() -> None:
    tracked = FrontendRequests()
    tracked.track("r1", "fe-a")
    tracked.track("r2", "fe-a")
    tracked.track("r3", "fe-b")
    tracked.track("r1", "fe-b")  # reattached through fe-b
    assert tracked.pop_frontend("fe-a") == {"r2"}
    assert tracked.pop_frontend("fe-a") == set()
    tracked.untrack("r3")
    tracked.untrack("r3")  # twice is harmless
    assert tracked.pop_frontend("fe-b") == {"r1"}
    assert len(tracked) == 0


def test_a_migrated_request_replays_in_whole_output_positions() -> None:
    """A request that arrived with 3 output tokens (it migrated here): a frontend with 5
    gets the rest of this worker's part; one resuming from a checkpoint with 1 gets the
    prior ids it lacks too; with logprobs, nothing before this worker's part."""
    out = RetainedOutput("r", 30.0, prior_ids=[10, 11, 12])
    out.append(TokenFrame(token_ids=[13, 14]))
    out.append(TokenFrame(token_ids=[15]))
    assert out.replay(5) == TokenFrame(token_ids=[15])
    assert out.replay(3) == TokenFrame(token_ids=[13, 14, 15])
    assert out.replay(1) == TokenFrame(token_ids=[11, 12, 13, 14, 15])
    assert out.can_replay_from(0) and out.can_replay_from(6) and not out.can_replay_from(7)
    with_logprobs = RetainedOutput("r", 30.0, prior_ids=[10, 11, 12])
    with_logprobs.append(TokenFrame(token_ids=[13], logprobs=[lp(13)]))
    assert with_logprobs.replay(3) == TokenFrame(token_ids=[13], logprobs=[lp(13)])
    assert not with_logprobs.can_replay_from(2)
