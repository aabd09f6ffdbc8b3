"""Reading a store: columns, rows, chunked iteration and the embeddings as an array-like.

The methods of :class:`StoreReader` are part of :class:`~galaxalign_batch.store.EmbeddingStore`
(docs/store.md, "Reading a store"). Everything here reads through
:meth:`EmbeddingStore.read` / :meth:`EmbeddingStore.read_embeddings`, so only committed rows are
seen and a missing chunk, a codec error or a damaged embedding row raises a one-line
:class:`~galaxalign_batch.store.StoreCorruptError` instead of returning fill values.

Callers outside ``galaxalign_batch.store`` use this API and never the Zarr group itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from galaxalign_batch.preprocess import CutoutSpec
    from galaxalign_batch.store.cutouts import TileOpener
    from galaxalign_batch.store.embedding_store import EmbeddingStore

__all__ = ["StoreReader", "EmbeddingView", "REQUIRED_ARRAYS"]

log = logging.getLogger(__name__)

#: The arrays a store must have, at least ``rows_committed`` long, to be read (:func:`open_readable`).
REQUIRED_ARRAYS = ("embedding", "object_id", "ra", "dec")


class EmbeddingView:
    """The committed rows of a store's embeddings as a read-only array-like.

    ``shape`` is ``(rows_committed, D)`` and ``dtype`` the stored one; slicing rows (``view[a:b]``)
    reads them with :meth:`EmbeddingStore.read_embeddings`. The arrays of an unfinished run are
    longer than ``rows_committed``: the view hides the tail, so consumers such as
    :func:`galaxalign_batch.ops.similarity_topk` and faiss never see uncommitted rows, and a missing
    chunk or a row that is not unit-norm (zeros read from a lost chunk) raises a one-line
    :class:`~galaxalign_batch.store.StoreCorruptError` instead of being used.

    Parameters
    ----------
    store : EmbeddingStore
        The store to view.

    Examples
    --------
    >>> view = store.embeddings                     # doctest: +SKIP
    >>> view.shape, view.dtype                      # doctest: +SKIP
    ((22, 8), dtype('float16'))
    >>> first = view[0:4]                           # doctest: +SKIP
    """

    def __init__(self, store: "EmbeddingStore"):
        self.store = store
        array = store.group["embedding"]
        self.shape = (int(store.n_rows),) + tuple(array.shape[1:])
        self.dtype = array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.store.read_embeddings(key)
        raise TypeError("EmbeddingView supports row slices only")


class StoreReader:
    """The read API of :class:`~galaxalign_batch.store.EmbeddingStore` (mixed into that class).

    It needs ``group``, ``path``, ``n_rows``, ``attrs``, :meth:`read` and :meth:`read_embeddings`
    from the class it is mixed into.
    """

    # ---- what the store holds ----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        """Whether the store has an array or group ``name`` (a path such as ``fewshot/spiral/probs``)."""
        return name in self.group

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the row arrays at the store's root, sorted.

        The ``embed`` columns (``embedding``, ``object_id``, ``ra``, ...) and those of derived results
        written at the root (``probs``, ``label``, ``confidence`` of ``classify``); results in
        sub-groups are read by path (``fewshot/NAME/probs``), see :meth:`__contains__`.
        """
        names = []
        for name in self.group.array_keys():
            dims = getattr(self.group[name].metadata, "dimension_names", None) or ()
            if dims and dims[0] == "row":
                names.append(name)
        return tuple(sorted(names))

    @property
    def chunking(self) -> tuple[int, int]:
        """``(rows per chunk, rows per shard file)`` of the row arrays (those of ``embedding``).

        Reads of whole shards (or of whole chunks) touch each file once; :meth:`iter_chunks` uses them.
        """
        emb = self.group["embedding"]
        chunk = int(emb.chunks[0])
        shard = int(emb.shards[0]) if getattr(emb, "shards", None) else chunk
        return chunk, shard

    @property
    def embeddings(self) -> EmbeddingView:
        """The committed embeddings as a read-only, checked array-like (:class:`EmbeddingView`)."""
        return EmbeddingView(self)

    # ---- rows ----------------------------------------------------------------------------------------------
    def read_columns(self, names: Sequence[str], rows: slice | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Committed rows of several columns.

        Parameters
        ----------
        names : sequence of str
            Array names or paths (``"ra"``, ``"label"``, ``"fewshot/spiral/probs"``).
        rows : slice, array of int, or None
            The rows: all committed rows (None), a slice, or integer indices.

        Returns
        -------
        dict of str to numpy.ndarray
            One array per name, in the order given. ``embedding`` is checked (finite, unit-norm,
            :meth:`read_embeddings`); string columns are numpy string arrays as zarr returns them.

        Raises
        ------
        StoreCorruptError
            A missing chunk file, a codec error or a damaged embedding row.
        IndexError
            An integer row index outside the committed rows.

        Examples
        --------
        >>> cols = store.read_columns(["ra", "dec"], slice(0, 100))      # doctest: +SKIP
        >>> cols["ra"].shape                                             # doctest: +SKIP
        (100,)
        """
        return {name: (self.read_embeddings(rows) if name == "embedding" else self.read(name, rows))
                for name in names}

    def iter_chunks(self, names: Sequence[str], *, step: int | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Committed rows ``[start, stop)`` of some columns, in consecutive batches of whole chunks.

        Parameters
        ----------
        names : sequence of str
            Array names or paths, as for :meth:`read_columns`.
        step : int, optional
            Rows per batch, rounded down to whole chunks (at least one chunk). Default: one shard
            file (every file is read once).
        start, stop : int
            The rows to read (default: all committed rows).

        Yields
        ------
        (int, dict of str to numpy.ndarray)
            The first row of the batch and its columns (as :meth:`read_columns`).

        Examples
        --------
        >>> n_masked = 0                                                            # doctest: +SKIP
        >>> for first, cols in store.iter_chunks(["masked_fraction"]):              # doctest: +SKIP
        ...     n_masked += int((cols["masked_fraction"] > 0).sum())
        """
        chunk, shard = self.chunking
        step = max(chunk, int(step or shard) // chunk * chunk)
        stop = self.n_rows if stop is None else min(int(stop), self.n_rows)
        for a in range(max(0, int(start)), stop, step):
            yield a, self.read_columns(names, slice(a, min(a + step, stop)))

    # ---- pictures --------------------------------------------------------------------------------------------
    @property
    def cutout_spec(self) -> "CutoutSpec":
        """The :class:`~galaxalign_batch.preprocess.CutoutSpec` the store was embedded with."""
        from galaxalign_batch.store.cutouts import store_spec

        return store_spec(self)

    def tile_opener(self, roots: Sequence[str] | None = None, keep: int = 2) -> "TileOpener":
        """A :class:`~galaxalign_batch.store.cutouts.TileOpener` for this store's recorded tiles.

        Bricks are looked for in ``roots``, then the store's ``survey_roots`` attribute, then the
        default simulated survey (:func:`~galaxalign_batch.store.cutouts.survey_roots`); ``keep``
        tiles stay open.
        """
        from galaxalign_batch.store.cutouts import TileOpener, survey_roots

        return TileOpener(survey_roots(self, roots), keep=keep)

    def cutouts(self, rows, spec: "CutoutSpec | None" = None, *, roots: Sequence[str] | None = None,
                opener: "TileOpener | None" = None, strict: bool = False) -> dict[int, np.ndarray | None]:
        """Cutouts ``(3, S, S)`` of store rows, re-made from their recorded tiles.

        The store keeps no pixels: each row's ``tile``, ``x`` and ``y`` and the store's
        ``cutout_spec`` give back the cutout the model saw
        (:func:`~galaxalign_batch.store.cutouts.cutouts_for_rows`).

        Parameters
        ----------
        rows : iterable of int
            Store rows.
        spec : CutoutSpec, optional
            Another cutout specification (default: the store's).
        roots : sequence of str, optional
            Survey roots to look for bricks in (before the store's own).
        opener : TileOpener, optional
            An opener to reuse between calls (it keeps recent tiles open).
        strict : bool
            Raise the :class:`~galaxalign_batch.errors.TileError` of a missing or unreadable tile
            instead of returning None for its rows.

        Returns
        -------
        dict of int to numpy.ndarray or None
            By row: the cutout, or None where its tile cannot be read.
        """
        from galaxalign_batch.store.cutouts import cutouts_for_rows

        return cutouts_for_rows(self, rows, spec, roots=roots, opener=opener, strict=strict)
