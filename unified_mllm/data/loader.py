"""The training data stream: a seeded, weighted mixture of recipe sources, packed into micro-batches, with an
exact ``state_dict`` for resume and counted skips of bad samples.

Every decision (which task, which source, which record, what goes into which row) is taken in the main process
from its own seeded RNG and cursors. With ``data.num_workers > 0`` worker processes only do the per-record work —
tokenizing the record and reading (or computing) its image features — for the records each source will hand out
next, in that source's order. A sample is a pure function of its record (caption dropout draws from an RNG seeded
by the record), so the batches, their order and ``state_dict`` are the same with and without workers.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import random
import signal
import traceback
import weakref
from collections import Counter, defaultdict, deque

import torch

from unified_mllm.config.recipe import RecipeConfig
from unified_mllm.config.stage import DataConfig
from unified_mllm.data.image_features import ImageFeatures
from unified_mllm.data.packing import collate
from unified_mllm.data.samples import BadSample, SampleBuilder
from unified_mllm.data.sources import read_source

log = logging.getLogger(__name__)

AHEAD_PER_WORKER = 16
"""Records built ahead per source and worker."""


def check_task_names(field: str, names, tasks, recipe_path: str) -> None:
    """A per-task field (optim.task_ratio, optim.task_micro_batch_size, optim.task_lr_scale, optim.task_min_lr_ratio,
    data.task_max_seq_len; ``field`` without a section is optim's) that names a task the recipe does not have is one
    error naming the field: a misspelt task would otherwise be ignored without a word."""
    if unknown := sorted(set(names) - set(tasks)):
        name = field if "." in field else f"optim.{field}"
        raise ValueError(f"{name}: {unknown} not a task of {recipe_path} (tasks: {sorted(tasks)})")


class DataStream:
    def __init__(self, data_cfg: DataConfig, recipe: RecipeConfig, builder: SampleBuilder, features: ImageFeatures,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 task_ratio: dict[str, float] | None = None, recipe_path: str = "recipe",
                 task_micro_batch_size: dict[str, int] | None = None, gen_semantic: bool = False):
        self.cfg, self.builder, self.features = data_cfg, builder, features
        # the semantic tokens of the images to draw: only the semantic alignment reads them, so without it they are
        # neither sent from the workers nor batched and moved to the device
        self.gen_semantic = gen_semantic
        self.micro_batch_size, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.sources = {s.name: s for s in recipe.sources}
        self.records = {s.name: list(read_source(s, recipe_path)) for s in recipe.sources}
        for name, recs in self.records.items():
            if not recs:
                raise ValueError(f"{recipe_path}: source {name!r} has no records")
        by_task: dict[str, float] = defaultdict(float)
        for s in recipe.sources:
            by_task[s.task] += s.weight
        check_task_names("task_ratio", task_ratio or {}, by_task, recipe_path)
        self.task_weights = {t: w for t, w in (task_ratio or by_task).items() if w > 0}
        if not self.task_weights:
            raise ValueError(f"optim.task_ratio: no task of {recipe_path} has a share > 0 ({task_ratio})")
        self.task_micro_batch_size = dict(task_micro_batch_size or {})
        check_task_names("task_micro_batch_size", self.task_micro_batch_size, by_task, recipe_path)
        check_task_names("data.task_max_seq_len", data_cfg.task_max_seq_len, by_task, recipe_path)
        self.rng = random.Random(f"{seed}:mixture")
        # The task of each micro-batch is drawn from its own generator, one draw per batch, so every rank draws the
        # same task sequence: the source draws above vary per rank (packing fits a different number of samples), and
        # ranks on different tasks run different modules — under ZeRO-3 their parameter all-gathers then no longer
        # match and the run hangs at step 2.
        self.task_rng = random.Random(f"{seed}:tasks")
        self.cursor = {name: 0 for name in self.records}
        self.epoch = {name: 0 for name in self.records}
        self.skipped: dict[str, int] = defaultdict(int)
        self._orders: dict[tuple[str, int], list[int]] = {}
        self._pool: _WorkerPool | None = None
        self._window: dict[str, deque] = defaultdict(deque)  # per source: keys submitted to the workers, in order

    # ----------------------------------------------------------------------------------- order
    def _order(self, name: str, epoch: int | None = None) -> list[int]:
        epoch = self.epoch[name] if epoch is None else epoch
        key = (name, epoch)
        if key not in self._orders:
            for old in [k for k in self._orders if k[0] == name and k[1] < epoch - 1]:
                del self._orders[old]
            idx = list(range(len(self.records[name])))
            random.Random(f"{self.seed}:{name}:{epoch}").shuffle(idx)
            self._orders[key] = idx[self.rank::self.world_size] or idx
        return self._orders[key]

    def _next_record(self, task: str) -> tuple[tuple[str, int, int], dict]:
        names = [n for n, s in self.sources.items() if s.task == task]
        name = self.rng.choices(names, weights=[self.sources[n].weight for n in names])[0]
        if self.cursor[name] >= len(self._order(name)):
            self.epoch[name] += 1
            self.cursor[name] = 0
        key = (name, self.epoch[name], self.cursor[name])
        self.cursor[name] += 1
        return key, self._record(key)

    def _record(self, key: tuple[str, int, int]) -> dict:
        name, epoch, pos = key
        return {**self.records[name][self._order(name, epoch)[pos]], "_epoch": epoch}

    def build(self, rec: dict) -> tuple:
        """One record → ``("ok", sample, und features, gen features)``, each a (semantic, pixel codes) pair per image
        (the gen semantic None unless ``gen_semantic``), or ``("bad", reason, message)``; a pure function of the record, run in the main process or in a worker."""
        rng = random.Random(f"{self.seed}:{rec['source']}:{rec['_epoch']}:{rec['index']}")
        try:
            sample = self.builder.build(rec, rng)
            if len(sample.input_ids) > self.max_len(sample.task):
                name = "task_max_seq_len." + sample.task if sample.task in self.cfg.task_max_seq_len else "max_seq_len"
                raise BadSample("too_long", f"record {rec['index']} of {rec['source']}: {len(sample.input_ids)} "
                                            f"tokens > data.{name} {self.max_len(sample.task)}")
            und = [self.features.get(ref) for ref in sample.und_images]
            gen = [(sem if self.gen_semantic else None, codes)
                   for sem, codes in (self.features.get(ref) for ref in sample.gen_images)]
            return "ok", sample, und, gen
        except BadSample as e:
            return "bad", e.reason, str(e)

    def max_len(self, task: str) -> int:
        """The context length of ``task``'s sequences."""
        return self.cfg.task_max_seq_len.get(task, self.cfg.max_seq_len)

    def _next_sample(self, task: str):
        in_a_row: Counter = Counter()
        message = ""
        for _ in range(10_000):
            key, rec = self._next_record(task)
            result = self.build(rec) if self.cfg.num_workers == 0 else self._from_workers(key, rec)
            if result[0] == "ok":
                return result[1:]
            _, reason, message = result
            if self.cfg.on_bad_sample == "error":
                raise ValueError(f"{message} (set data.on_bad_sample: skip to skip such samples)")
            self.skipped[f"{rec['source']}/{reason}"] += 1
            in_a_row[f"{rec['source']}/{reason}"] += 1
            log.warning("skipped: %s", message)
        reasons = ", ".join(f"{k} {v}" for k, v in in_a_row.most_common())
        raise ValueError(f"task {task}: 10,000 bad samples in a row ({reasons}); the last: {message}")

    # ----------------------------------------------------------------------------------- workers
    def _from_workers(self, key: tuple[str, int, int], rec: dict) -> tuple:
        """The result for ``key``, built by a worker; keeps the next records of its source in flight."""
        if self._pool is None:
            self._pool = _WorkerPool(self.cfg.num_workers, self.build)
        name = key[0]
        window = self._window[name]
        while window and window[0] < key:  # handed out already and never asked for again
            self._pool.forget(window.popleft())
        if not window or window[0] != key:  # first use, or a jump (resume): restart the window here
            for old in window:
                self._pool.forget(old)
            window.clear()
            self._pool.submit(key, rec)
            window.append(key)
        depth = AHEAD_PER_WORKER * self.cfg.num_workers
        while len(window) <= depth:
            nxt = self._after(window[-1])
            self._pool.submit(nxt, self._record(nxt))
            window.append(nxt)
        # window[0] == key stays until a later record of the source is asked for: a sample that did not fit into
        # the batch is put back (``_unread``) and asked for again
        return self._pool.result(key)

    def _after(self, key: tuple[str, int, int]) -> tuple[str, int, int]:
        name, epoch, pos = key
        return (name, epoch, pos + 1) if pos + 1 < len(self._order(name, epoch)) else (name, epoch + 1, 0)

    def close(self) -> None:
        """Stop the worker processes (also done when the stream is garbage-collected or the program exits)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._window.clear()

    # ----------------------------------------------------------------------------------- batches
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        task = self.task_rng.choices(list(self.task_weights), weights=list(self.task_weights.values()))[0]
        rows: list[list] = []
        pending, max_len = None, self.max_len(task)
        while len(rows) < self.task_micro_batch_size.get(task, self.micro_batch_size):
            row, length = [], 0
            while True:
                item = pending or self._next_sample(task)
                pending = None
                n = len(item[0].input_ids)
                if row and (not self.cfg.packing or length + n > max_len):
                    pending = item
                    break
                row.append(item)
                length += n
                if not self.cfg.packing:
                    break
            rows.append(row)
        if pending is not None:  # a sample that did not fit is not lost: its record is replayed next time
            self._unread(pending[0].source)
        return collate(rows, self.features, self.builder.special_ids["pad_id"], self.cfg.packing, max_len)

    def _unread(self, name: str) -> None:
        if self.cursor[name] > 0:
            self.cursor[name] -= 1

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "task_rng": self.task_rng.getstate(), "cursor": dict(self.cursor),
                "epoch": dict(self.epoch), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        for name in ("rng", "task_rng"):  # checkpoints written before task_rng existed resume without it
            if name in state:
                version, internal, gauss = state[name]  # JSON turns the state's tuple into a list
                getattr(self, name).setstate((version, tuple(internal), gauss))
        self.cursor, self.epoch = dict(state["cursor"]), dict(state["epoch"])
        self.skipped = defaultdict(int, state.get("skipped", {}))

    def stats(self) -> dict[str, int]:
        return dict(self.skipped)


# --------------------------------------------------------------------------------------------- worker processes
def _map_features(result: tuple, fn) -> tuple:
    if result[0] != "ok":
        return result
    _, sample, und, gen = result
    return "ok", sample, *([(None if s is None else fn(s), fn(p)) for s, p in feats] for feats in (und, gen))


def _to_numpy(result: tuple) -> tuple:
    """Tensors cross the process boundary as numpy arrays (plain pickling, no shared-memory file handles)."""
    return _map_features(result, lambda t: t.numpy())


def _from_numpy(result: tuple) -> tuple:
    return _map_features(result, torch.from_numpy)


def _worker_main(build, tasks, results, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)
    results.cancel_join_thread()
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone (e.g. SIGKILL): do not linger
                return
            continue
        if item is None:
            return
        key, rec = item
        try:
            results.put((key, _to_numpy(build(rec))))
        except Exception:  # a bug, not bad data: the main process raises it with this traceback
            results.put((key, ("error", traceback.format_exc())))


class _WorkerPool:
    """Processes that run ``build(record)``; results are collected by key, in any order."""

    def __init__(self, num_workers: int, build):
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(build, self.tasks, self.results, os.getpid()),
                                  daemon=True, name=f"data-worker-{i}") for i in range(num_workers)]
        for p in self.procs:
            p.start()
        self.live: set = set()
        self.done: dict = {}
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.tasks)

    def submit(self, key, rec: dict) -> None:
        if key not in self.live:
            self.live.add(key)
            self.tasks.put((key, rec))

    def forget(self, key) -> None:
        self.live.discard(key)
        self.done.pop(key, None)

    def result(self, key) -> tuple:
        while key not in self.done:
            try:
                got, result = self.results.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"data worker {dead[0].name} exited with code {dead[0].exitcode} (out of "
                                       f"memory?); set data.num_workers: 0 to load in the main process") from None
                continue
            if got in self.live:
                self.done[got] = result
        result = self.done[key]
        if result[0] == "error":
            raise RuntimeError(f"data worker failed on record {key}:\n{result[1]}")
        return _from_numpy(result)

    def close(self) -> None:
        self._finalizer()


def _stop(procs: list, tasks) -> None:
    for _ in procs:
        try:
            tasks.put(None)
        except (OSError, ValueError):
            break
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.terminate()
            p.join(timeout=1.0)
