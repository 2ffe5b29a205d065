"""What a resume may do with each key of a run's config: one table, every key named (no prefixes), with why.

    FREE      may change: the new value applies from the resumed step on, and the saved state stays valid
    MATCH     must match the checkpoint's config: it defines the model, the optimizer state or the data order;
              a difference is one error listing the keys, before anything is loaded
    LAYOUT    may change: the checkpoint's training state is made layout-free and converted for this run
              (pretrain/checkpoint/reshard.py: fp32 master weights and Adam moments carried over)
    CHECKED   may change within what the checkpoint can continue from, checked before anything is loaded: the
              effective global batch (micro × accumulation × DP) and the data position (readers)

tests/pretrain/test_config_keys.py walks every dataclass leaf of RunConfig and fails on a key missing here, so a
new key must be classified before any run can resume with it.
"""
from __future__ import annotations

FREE, MATCH, LAYOUT, CHECKED = "free", "match", "layout", "checked"

_TABLE: list[tuple[str, str, tuple[str, ...]]] = [
    (FREE, "where the run lives; a checkpoint folder of another run may be continued under a new name",
     ("name", "out_dir")),
    (FREE, "a label; the model's definition is in the other model keys",
     ("model.name",)),
    (MATCH, "the parameters' shapes and what the model computes",
     ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
      "model.ffn_hidden", "model.max_seq_len", "model.rope_theta", "model.norm_eps", "model.tie_embeddings",
      "model.sharing", "model.num_recursions", "model.routing", "model.kv_sharing", "model.tc_capacity")),
    (MATCH, "the router: its parameters, its decisions and the losses it was trained with",
     ("model.router.alpha", "model.router.func", "model.router.capacities", "model.router.cap_warmup_step",
      "model.router.gating", "model.router.arch", "model.router.temperature", "model.router.aux_loss_coef",
      "model.router.aux_router", "model.router.aux_router_coef", "model.router.z_loss_coef",
      "model.router.balance", "model.router.balance_coef", "model.router.bias_update_rate",
      "model.router.bal_warmup_step")),
    (MATCH, "used only to draw the initial weights: a resumed run's config must still say how it began",
     ("model.init_std", "parallel.seed")),
    (FREE, "how the same function is computed (kernel, loss chunks, compaction, compilation, recomputation)",
     ("model.attention_backend", "model.loss_chunk", "model.tc_compact", "train.compile",
      "train.activation_checkpointing")),
    (LAYOUT, "the parallel layout: the checkpoint is re-sharded when it differs",
     ("parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.zero_stage",
      "parallel.sequence_parallel")),
    # The effective precision (bf16 or fp32 compute over fp32 master weights) is compared, not the key: `auto`
    # may resolve differently on another device.
    (LAYOUT, "the compute precision: the fp32 master weights and moments are carried into the other engine",
     ("train.precision",)),
    (MATCH, "the data position is counted in micro-batches of this size; another size would read other samples",
     ("parallel.micro_batch_size",)),
    (CHECKED, "the effective global batch may change only when set explicitly (an unset value follows DP)",
     ("parallel.global_batch_size",)),
    (CHECKED, "the data position must be continuable: the same readers, shared evenly by DP × workers, and the "
              "same shards (the tokenizer's sha256 and the shards' fingerprint), wherever they now are",
     ("data.path", "data.readers", "data.num_workers")),
    (MATCH, "the data order", ("data.seed",)),
    (CHECKED, "a mixture's data position continues on the sources it read, each with the same shards (a source "
              "may be added for a later phase), and a phase that has begun keeps its weights unless "
              "data.allow_mix_change (pretrain/data/mixed_loader.py)",
     ("data.sources", "data.phases")),
    (FREE, "whether a resume may change the weights of a phase that has begun (they apply from the resume on)",
     ("data.allow_mix_change",)),
    (MATCH, "restored with the optimizer's saved parameter groups on a same-layout resume, so a new value "
            "would be silently ignored there",
     ("optim.betas", "optim.eps", "optim.weight_decay")),
    (FREE, "applied at every step from the config (the learning rate is set before each step; clipping is "
           "DeepSpeed's setting or the pipeline's own, not saved state)",
     ("optim.lr", "optim.grad_clip", "schedule.kind", "schedule.warmup_frac", "schedule.decay_frac",
      "schedule.min_lr_ratio", "train.steps")),
    (FREE, "what the loop reports, evaluates and saves, and how it handles a bad step",
     ("train.log_every", "train.eval_every", "train.eval_batches", "eval.downstream_every",
      "eval.downstream_limit", "eval.downstream_tasks", "eval.downstream_shots", "eval.downstream_batch_size",
      "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "logging.wandb", "logging.project",
      "logging.spike_factor", "on_nonfinite", "max_consecutive_skips")),
    (FREE, "how long a rank waits for the others in one collective; nothing saved depends on it",
     ("parallel.collective_timeout_s",)),
]

KEYS: dict[str, str] = {}
WHY: dict[str, str] = {}
for _kind, _why, _keys in _TABLE:
    for _key in _keys:
        assert _key not in KEYS, f"{_key} is classified twice"
        KEYS[_key], WHY[_key] = _kind, _why

# Keys added after checkpoints were first written, with the value every older run had (the feature was off).
ADDED = {"model.tc_capacity": 0.0, "model.router.aux_router_coef": 0.001, "model.router.cap_warmup_step": 0,
         "model.router.bal_warmup_step": 0}


def kind(key: str) -> str:
    """The class of a dotted key; a key not in the table (one a newer or older version had) must match. Keys
    inside a mapping of the config (data.sources.web.weight) are their mapping's (data.sources)."""
    while key not in KEYS and "." in key:
        parent = key.rsplit(".", 1)[0]
        if parent in KEYS:
            return KEYS[parent]
        key = parent
    return KEYS.get(key, MATCH)
