"""ray_dpo.feeder: serves training steps (with reference log-probs) to the policy workers.

One threaded Ray actor on the driver's node (``start_feeder``). It loads the tokenized
pairs once into compact numpy storage and answers, for any optimizer step and rank, the
micro-batches that rank trains on. Reference log-probs come from a cache dict when given,
otherwise from a ReferenceGroup, scored by a background thread a few steps ahead of the
slowest rank, so training does not wait for the reference when the group keeps up.

Step layout (deterministic, so resuming = asking from the checkpoint's step):

    G   = num_workers * micro_batch_size * gradient_accumulation_steps   (global batch)
    spe = ceil(N / G)                                                     (steps per epoch)
    step s is epoch e = s // spe, covering order_e[(s % spe) * G : (s % spe + 1) * G]
    order_e = seeded permutation (seed, e) when shuffle, else file order

The last step of an epoch may be partial: no pair is ever dropped. A step's n rows go
round-robin: row j to rank j % W, then to micro-batch (j // W) % gas, so micro-batch
sizes differ by at most one and trailing micro-batches may be EMPTY (every rank still
gets exactly gradient_accumulation_steps micro-batches, so collectives stay in step).

An elastic run (policy.min_workers) that lost ranks trains on w < W of them: the steps
and their pairs stay the same (G does not change); row j goes to rank j % w and each rank
gets gas' = ceil(W * gas / w) micro-batches (BatchPlan.accumulation), so a micro-batch
still holds at most micro_batch_size pairs and the step's update is the same.

Modules (import the names from ray_dpo.feeder):

    plan.py           BatchPlan (the step layout above), Prefetch (how far ahead to score)
    store.py          PairStore: the tokenized pairs in compact numpy storage
    batch_feeder.py   BatchFeeder (steps and eval batches per rank), FeederError, REF_COLUMNS,
                      Gate (holds a feeder's prefetch until another's is done)
    actor.py          start_feeder (BatchFeeder as a Ray actor), KeepsInitError
"""

from ray_dpo.feeder.actor import KeepsInitError, start_feeder
from ray_dpo.feeder.batch_feeder import REF_COLUMNS, BatchFeeder, FeederError, Gate
from ray_dpo.feeder.plan import BatchPlan, Prefetch
from ray_dpo.feeder.store import PairStore

__all__ = ["REF_COLUMNS", "BatchFeeder", "BatchPlan", "FeederError", "Gate", "KeepsInitError", "PairStore",
           "Prefetch", "start_feeder"]
