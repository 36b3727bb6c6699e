"""space/session.py: one visitor's concepts; refused changes change nothing."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from PIL import Image

from ego.errors import InputError
from ego.memory import Concept, ConceptView
from space.session import Entry, Session, forget

THUMB = Image.new("RGB", (8, 8))


def entry(name: str, tokens: int = 3) -> Entry:
    view = ConceptView(token_indices=torch.arange(tokens), scores=torch.rand(16), grid=(4, 4), k=tokens,
                       area_pct=10.0, keywords=("cat",), description="a cat")
    return Entry(Concept(name, torch.zeros(tokens, 8), "tiny", (view,)), THUMB)


def test_each_visitor_gets_an_independent_copy_of_the_default():
    default = Session()
    a, b = copy.deepcopy(default), copy.deepcopy(default)
    a.add([entry("Chelsea")], 5)
    assert a.names == ["Chelsea"] and b.names == [] and default.names == []
    assert a._lock is not b._lock


def test_names_are_unique_without_case_or_spacing():
    session = Session()
    session.add([entry("Chelsea")], 5)
    with pytest.raises(InputError, match="already have a concept named 'Chelsea'.*Remove it first.*another name"):
        session.add([entry(" chelsea ")], 5)
    with pytest.raises(InputError, match="more than once"):
        session.add([entry("Bo"), entry("BO")], 5)
    assert session.names == ["Chelsea"]


def test_the_concept_limit_is_all_or_nothing():
    session = Session()
    session.add([entry("a"), entry("b")], 3)
    with pytest.raises(InputError, match="at most 3 concepts.*room for 1 more"):
        session.add([entry("c"), entry("d")], 3)
    assert session.names == ["a", "b"]
    session.add([entry("c")], 3)
    assert len(session) == 3 and session.memory_tokens == 9


def test_remove_and_clear():
    session = Session()
    session.add([entry("a"), entry("b")], 5)
    with pytest.raises(InputError):
        session.remove("zzz")
    session.remove("A")
    assert session.names == ["b"]
    session.clear()
    assert session.names == [] and session.concepts == ()


def test_export_files_are_replaced_and_deleted_on_close():
    session = Session()
    first = session.new_export_path()
    first.write_bytes(b"x")
    second = session.new_export_path()
    assert not first.exists() and first.parent != second.parent
    second.write_bytes(b"x")
    session.add([entry("a")], 5)
    forget(session)
    assert not os.path.exists(second.parent) and session.names == []
    forget(None)  # a state that never held a Session
