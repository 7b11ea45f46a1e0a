"""The version state machine: the transitions a version may take, and no others."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from surge.server.repository.versions import ModelEntry, State, VersionRecord


def deployment():
    return SimpleNamespace(drained=threading.Event())


def test_a_version_lives_through_load_serve_and_unload():
    entry = ModelEntry("m", None)
    v1 = entry.versions["1"] = VersionRecord("1", None)
    v1.loading()
    dep1 = deployment()
    assert entry.switch(v1, dep1, remember=True) is None
    assert (v1.state, entry.serving, v1.serves) == (State.READY, "1", True)
    v2 = entry.versions["2"] = VersionRecord("2", None)
    v2.loading()
    retired = entry.switch(v2, deployment(), remember=True)
    assert retired is v1 and entry.history == ["1"]
    assert v1.unloading("replaced") is dep1 and v1.state is State.UNLOADING and v1.draining is dep1.drained
    v1.detach(dep1)
    v1.unloaded(dep1.drained, "replaced")
    assert (v1.state, v1.reason, v1.deployment, v1.draining) == (State.UNAVAILABLE, "unloaded: replaced", None, None)


def test_a_failed_load_can_be_retried():
    record = VersionRecord("1", None, signature=("a",))
    record.loading()
    assert record.tried == ("a",)
    record.failed("bad file")
    assert (record.state, record.reason) == (State.FAILED, "bad file")
    record.loading()
    assert record.state is State.LOADING


@pytest.mark.parametrize("setup, step", [
    ([], lambda r: r.ready(deployment())),  # UNAVAILABLE -> READY skips loading
    ([], lambda r: r.failed("x")),  # nothing was loading
    (["loading"], lambda r: r.loading()),  # two loads at once
])
def test_other_transitions_are_refused(setup, step):
    record = VersionRecord("1", None)
    for name in setup:
        getattr(record, name)()
    with pytest.raises(RuntimeError, match="no transition"):
        step(record)


def test_an_old_drain_does_not_clobber_a_reload():
    """A drain that ends after the version was loaded again leaves the new deployment alone."""
    record = VersionRecord("1", None)
    record.loading()
    old = deployment()
    record.ready(old)
    record.unloading("unloaded by request")
    record.loading()  # the reload stopped waiting for the drain
    new = deployment()
    record.ready(new)
    record.detach(old)
    record.unloaded(old.drained, "unloaded by request")
    assert record.state is State.READY and record.deployment is new
