import subprocess

import pytest

from cmhsa import provenance
from cmhsa.provenance import git_state


def test_git_state_is_this_checkout_and_none_outside_one(monkeypatch):
    state = git_state()
    root = provenance.__file__.rsplit("/", 1)[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert state["commit"] == head and len(head) == 40 and isinstance(state["dirty"], bool)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert git_state() == {"commit": None, "dirty": None}
