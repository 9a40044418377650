"""Pack samples into rows of the context length (position ids restart per sample), or pad them."""

from __future__ import annotations

import torch

from unified_mllm.data.masking import IGNORE


def collate(rows: list[list], features, pad_id: int, packing: bool, max_len: int) -> dict:
    """rows: lists of (Sample, und features, gen features) packed together → the contract's batch dict (``records``:
    (source, record index) of every sample, in order; not a model input)."""
    input_ids, labels, positions, masks = [], [], [], []
    und_sem, und_pix, gen_sem, gen = [], [], [], []
    sources, records, task = [], [], None
    width = max(sum(len(s.input_ids) for s, *_ in row) for row in rows)  # <= max_len by construction
    for row in rows:
        ids, lab, pos = [], [], []
        for sample, und, gen_feats in row:
            ids += sample.input_ids
            lab += sample.labels
            pos += list(range(len(sample.input_ids)))
            und_sem += [u[0] for u in und]
            und_pix += [u[1] for u in und]
            gen_sem += [g[0] for g in gen_feats]
            gen += [g[1] for g in gen_feats]
            sources.append(sample.source)
            records.append((sample.source, sample.record))
            task = sample.task
        pad = width - len(ids)
        masks.append([1] * len(ids) + [0] * pad)
        # padding continues the position count so it never looks like a new packed sample
        pos += list(range(pos[-1] + 1, pos[-1] + 1 + pad)) if pad else []
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE] * pad)
        positions.append(pos)
    batch = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
             "position_ids": torch.tensor(positions), "attention_mask": None if packing else torch.tensor(masks),
             "task": task, "sources": sources, "records": records}
    if und_sem:
        batch["und_semantic"] = torch.stack(und_sem)
        batch["und_pixel_codes"] = torch.stack(und_pix)
    if gen:
        batch["gen_codes"] = torch.stack(gen)
        if gen_sem[0] is not None:  # carried only for the semantic alignment (DataStream gen_semantic)
            batch["gen_semantic"] = torch.stack(gen_sem)
    return batch
