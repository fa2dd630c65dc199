"""The compressed training-history store (docs/design.md §5): codecs (codecs.py), the on-disk
format (file.py), the store (store.py) and the optimizer hook that fills it (recorder.py)."""
from .file import HistoryConflictError, HistoryCorruptError, HistoryFormatError, HistoryLockedError  # noqa: F401
from .recorder import HistoryRecorder, estimate_bytes  # noqa: F401
from .codecs import EncodedField  # noqa: F401
from .store import FieldSpec, HistoryStore, StoredStep  # noqa: F401
