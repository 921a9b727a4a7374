"""Cancel requests, answered key by key: a client's ``cancel()`` is True only if the task
will never start.

The broker answers what it holds itself: a queued task is dropped and answered
"cancelled"; one that started (a STARTED notice came), finished, or is wanted by another
client too is answered "kept" (it runs on).  A task out on an agent is the agent's to
answer: ``Cancels`` remembers who asked (``asking``), and the first of these settles it:

- DROPPED from the agent: it never started there -> cancelled (the asking client's
  interest goes; a task another client came to want meanwhile is queued again);
- KEPT (its task process had started it), RESULT or DEATH -> kept;
- the agent is lost -> kept (it may have started; it is queued again and still wanted).
"""
from __future__ import annotations

from typing import Dict, Iterable

from .outbox import Outbox
from .records import DEPENDENTS_PIN, DONE, Entry
from .table import KeyTable


class Cancels:
    """Who waits for an agent's answer to a cancel, by key."""

    def __init__(self, table: KeyTable, outbox: Outbox) -> None:
        self.table = table
        self.outbox = outbox
        self.asking: Dict[str, bytes] = {}  # key -> the client that asked

    def request(self, client: bytes, kw: str) -> None:
        """One key of a client's CANCEL: answer it, or ask the agent that holds it."""
        entry = self.table.get(kw)
        answer = self.outbox.answer
        if entry is None or client not in entry.interests or entry.state in DONE:
            answer(client, kw, False)  # done, or not this client's: nothing to cancel
        elif entry.state == "wanted":  # an attach with no task yet: nothing will run
            self.table.unwant(client, entry)
            answer(client, kw, True)
        elif any(i != client and i != DEPENDENTS_PIN for i in entry.interests) or (
                DEPENDENTS_PIN in entry.interests and entry.state not in ("queued", "waiting")):
            answer(client, kw, False)  # another client wants it (or a started dependent)
        elif DEPENDENTS_PIN in entry.interests:  # tasks wait for it: they are cancelled too
            self.table.unwant(client, entry)
            self.table.deps.cancel_dependents(entry)  # (their end unpins it: it goes)
            answer(client, kw, True)
        elif entry.state in ("queued", "waiting"):  # (waiting: for its dependencies)
            self.table.unwant(client, entry)
            self.table.cancel(entry)
            answer(client, kw, True)
        elif entry.state == "dispatched" and entry.agent is not None:
            if kw not in self.asking:  # (a second request waits for the same answer)
                self.asking[kw] = client
                self.outbox.cancel(entry.agent, kw)
        else:  # running: it started
            answer(client, kw, False)

    def dropped(self, entry: Entry) -> bool:
        """The agent gave ``entry`` back unstarted: if a client asked to cancel it, it is
        cancelled for that client (True: the caller forgets or requeues it)."""
        client = self.asking.pop(entry.kw, None)
        if client is None:
            return False
        self.table.unwant(client, entry)
        self.outbox.answer(client, entry.kw, True)
        return True

    def kept(self, kws: Iterable[str]) -> None:
        """These keys started (or ended) on their agent: their cancels say False."""
        asking = self.asking
        for kw in kws:
            client = asking.pop(kw, None)
            if client is not None:
                self.outbox.answer(client, kw, False)

    def forget_client(self, client: bytes) -> None:
        for kw in [kw for kw, ident in self.asking.items() if ident == client]:
            del self.asking[kw]
