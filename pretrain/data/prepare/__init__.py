"""`pretrain data prepare`, the offline side of the data: raw text -> token shards.

- `pipeline`: the preparation itself (`prepare`): work units tokenized by a process pool, the
  shard writer and publishing, resume state, orchestration; it is kept one module for now;
- `inputs`: local corpus files, cut into work units and read document by document;
- `hub`: inputs straight from the Hugging Face Hub (`hf://...`), fetched into a cache;
- `units`: the work units of local and Hub inputs in one order;
- `settings`: the preparation settings that decide a dataset's bytes;
- `train_tokenizer`: a byte-level BPE trained on raw inputs (`pretrain data train-tokenizer`).

What it writes is read by the reading path in `pretrain.data` (`shards`, `tokens`, `loader`).
"""
