"""An append-mostly log of per-step records that knows which of its entries changed since its last
commit, so the deletion ledger writes only those (docs/design.md §10).

A method's history (PCMU's step records) grows with training and is rewritten only from a step on
(a resume replaces steps t0..). Serializing and hashing all of it per request would make every
request cost O(steps recorded). A `StepLog` is the one way such a history is changed — `append`,
`truncate`, `replace` — and each of them moves `dirty_from` (the first entry that may differ from
the committed log) down as needed, so no change can go unnoticed:

    log.dirty_from      # entries before it are the committed ones, unchanged
    log.mark_clean(ledger)  # `ledger` committed the log as it is now
    log.restore_clean()     # undo every change since then (the ledger's rollback)

The marks belong to the last committer (`marked_by`): another ledger over the same unlearner finds
the marks not its own and writes the whole log, so two ledgers cannot hide changes from each other.

Entries are treated as immutable values (the log never looks inside them; PCMU's records are frozen
dataclasses). Undo keeps the displaced entries only: a rollback costs what the request changed.
"""
from __future__ import annotations


class StepLog:
    def __init__(self, entries=()):
        self._entries = list(entries)
        self._clean_len = 0          # length at the last mark_clean
        self._dirty_from = 0         # lowest index changed since then
        self._displaced: dict = {}   # committed entries (index < _clean_len) a truncation removed
        self.marked_by = None        # who called mark_clean last

    # ---- reading ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._entries[i]  # a copy: changing it cannot change the log
        return self._entries[i]

    def __iter__(self):
        return iter(self._entries)

    # ---- the only ways to change it --------------------------------------------------------------

    def append(self, entry) -> None:
        self._entries.append(entry)

    def truncate(self, length: int) -> None:
        """Drops entries length.. (kept aside until the next mark_clean, for restore_clean)."""
        length = max(int(length), 0)
        for i in range(length, min(len(self._entries), self._clean_len)):
            self._displaced.setdefault(i, self._entries[i])
        del self._entries[length:]
        self._dirty_from = min(self._dirty_from, length)

    def replace(self, entries) -> None:
        self.truncate(0)
        self._entries.extend(entries)

    # ---- commit and rollback -------------------------------------------------------------------------

    @property
    def dirty_from(self) -> int:
        """First index whose entry may differ from the committed log (len(self) when none does)."""
        return min(self._dirty_from, self._clean_len, len(self._entries))

    @property
    def dirty(self) -> bool:
        return self.dirty_from < self._clean_len or len(self._entries) != self._clean_len

    def mark_clean(self, by=None) -> None:
        self._clean_len = self._dirty_from = len(self._entries)
        self._displaced = {}
        self.marked_by = by

    def restore_clean(self) -> None:
        """Back to the entries of the last mark_clean."""
        start = self.dirty_from
        # Every committed entry at or after dirty_from was set aside by the truncation that moved it.
        committed = [self._displaced[i] for i in range(start, self._clean_len)]
        del self._entries[start:]
        self._entries.extend(committed)
        self.mark_clean(self.marked_by)
