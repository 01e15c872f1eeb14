"""The reference log-probs of a list of preference pairs, computed once and cached (training's and the eval set's).

    ref_chosen_logps[i]   = log pi_ref(chosen_i | prompt_i)      [N]
    ref_rejected_logps[i] = log pi_ref(rejected_i | prompt_i)    [N]

pi_ref is the model as loaded, with every LoRA branch off (spl/step.py reference_logprobs), so the values are right
before the first update, after any number of them, and on --resume. They are read from (or written to) the cache
directory data/reference_cache.py names by a key of everything they depend on: the pairs' content hash and token
ids, the reference model's identity, the length limits, the chat format and the tokenizer file. The training pairs
and the held-out pairs therefore get two caches with two keys. Under torchrun each process scores its share of the
pairs and rank 0 writes the cache (spl/distributed.py shared_reference_logps).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from data.batching import PreferenceBatches
from data.reference_cache import ReferenceCacheKey, cache_path
from spl.distributed import Processes, share_batches, shared_reference_logps
from spl.step import reference_logprobs


def reference_log_probs(model, examples, dataset_sha256: str, inputs: dict, tokenizer, cache_dir: Path, c,
                        procs: Processes, device, compile):
    """(ref_chosen_logps [N], ref_rejected_logps [N]) on `device` for `examples` (PreferenceExamples numbered
    0..N-1), from the cache under `cache_dir` or computed once. inputs: the run's fingerprints of the reference
    model ("model": data/reference_cache.py reference_identity) and the tokenizer file ("tokenizer": its sha256),
    computed once by train.py and recorded in config.json. c: the run's TrainConfig (lengths, dtype, seed, batch
    size, the objective's length normalisation)."""
    key = ReferenceCacheKey.build(  # what the reference log-probs depend on: another key, another cache
        examples, dataset_sha256=dataset_sha256, max_length=c.max_length, max_prompt_length=c.max_prompt_length,
        reference_model=inputs["model"], chat_format=tokenizer.chat_format, tokenizer_sha256=inputs["tokenizer"])

    def compute():
        model.eval()
        chosen = torch.zeros(len(examples), device=device)  # [N]
        rejected = torch.zeros(len(examples), device=device)  # [N]
        micro_batch = c.batch_size // c.grad_accum  # pairs per accumulation step, all processes together
        order = share_batches(PreferenceBatches(examples, micro_batch * 2, tokenizer.pad_id, seed=c.seed), procs)
        for _ in tqdm(range(len(order)), desc="reference log-probs", disable=not (c.progress and procs.main),
                      leave=False):
            batch = next(order)
            counts = batch.pop("counts", True)
            batch = {k: v.to(device) for k, v in batch.items()}
            ref_chosen, ref_rejected = reference_logprobs(model, batch, average=c.average_logprobs, compile=compile,
                                                          shared_prefix=c.uses_shared_prefix())
            if counts:
                chosen[batch["pair_index"]] = ref_chosen.float()
                rejected[batch["pair_index"]] = ref_rejected.float()
        return chosen, rejected

    return shared_reference_logps(cache_path(cache_dir, key), key, compute, procs, device)
