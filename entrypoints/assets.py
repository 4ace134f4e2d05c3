"""Names shared by the DAGs (kept free of heavy imports: DAG files import this at parse time)."""

PREDICTIONS_URI = "prodcat://predictions"
"""Updated by the categorisation DAG's ``predict`` task; its events carry ``predict_dir`` and
``preprocess_dir``. The visual-similarity DAG is scheduled on it."""
