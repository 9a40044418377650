"""The training data stream: a seeded, weighted mixture of recipe sources, packed into micro-batches, with an
exact ``state_dict`` for resume and counted skips of bad samples."""

from __future__ import annotations

import logging
import random
from collections import defaultdict

from unified_mllm.config.recipe import RecipeConfig
from unified_mllm.config.stage import DataConfig
from unified_mllm.data.image_features import ImageFeatures
from unified_mllm.data.packing import collate
from unified_mllm.data.samples import BadSample, SampleBuilder
from unified_mllm.data.sources import read_source

log = logging.getLogger(__name__)


class DataStream:
    def __init__(self, data_cfg: DataConfig, recipe: RecipeConfig, builder: SampleBuilder, features: ImageFeatures,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 task_ratio: dict[str, float] | None = None, recipe_path: str = "recipe"):
        self.cfg, self.builder, self.features = data_cfg, builder, features
        self.micro_batch_size, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.sources = {s.name: s for s in recipe.sources}
        self.records = {s.name: list(read_source(s, recipe_path)) for s in recipe.sources}
        for name, recs in self.records.items():
            if not recs:
                raise ValueError(f"{recipe_path}: source {name!r} has no records")
        by_task: dict[str, float] = defaultdict(float)
        for s in recipe.sources:
            by_task[s.task] += s.weight
        self.task_weights = {t: w for t, w in (task_ratio or by_task).items() if w > 0 and t in by_task}
        if not self.task_weights:
            raise ValueError(f"optim.task_ratio: none of {sorted(task_ratio or {})} is a task of {recipe_path} "
                             f"(tasks: {sorted(by_task)})")
        self.rng = random.Random(f"{seed}:mixture")
        self.cursor = {name: 0 for name in self.records}
        self.epoch = {name: 0 for name in self.records}
        self.skipped: dict[str, int] = defaultdict(int)
        self._orders: dict[tuple[str, int], list[int]] = {}

    # ----------------------------------------------------------------------------------- order
    def _order(self, name: str) -> list[int]:
        """This rank's record order of source ``name`` in its current epoch (shuffled once per epoch, not per read)."""
        key = (name, self.epoch[name])
        if key not in self._orders:
            idx = list(range(len(self.records[name])))
            random.Random(f"{self.seed}:{name}:{self.epoch[name]}").shuffle(idx)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != name}  # keep one epoch per source
            self._orders[key] = idx[self.rank::self.world_size] or idx
        return self._orders[key]

    def _next_record(self, task: str) -> dict:
        names = [n for n, s in self.sources.items() if s.task == task]
        name = self.rng.choices(names, weights=[self.sources[n].weight for n in names])[0]
        order = self._order(name)
        if self.cursor[name] >= len(order):
            self.epoch[name] += 1
            self.cursor[name] = 0
            order = self._order(name)
        rec = self.records[name][order[self.cursor[name]]]
        self.cursor[name] += 1
        return {**rec, "_epoch": self.epoch[name]}

    def _next_sample(self, task: str):
        for _ in range(10_000):
            rec = self._next_record(task)
            rng = random.Random(f"{self.seed}:{rec['source']}:{rec['_epoch']}:{rec['index']}")
            try:
                sample = self.builder.build(rec, rng)
                if len(sample.input_ids) > self.cfg.max_seq_len:
                    raise BadSample("too_long", f"record {rec['index']} of {rec['source']}: {len(sample.input_ids)} "
                                                f"tokens > data.max_seq_len {self.cfg.max_seq_len}")
                und = [self.features.get(ref) for ref in sample.und_images]
                gen = [self.features.get(ref)[1] for ref in sample.gen_images]
                return sample, und, gen
            except BadSample as e:
                if self.cfg.on_bad_sample == "error":
                    raise ValueError(f"{e} (set data.on_bad_sample: skip to skip such samples)") from None
                self.skipped[f"{rec['source']}/{e.reason}"] += 1
                log.warning("skipped: %s", e)
        raise ValueError(f"task {task}: 10,000 bad samples in a row; check the recipe's sources")

    # ----------------------------------------------------------------------------------- batches
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        task = self.rng.choices(list(self.task_weights), weights=list(self.task_weights.values()))[0]
        rows: list[list] = []
        pending = None
        while len(rows) < self.micro_batch_size:
            row, length = [], 0
            while True:
                item = pending or self._next_sample(task)
                pending = None
                n = len(item[0].input_ids)
                if row and (not self.cfg.packing or length + n > self.cfg.max_seq_len):
                    pending = item
                    break
                row.append(item)
                length += n
                if not self.cfg.packing:
                    break
            rows.append(row)
        if pending is not None:  # a sample that did not fit is not lost: its record is replayed next time
            self._unread(pending[0].source)
        return collate(rows, self.features, self.builder.special_ids["pad_id"], self.cfg.packing, self.cfg.max_seq_len)

    def _unread(self, name: str) -> None:
        if self.cursor[name] > 0:
            self.cursor[name] -= 1

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "cursor": dict(self.cursor), "epoch": dict(self.epoch),
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.cursor, self.epoch = dict(state["cursor"]), dict(state["epoch"])
        self.skipped = defaultdict(int, state.get("skipped", {}))

    def stats(self) -> dict[str, int]:
        return dict(self.skipped)
