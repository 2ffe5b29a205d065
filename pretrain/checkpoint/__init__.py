"""Checkpoints: the folder format and its verification (verify), writing one (save), resuming a run from one
(resume, behind the Checkpointer), what may change on resume (config_keys), merging any layout into one process's
model (consolidate), a training state moved to another layout or precision (reshard), and the fault-injection
points the recovery tests use (faults). Training, serving, export and import all read weights through here."""
