"""The per-run HTML report: evaluation, data, neighbours and the model card of one DAG run,
built from the run's own stage folders with matplotlib and a Jinja2 template, self-contained
(plots and photos inlined) and written atomically into ``<run>/report/index.html`` by
:func:`pipelines.report.build.write_report`."""
