"""Data stages: the demo digits, ImageNet-style folders -> webdataset shards, and shard reading."""
