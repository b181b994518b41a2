"""Streaming a huge sharded manifest (HowTo100M: 136M rows) without a global shuffle.

Each training worker reads its own share of the manifest's Parquet shards, one Ray Data
stream per shard (decode actors on any CPU node), its rows shuffled before decoding
(`data.shuffle_rows`) and/or mixed by a local buffer of decoded clips (`data.shuffle_buffer`).
A pass visits every shard once, in an order seeded by the pass number, dealt round-robin to the
workers. The checkpoint records the shards consumed in the current pass, and the row ids
trained so far of each shard opened and not yet consumed, so after a restart the remaining
shards are dealt again, consumed ones are never read a second time, and a shard read partly is
read for its other rows only. (Counting whole shards alone, a restart trained again every row
of the open shards: at HowTo100M's 250,000-row shards and a checkpoint every 2,000 steps of
16 clips a worker, the first 7 checkpoints of each shard recorded nothing, and a restart gave
up to ~15,600 steps a worker to clips already trained.) A pass ends for everyone as soon as
one worker runs out (workers step in lock-step).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import torch.distributed as dist

from clipray.config import DataConfig
from clipray.manifest import manifest_files


class ShardStream:
    def __init__(self, data: DataConfig, skip_dir: str, batch_size: int, rank: int, world: int,
                 seed: int, state: dict[str, Any]):
        self.data, self.skip_dir, self.batch_size = data, skip_dir, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.state = state  # "pass", "consumed", "trained", "reads" live in the checkpointed state
        state.setdefault("pass", 0)
        state.setdefault("consumed", [])
        state.setdefault("trained", {})  # shard -> row ids trained of a shard not consumed yet
        state.setdefault("reads", [])
        self.files = manifest_files(data.manifest)[1]
        self.done: list[str] = []  # consumed by this rank since the last checkpoint
        self.opened: list[str] = []
        self.given: dict[str, list[int]] = {}  # row ids handed out since the last checkpoint, by shard
        self._it: Optional[Iterator[Any]] = None
        # The training loop adds one to `steps` per step it takes on this pass's batches (the
        # same count on every rank: they step in lock-step). Two passes in a row without a step
        # mean the shards give nothing, now or from some point of the run on (a store that
        # stopped answering): one alone may be the rest of a pass a resume took up.
        self.steps, self.empty_passes = 0, 0
        self.clips = 0  # clips this rank's shards gave in this pass (decoded, not skipped)

    def my_shards(self) -> list[str]:
        order = list(self.files)
        random.Random(self.seed + self.state["pass"]).shuffle(order)
        consumed = set(self.state["consumed"])
        return [f for f in order if f not in consumed][self.rank::self.world]

    def _batches(self) -> Iterator[Any]:
        import torch

        from clipray.pipeline import clip_dataset

        # A shard's rows rarely fill whole batches: its short last batch waits in `left` for
        # the next shards' short ones, so no row is dropped at a shard's end (and shards
        # smaller than a batch still train). `owed`: the shards with rows in `left`, in order.
        left: list[dict[str, Any]] = []
        owed: list[str] = []
        for f in self.my_shards():
            self.opened.append(f)
            # rows in an order seeded by the pass and the shard (the blocks of it may arrive in
            # another order run to run, so a restart goes by the row ids trained, not a count)
            ds = clip_dataset(self.data, self.skip_dir, split="train", files=[f], shuffle=self.data.shuffle_rows,
                              seed=(self.seed * 1_000_003 + self.state["pass"] * 8191 + self.files.index(f)) % 2**32,
                              exclude=self.state["trained"].get(f))
            it = iter(ds.iter_torch_batches(
                batch_size=self.batch_size, drop_last=False,
                local_shuffle_buffer_size=self.data.shuffle_buffer or None,
                local_shuffle_seed=self.seed + self.state["pass"] if self.data.shuffle_buffer else None))
            nxt = next(it, None)
            if nxt is None:  # nothing decodable in it: consumed all the same
                self.done.append(f)
            while nxt is not None:
                # one batch of look-ahead: a shard counts as consumed when its last rows are
                # handed out, not one step later, so a checkpoint right after it records it
                self.clips += len(nxt["row_id"])
                cur, nxt = nxt, next(it, None)
                if len(cur["row_id"]) < self.batch_size:  # the shard's short last batch
                    left.append(cur)
                    owed.append(f)
                    if sum(len(b["row_id"]) for b in left) < self.batch_size:
                        continue
                    # handed out now: every waiting row but those over a batch, this shard's last ones
                    over = sum(len(b["row_id"]) for b in left) - self.batch_size
                    for g, b in zip(owed, left):
                        ids = b["row_id"].tolist()
                        self.given.setdefault(g, []).extend(ids[:len(ids) - over] if g == f else ids)
                    rows = {k: torch.cat([b[k] for b in left]) for k in cur}
                    cur = {k: v[:self.batch_size] for k, v in rows.items()}
                    rest = {k: v[self.batch_size:] for k, v in rows.items()}
                    # only this shard's rows can be over: the earlier ones summed to less
                    left = [rest] if len(rest["row_id"]) else []
                    self.done += owed if not left else owed[:-1]
                    owed = owed[-1:] if left else []
                else:
                    self.given.setdefault(f, []).extend(cur["row_id"].tolist())
                    if nxt is None:
                        self.done.append(f)
                yield cur

    def next(self) -> Optional[Any]:
        """The next batch of this rank's pass, or None when its shards are used up."""
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def new_pass(self) -> None:
        """Start the next pass, once one rank ran out of shards; raises after two passes in a
        row that gave no step."""
        self.empty_passes = 0 if self.steps else self.empty_passes + 1
        if self.empty_passes > 1:
            # a pass's short last batch waits for rows that never come: a worker whose shards
            # hold fewer clips than a batch never has one, and all step together or none does
            b = self.batch_size
            why = ("they hold no train row, or every clip was skipped (see the skip report)" if not self.clips
                   else f"the shards of worker {self.rank} gave {self.clips} train clips, fewer than "
                        f"data.batch_size={b}: lower data.batch_size or train.num_workers" if self.clips < b
                   else f"another worker's shards gave fewer train clips than data.batch_size={b} (those of "
                        f"worker {self.rank} gave a batch): lower data.batch_size or train.num_workers, or see "
                        "the skip report")
            raise RuntimeError(f"a whole pass over the shards gave no batch: {why}")
        self.steps, self.clips = 0, 0
        self.state["pass"] += 1
        self.state["consumed"], self.state["trained"], self.done, self.given, self._it = [], {}, [], {}, None

    def sync(self) -> None:
        """Before a checkpoint: every rank learns every shard consumed and opened so far, and the
        rows trained of each shard opened but not consumed (a consumed shard's are dropped)."""
        mine = (self.done, self.opened, self.given)
        parts = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        trained = self.state["trained"]
        for done, opened, given in parts:
            self.state["consumed"] += [f for f in done if f not in self.state["consumed"]]
            self.state["reads"] += opened
            for f, ids in given.items():
                trained.setdefault(f, []).extend(ids)
        for f in self.state["consumed"]:
            trained.pop(f, None)
        self.done, self.opened, self.given = [], [], {}
