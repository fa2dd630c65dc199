"""The library on torch.distributed (docs/design.md §12): every collective runs on the caller's own
process group (`torch.distributed`, any backend: gloo on CPU, nccl on GPU); nothing here starts
processes or opens connections of its own.

* group.py      the group a call runs on, and `agree`: every rank checks its arguments and learns
                whether every other rank accepted its own, before any work (one small all_gather),
                so a rank's bad input raises on every rank instead of leaving the others waiting.
* selection.py  exact Top-K and Random-k over parameters sharded across ranks: the radix
                histograms are all-reduced, never the scores; the result equals the single-process
                selection over the ranks' shards concatenated in rank order, bit for bit.
* ledger.py     one DeletionLedger per job: rank 0 writes, a request is decided once (rank 0's ids,
                broadcast), every rank applies the same result or none.
* history_methods.py  Mini-Unlearning and DeltaGrad with their gradients, Hessian-vector products and
                losses over sets of ids split across the ranks and summed in rank order; every rank
                ends with the same weights, the single-process answer up to float rounding.
* ddp.py        what UnlearningEngine.make_unlearnable needs for a DistributedDataParallel model in
                the user's loop: each rank's equal share of every batch, and which rank records.
* sharded_history.py  each rank records its shard of the parameters into its own store; a manifest
                (ranks, shard placements, step range, codecs) ties them; reading a step reassembles it.
* shard_local.py  the history methods on a sharded history without reassembling it: each rank
                serves dot / axpy / differences on its own shard's codes.
* pcmu.py       PCMU training, checks and fallback with each batch's per-sample gradients split
                across the ranks (a fixed slice each) and summed in rank order.

A rank that dies is noticed by the others through the process group's own timeout (the `timeout=`
of `torch.distributed.init_process_group`): their pending collective raises then.
"""
from .group import DistributedRefusal, agree
from .history_methods import DistributedDeltaGradUnlearner, DistributedMiniUnlearner
from .ledger import DistributedLedger
from .pcmu import DistributedPCMUTrainer, rank_slice
from .selection import histogram_bytes_per_pass, random_k, topk
from .shard_local import RankShardHistory
from .sharded_history import ShardedHistory, ShardedRecorder

__all__ = ["DistributedDeltaGradUnlearner", "DistributedLedger", "DistributedMiniUnlearner", "DistributedPCMUTrainer", "DistributedRefusal", "RankShardHistory", "ShardedHistory", "ShardedRecorder", "agree", "rank_slice", "histogram_bytes_per_pass", "random_k", "topk"]
