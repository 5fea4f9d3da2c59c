"""Interrupts: SIGINT and SIGTERM counted while installed, the old handlers back after; an ignored SIGINT stays ignored."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from runbook.engine.interrupts import Interrupts


@pytest.fixture
def default_handlers() -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_signals_are_counted_and_taken_once(default_handlers: None) -> None:
    interrupts = Interrupts()
    interrupts.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)    # no KeyboardInterrupt: counted instead
        os.kill(os.getpid(), signal.SIGTERM)   # and the process lives
        assert interrupts.take() == 2
        assert interrupts.take() == 0
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.take() == 1
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_sigint_stays_ignored(default_handlers: None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a background job's inherited disposition
    interrupts = Interrupts()
    interrupts.install()
    try:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.take() == 0
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
