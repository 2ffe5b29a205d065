"""The equal-FLOPs study: ``python -m pretrain.study STUDY.yaml`` reads the study file and plans each model's steps
from the training-FLOPs budget (spec), trains the models through the sweep machinery and draws and tabulates their
curves against training FLOPs (cli, report)."""
