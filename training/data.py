"""Batches for training: a deterministic global order of documents, split into optimizer steps,
micro-batches and ranks, and the collate that builds model inputs and targets.

Step s of epoch e takes ``G = micro_batch_documents * grad_accum_steps * world_size`` documents
from a permutation of the training documents seeded by (seed, e); micro-batch m of rank r
takes documents ``[(m * world_size + r) * micro, ... + micro)`` of that step. Every rank can
therefore count the label tokens (or predicted sentences) of the whole step in advance — the
loss of each micro-batch is its sum divided by that global count, so micro-batches and ranks
add up to the token mean of the step. The incomplete last step of an epoch is dropped. The
position is a pure function of the global step, which is all a resumed run needs.

Shape legend: T = packed sentences of a micro-batch, E = SONAR dim, N = predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sonarllm.loss import SonarTargets
from training.shards import ShardedDocuments


@dataclass
class MicroBatch:
    """Inputs and targets of one micro-batch on one rank."""

    embeds_TE: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [docs + 1], documents packed
    max_seqlen: int
    pred_index_N: torch.Tensor  # positions whose output predicts the next sentence
    target_embeds_NE: torch.Tensor  # the true next-sentence embeddings (MSE objective, cosine)
    targets: SonarTargets  # the next sentences' tokens (SONAR objective)

    def to(self, device, dtype=None) -> MicroBatch:
        return MicroBatch(self.embeds_TE.to(device=device, dtype=dtype), self.cu_seqlens.to(device), self.max_seqlen,
                          self.pred_index_N.to(device), self.target_embeds_NE.to(device=device, dtype=dtype),
                          self.targets.to(device))  # fmt: skip


def collate(docs, *, eos_idx: int, duplicate_eos: bool) -> MicroBatch:
    """Pack documents; position k of a document predicts its sentence k + 1."""
    lengths = [d.embeddings.shape[0] for d in docs]
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    pred_index = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1]) - 1) for i in range(len(docs))])
    target_seqs = [seq for d in docs for seq in d.tokens[1:]]
    embeds = torch.cat([d.embeddings for d in docs]).float()
    return MicroBatch(
        embeds_TE=embeds,
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        pred_index_N=pred_index,
        target_embeds_NE=embeds[pred_index + 1],
        targets=SonarTargets.from_target_sequences(target_seqs, eos_idx, duplicate_eos=duplicate_eos),
    )


class StepSchedule:
    """Which documents every (step, micro-batch, rank) trains on, and each step's global counts."""

    def __init__(self, dataset: ShardedDocuments, *, micro: int, accum: int, world: int, seed: int, duplicate_eos: bool):
        self.dataset, self.micro, self.accum, self.world, self.seed = dataset, micro, accum, world, seed
        self.global_docs = micro * accum * world
        self.steps_per_epoch = len(dataset) // self.global_docs
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training split has {len(dataset)} documents, fewer than one optimizer step needs "
                f"(micro_batch_documents * grad_accum_steps * world_size = {self.global_docs})"
            )
        extra = 0 if duplicate_eos else -1  # the clean convention has one label fewer per sentence
        self._labels = [sum(c + extra for c in dataset.sentence_token_counts(d)[1:]) for d in range(len(dataset))]
        self._preds = [dataset.num_sentences(d) - 1 for d in range(len(dataset))]
        self._order_epoch, self._order = None, None

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            # modulo 2**64 (the generators' seed range): the same value for every seed that fitted
            g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) % 2**64)
            self._order = torch.randperm(len(self.dataset), generator=g).tolist()
            self._order_epoch = epoch
        return self._order

    def step_documents(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_docs
        return self._order_for(epoch)[start : start + self.global_docs]

    def micro_documents(self, step: int, micro_index: int, rank: int) -> list[int]:
        docs = self.step_documents(step)
        start = (micro_index * self.world + rank) * self.micro
        return docs[start : start + self.micro]

    def step_counts(self, step: int) -> tuple[int, int]:
        """(label tokens, predicted sentences) of the whole step, over all ranks."""
        docs = self.step_documents(step)
        return sum(self._labels[d] for d in docs), sum(self._preds[d] for d in docs)
