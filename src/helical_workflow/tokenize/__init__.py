"""Geneformer tokenization: counts -> rank-value tokens, streamed from a backed ``.h5ad``.

One idea per module:

* :mod:`.rank`: the rank-value encoding (:class:`RankValueTokenizer`), token-identical to
  helical's ``TranscriptomeTokenizer`` (its docstring lists the semantics copied and the
  documented differences), gene mapping and coverage; :mod:`._kernel` its compiled loops;
* :mod:`.read`: reading the ``.h5ad``: gene names, the ``filter_pass`` rule, size factors,
  labels, chunks of counts;
* :mod:`.write`: Arrow shards (Hugging Face ``datasets`` format) written as the rows stream
  by, and opened again (:func:`load_tokenized`, :func:`read_labels`, :func:`split_subset`);
* :mod:`.stage`: the tokenize stage of a run (:func:`tokenize_stage`; ``streaming`` or
  helical's own tokenizer, the reference) and the command line's :func:`tokenize_h5ad`.

Importing this package loads neither numba nor ``datasets``: they load on first use.
"""

from .rank import GenePlan, RankValueTokenizer, TokenizeError, gene_coverage, map_genes
from .stage import label_mapping, length_summary, tokenize_h5ad, tokenize_stage
from .write import (
    LABELS_FILE,
    OUTPUT,
    TokenizeResult,
    load_tokenized,
    read_labels,
    split_subset,
    tokenize_rows,
)

__all__ = [
    "GenePlan",
    "LABELS_FILE",
    "OUTPUT",
    "RankValueTokenizer",
    "TokenizeError",
    "TokenizeResult",
    "gene_coverage",
    "label_mapping",
    "length_summary",
    "load_tokenized",
    "map_genes",
    "read_labels",
    "split_subset",
    "tokenize_h5ad",
    "tokenize_rows",
    "tokenize_stage",
]
