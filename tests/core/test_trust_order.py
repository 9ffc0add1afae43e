"""Command order comes from the operators' counter in the fleet journal, not from a clock, and a device refuses
replayed and reordered commands across restarts (docs/protocol.md, "Command order")."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from edgepack import errors
from edgepack.agent.link.book import CommandBook
from edgepack.fleet import commands
from edgepack.fleet.journal import Journal
from edgepack.protocol import CommandTarget, RollbackCommand, new_command_fields, sign_command


def test_journal_counter_orders_operators_whatever_their_clocks(tmp_path, monkeypatch):
    path = tmp_path / "fleet.sqlite"
    first, second = Journal(path), Journal(path)  # two operators on one journal
    start = first.next_command_seq()
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 10**18)  # one operator's clock far ahead ...
    ahead = second.next_command_seq()
    monkeypatch.setattr(time, "time_ns", lambda: real() - 10**15)  # ... the other's far behind
    behind = first.next_command_seq()
    assert (ahead, behind) == (start + 1, start + 2)  # the counter, not the clock
    taken: list[int] = []
    workers = [threading.Thread(target=lambda j=j: taken.extend(j.next_command_seq() for _ in range(10)))
               for j in (Journal(path), Journal(path))]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(taken) == list(range(start + 3, start + 23))  # unique, gap-free across connections
    first.close()
    second.close()


def _rollback(seq: int, key) -> object:
    fields = {**new_command_fields(CommandTarget(device="d1")), "seq": seq}
    return sign_command(RollbackCommand(**fields, action="rollback", model="digits"), [key])


def test_replayed_and_reordered_commands_are_refused_across_a_restart(tmp_path, keyring):
    journal = Journal(tmp_path / "fleet.sqlite")
    key = keyring.keys["release"]
    older, newer = (commands.rollback("digits", "d1", [key], timedelta(hours=1), journal.next_command_seq())
                    for _ in range(2))  # fmt: skip
    book = CommandBook(tmp_path / "commands.json")
    assert book.check(newer, retained=False)
    book.accept(newer)
    book.finish(newer.command.id, "rolled_back")
    # the device restarts: a new book from the same file keeps what it accepted
    book = CommandBook(tmp_path / "commands.json")
    with pytest.raises(errors.StaleCommandError, match=f"sequence {older.command.seq}, not newer"):
        book.check(older, retained=False)  # reordered: issued before the accepted one, delivered after it
    with pytest.raises(errors.ReplayedCommandError, match="replayed command"):
        book.check(newer, retained=False)  # replayed live
    assert book.check(newer, retained=True) is False  # the retained copy coming back on resubscribe: quiet
    assert book.check(_rollback(newer.command.seq + 1, key), retained=False)  # the next one from the counter
