"""Where bytes live: fsspec URLs, atomic writes, Parquet tables, WebDataset shards."""
