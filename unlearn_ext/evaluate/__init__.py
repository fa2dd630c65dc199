"""The evaluation harness (docs/design.md §8): datasets, models, the methods by name, the harness
that runs them against retraining, and the report (table, report.md, plots)."""
from .datasets import Dataset, DatasetError, load  # noqa: F401
from .harness import RECORD_FIELDS, evaluate, summarize  # noqa: F401
