"""The demo backbone: a tiny byte-level T5 trained from scratch on instruction-prefixed skill tasks.

Its curriculum is the single skills and the training compositions only (no held-out composition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import T5Config, T5ForConditionalGeneration

from demo.batches import EOS_ID, PAD_ID, Batch, TaskMixSampler
from demo.tasks import backbone_curriculum, skills_of
from demo.train_loop import LoopConfig, LoopResult, run_loop


@dataclass
class BackboneHparams:
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 3  # encoder and decoder depth (kept equal: transformers 5.24 generate needs it)
    num_heads: int = 4
    lr: float = 1e-3
    batch_size: int = 32
    steps: int = 6500
    warmup_steps: int = 300
    # fraction of batches made of single-skill tasks; 0.5 beat 0.2 in a short probe (demo/RESULTS.md, probe_share)
    single_skill_share: float = 0.5


def t5_config(hp: BackboneHparams) -> T5Config:
    """A T5 v1.0-style config (ReLU FFN: modules q, k, v, o, wi, wo) over ByT5's 384-id vocabulary."""
    return T5Config(
        vocab_size=384,
        d_model=hp.d_model,
        d_kv=hp.d_model // hp.num_heads,
        d_ff=hp.d_ff,
        num_layers=hp.num_layers,
        num_decoder_layers=hp.num_layers,
        num_heads=hp.num_heads,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def seq2seq_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Token cross-entropy of the targets given the inputs (no task ids: the backbone reads the prefix)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


class CurriculumSampler:
    """Instruction-prefixed batches over demo.tasks.backbone_curriculum(): single skills and training pairs.

    A share of the batches holds single skills only, the others training compositions only. No
    held-out composition is ever sampled: the backbone must not have learnt the held-out tasks.
    """

    def __init__(self, hp: BackboneHparams, seed: int):
        curriculum = backbone_curriculum()
        singles = [task for task in curriculum if len(skills_of(task)) == 1]
        pairs = [task for task in curriculum if len(skills_of(task)) > 1]
        self.singles = TaskMixSampler(singles, hp.batch_size, seed * 7919 + 1, prefixed=True)
        self.pairs = TaskMixSampler(pairs, hp.batch_size, seed * 7919 + 2, prefixed=True)
        self.share = hp.single_skill_share
        self.count = 0

    def tasks(self) -> list[str]:
        """Every task this sampler can draw (single skills first)."""
        return self.singles.tasks + self.pairs.tasks

    def next(self) -> Batch:
        self.count += 1
        every = max(1, round(1 / self.share)) if self.share > 0 else 0
        use_single = every and self.count % every == 0
        return self.singles.next() if use_single else self.pairs.next()


def train_backbone(hp: BackboneHparams, seed: int, deadline: float | None = None):
    """Build a fresh T5 from the seed and train it; returns (model in eval mode, LoopResult)."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(t5_config(hp))
    sampler = CurriculumSampler(hp, seed)
    cfg = LoopConfig(steps=hp.steps, warmup_steps=hp.warmup_steps, deadline=deadline, name="backbone")
    groups = [{"params": list(model.parameters()), "lr": hp.lr}]
    result: LoopResult = run_loop(model, groups, sampler.next, seq2seq_loss, cfg)
    return model, result


def hparams_dict(hp: BackboneHparams) -> dict:
    return asdict(hp)
