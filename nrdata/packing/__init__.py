"""nrdata.packing: pack variable-length items (images as latent tokens) into fixed-budget packs.

Pipeline (all functions take and return plain numpy arrays / pyarrow tables, and never print):

1. ``lengths`` (int tokens per row, computed by the caller) -> :func:`length_histogram`
2. histogram -> :class:`Strategy` with :func:`lpfhp` (default), :func:`spfhp` or :func:`bfd`
   (numba, cost independent of the number of rows)
3. strategy -> :class:`Packing` for ``(seed, epoch)`` with :func:`assign_rows` (O(N), seeded);
   :func:`pack` / :func:`pack_epochs` do 1-3 in one call
4. :func:`assign_ranks` / :func:`balance_ranks` -> :class:`RankAssignment` (steps x ranks)
5. :func:`packs_table` -> :func:`write_packs` / :func:`read_packs` (Parquet),
   :func:`write_nit_sampler_meta` (NiT JSON), :func:`packing_report` / :func:`plot_packing`.
"""

from nrdata.packing.assign import Packing, assign_rows, epoch_state, pack, pack_epochs, plan
from nrdata.packing.histogram import length_histogram
from nrdata.packing.nit_export import nit_sampler_meta_name, write_nit_sampler_meta
from nrdata.packing.packs_file import (
    epoch_row_ids,
    packs_info,
    packs_table,
    read_packs,
    write_packs,
)
from nrdata.packing.ranks import RankAssignment, assign_ranks, balance_ranks
from nrdata.packing.report import PackingReport, packing_report, plot_packing
from nrdata.packing.strategies import ALGORITHMS, Strategy, bfd, histogram_pack, lpfhp, spfhp

__all__ = [
    "ALGORITHMS",
    "Packing",
    "PackingReport",
    "RankAssignment",
    "Strategy",
    "assign_ranks",
    "assign_rows",
    "balance_ranks",
    "bfd",
    "epoch_row_ids",
    "epoch_state",
    "histogram_pack",
    "length_histogram",
    "lpfhp",
    "nit_sampler_meta_name",
    "pack",
    "pack_epochs",
    "packing_report",
    "packs_info",
    "packs_table",
    "plan",
    "plot_packing",
    "read_packs",
    "spfhp",
    "write_nit_sampler_meta",
    "write_packs",
]
