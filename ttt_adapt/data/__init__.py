"""The training data: text corpora (`text`: load, tokenise, pack; the recipe's `data` section), conversations
(`chat`: rendered with the chat template, labels on assistant turns), several sources mixed by weight (`mix`: what
training calls) and the synthetic long-range corpus of the offline default (`corpus`).

`from ttt_adapt.data import DataConfig, pack_documents, ...` gives `text`'s names."""

from ttt_adapt.data.text import (
    BUILDERS,
    COMPRESSIONS,
    FORMATS,
    IGNORE_INDEX,
    ON_BAD_ROW,
    ROW_FEATURES,
    STREAMING_SHUFFLE_BUFFER,
    DataConfig,
    DataSource,
    build_datasets,
    load_documents,
    pack_documents,
    tokenize_corpus,
)

__all__ = ["BUILDERS", "COMPRESSIONS", "FORMATS", "IGNORE_INDEX", "ON_BAD_ROW", "ROW_FEATURES", "STREAMING_SHUFFLE_BUFFER",
           "DataConfig", "DataSource", "build_datasets", "load_documents", "pack_documents", "tokenize_corpus"]
