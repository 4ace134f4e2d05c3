"""Entry points: the prodcat CLI, Airflow task functions and their registry, the Airflow plugin."""
