"""Configuration of an exported Mixture-of-Recursions model (Hugging Face ``AutoConfig``, ``model_type = "mor"``).

Shipped beside ``modeling_mor.py`` in every folder that ``python -m pretrain.export`` writes, and loaded from there
with ``trust_remote_code=True``. Needs only torch and transformers: it imports nothing of the training project.

Every field of the project's ``model.config.ModelConfig`` is here under its own name (``router`` as a plain dict of
``RouterConfig``'s fields), so ``config.json`` converts back to the training config exactly
(``python -m pretrain.import_hf``). The usual Hugging Face names (``hidden_size``, ``num_hidden_layers``, ...) are
aliases of them.
"""
from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig

# RouterConfig's fields and defaults (model/config.py); the variant-dependent ones (alpha, func, z_loss_coef) stay
# None here and are resolved by the modeling code as the training code resolves them.
ROUTER_DEFAULTS: dict[str, Any] = {
    "alpha": None, "func": None, "capacities": None, "cap_warmup_step": 0, "gating": "weighted", "arch": "linear",
    "temperature": 1.0, "aux_loss_coef": 0.001, "aux_router": False, "aux_router_coef": 0.001, "z_loss_coef": None,
    "balance": "loss", "balance_coef": 0.1, "bias_update_rate": 0.001, "bal_warmup_step": 0,
}


class MoRConfig(PretrainedConfig):
    r"""A recursive transformer (vanilla, recursive, or MoR with expert- or token-choice routing).

    ``n_layers`` is the unrolled depth; ``sharing`` (none, cycle, sequence, middle_cycle, middle_sequence) and
    ``num_recursions`` decide which unique layer runs at each unrolled position; ``routing`` (none,
    expert_choice, token_choice) and ``router`` decide which tokens run each recursion step (causal inference
    routing); ``kv_sharing``: later recursion steps attend to the first step's keys and values.
    ``doc_start_token_id``: the token the training data put before every document (BOS, or EOS when the data was
    tokenized without BOS); it is also ``bos_token_id``, and the exported tokenizer puts it before every text.
    ``max_seq_len``: the longest sequence the model was trained on; ``generate()`` stops there.
    """

    model_type = "mor"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
                     "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
                     "initializer_range": "init_std"}

    # ---- model.config.ModelConfig -------------------------------------------------------------------------------
    name: str = "custom"
    vocab_size: int = 49152
    d_model: int = 960
    n_layers: int = 32
    n_heads: int = 15
    n_kv_heads: int = 5
    ffn_hidden: int = 2560
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    sharing: str = "none"
    num_recursions: int = 1
    routing: str = "none"
    router: Optional[dict] = None
    kv_sharing: bool = False
    attention_backend: str = "auto"
    tc_compact: bool = True
    tc_capacity: float = 0.0   # training routing only: inference never caps
    loss_chunk: int = 2048     # training only: how the head's loss is chunked
    # ---- Hugging Face -----------------------------------------------------------------------------------------
    doc_start_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    use_cache: bool = True
    # The head borrows the embedding matrix in the forward pass when ``tie_embeddings``: nothing for transformers
    # to tie, and the weights file holds the matrix once.
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.router = {**ROUTER_DEFAULTS, **(self.router or {})}
        super().__post_init__(**kwargs)

    # ---- derived quantities, as model/config.py computes them ---------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def middle(self) -> bool:
        return self.sharing in ("middle_cycle", "middle_sequence")

    @property
    def layers_per_recursion(self) -> int:
        if self.sharing == "none":
            return self.n_layers
        return (self.n_layers - 2 * self.middle) // self.num_recursions

    @property
    def capacities(self) -> list[float]:
        caps = self.router.get("capacities")
        if caps is not None:
            return [float(c) for c in caps]
        nr = self.num_recursions
        return [(nr - r + 1) / nr for r in range(1, nr + 1)]


__all__ = ["MoRConfig"]
