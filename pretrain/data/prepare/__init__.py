"""`pretrain data prepare`, the offline side of the data: raw text -> token shards.

- `pipeline`: the preparation itself (`prepare`): the orchestration of the modules below, the
  output folder's lease, the manifest and the closing summary;
- `worker`: the process pool that reads and tokenizes work units (splits, long documents, spill files);
- `writer`: the shard writer: documents appended to each split's shards, committed, then published;
- `state`: the resume state (`.prepare/state.json`) and where a preparation starts from;
- `inputs`: local corpus files, cut into work units and read document by document;
- `hub`: inputs straight from the Hugging Face Hub (`hf://...`), fetched into a cache;
- `units`: the work units of local and Hub inputs in one order;
- `settings`: the preparation settings that decide a dataset's bytes;
- `train_tokenizer`: a byte-level BPE trained on raw inputs (`pretrain data train-tokenizer`).

What it writes is read by the reading path in `pretrain.data` (`shards`, `tokens`, `loader`).
"""
