"""The Hugging Face side of an exported model: ``configuration_mor.py``, ``layers_mor.py``, ``cache_mor.py`` and
``modeling_mor.py`` are copied as they are into every folder ``python -m pretrain.export`` writes, and run there
under transformers' remote code (``trust_remote_code=True``) on a machine with only torch, transformers and
safetensors. They import nothing of the training project (only each other, relatively); the training never imports
them. Needs the ``hf`` extra."""
