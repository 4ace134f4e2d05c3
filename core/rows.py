"""Reading the clean rows a preprocessing run kept (Parquet), for training, evaluation, prediction and reports."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence

from core import storage

# the clean rows' column of the rule labels with their ancestors; the documents' field they come from is
# the config's labels.rule_field. Clean rows are prodcat's own schema, so their readers need no config.
RULE_CATEGORIES = "rule_categories"
# the clean rows' column of the human labels with their ancestors (documents' field: labels.human_field);
# where a product has human labels they replace its rule labels as training labels and kept decisions
HUMAN_CATEGORIES = "human_categories"


def read_clean_rows(
    preprocess_dir: str, columns: Optional[Sequence[str]] = None, batch_size: int = 2048, split: Optional[str] = None
) -> Iterator[Dict[str, Any]]:
    """Streams the clean rows of a finished preprocessing stage (those of ``split`` only, if given),
    row group by row group."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    storage.require_complete(preprocess_dir)
    for path in storage.list_files(storage.join(preprocess_dir, "clean"), "*.parquet"):
        with storage.open_read(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                # filtered before to_pylist: other splits' embeddings never become Python lists
                yield from (batch if split is None else batch.filter(pc.equal(batch.column("split"), split))).to_pylist()
