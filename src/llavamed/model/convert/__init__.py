"""Converters from foreign checkpoint layouts to the transformers-native format, one file per
source format. Every mapping is strict: each source key is used and each target key is filled,
or the conversion fails naming the keys."""
