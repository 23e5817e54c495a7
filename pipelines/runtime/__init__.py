"""What generation and encoding share: one module each for fsspec I/O (``io``), Parquet schemas
(``schemas``), configuration (``config``), the output and commit protocol (``outputs``), stages
(``stages``) and their placement (``placement``), exact statistics (``stats``), progress, the run
record, the model source, and the ids and seeds of input rows (``row_ids``)."""
