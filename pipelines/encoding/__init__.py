"""Latent datasets: a Parquet table of images -> latent shards (``encode``), with the input rows
(``encode_rows``, ``image_decode``), the latents parts (``latent_output``) and the training reader
(``latent_dataset``, re-exported as ``pipelines.LatentDataset``)."""
