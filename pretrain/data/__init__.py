"""Reading the token shards that data_prep writes: the training loader (loader) and the reader plan (readers)."""
