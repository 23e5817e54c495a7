"""Bulk generation: a Parquet table of prompts -> images, manifest, errors (``generate``), with row
validation (``prompt_rows``) and the image-writing task (``images``)."""
