"""Multi-process test harness: a single-process reference run here, the same run under a layout in 2-4 gloo
processes (tests/distributed/worker.py), and the comparison of their losses, gradient norms, kept tokens and final
weights."""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from model.config import ModelConfig
from model.mor import MoRModel
from pretrain.parallel.zero import param_groups
from tests import forked
from tests.model.helpers import tiny

ROOT = Path(__file__).resolve().parents[2]
SEQ, GLOBAL_BATCH, STEPS, LR, CLIP = 16, 4, 3, 1e-3, 1.0

# Weights large enough that positions matter: at the default 0.02, a recursion step's tokens at wrong RoPE
# positions under sequence parallelism kept the losses within 1e-5 (the norms moved by 1e-6); at 0.1 the losses
# move by 1e-4 and the weights by 2e-2. Correct layouts still agree to 3e-6 after 3 steps, which they no longer do
# at the model tests' SHARP_STD (1.4e-5: three AdamW steps amplify the rounding of TP's other summation order).
INIT_STD = 0.1
VARIANTS = {
    "vanilla": lambda: tiny(sharing="none", n_layers=4, init_std=INIT_STD),
    "mor_ec": lambda: tiny(routing="expert_choice", sharing="middle_cycle", init_std=INIT_STD),
    "mor_tc": lambda: tiny(routing="token_choice", sharing="middle_cycle", init_std=INIT_STD),
    # recursive KV sharing: later steps attend to the first step's keys, which cross stage cuts with the state
    "mor_ec_kv": lambda: tiny(routing="expert_choice", sharing="middle_cycle", init_std=INIT_STD, kv_sharing=True),
    "mor_tc_kv": lambda: tiny(routing="token_choice", sharing="cycle", init_std=INIT_STD, kv_sharing=True),
}


# What libraries print at start-up and during a run, as opposed to our own lines: a Python warning names its
# file under site-packages; DeepSpeed logs "[date time] [LEVEL] [file:line:function]"; torch's C++ side logs
# "W1130 12:00:00..." / "[W1130 ...]"; DeepSpeed announces ops it builds.
_CHATTER = re.compile(r"site-packages/|^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\]|^\[?[WIE]\d{4} \d\d:\d\d|"
                      r"built successfully", re.M)


def library_chatter(log: str) -> list[str]:
    """The lines of ``log`` that libraries printed."""
    return [line for line in log.splitlines() if _CHATTER.search(line)]


def _free_port() -> int:
    """A port for a rendezvous, free now and, as far as this machine can promise, still free when the ranks bind it.

    Not one the kernel hands out (bind to port 0): it comes from the ephemeral range (32768-60999 here), from which
    every outgoing connection, gloo's among them, also takes its local port, so with tests running side by side
    another process could take it before the ranks listen on it (EADDRINUSE). Below that range nothing takes a port
    by itself; each pytest-xdist worker draws from its own thousand (10000-19999, under slurm/launch.sh's 20000+)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 10000 + (index % 10) * 1000
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, low + 1000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}-{low + 999}")


def spawn_ranks(world: int, argv: list[str], log_dir: Path, *, env: dict | None = None, timeout: int = 300,
                check: bool = True, prefix: str = "rank", fresh: bool = False) -> list[int]:
    """Start ``world`` processes of ``python argv`` with torchrun's environment; wait; return exit codes.
    ``env`` adds variables, or removes those it maps to None. With ``check``, any non-zero exit raises with the
    tail of that rank's log. The ranks are forked from a pre-imported interpreter (tests/forked.py) unless
    ``fresh`` (a test of start-up itself) or ``env`` asks for what the fork server cannot give."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        full_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
                    # bit-for-bit comparisons between processes: MKL must not vary its threads or code path
                    # with the machine's load or buffer alignment
                    "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AVX2",
                    "WANDB_MODE": "disabled"}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        log_path = log_dir / f"{prefix}{rank}.log"
        if not fresh and forked.forkable(full_env):
            procs.append((forked.start(argv, full_env, ROOT, log_path), None))
            continue
        log = open(log_path, "w")
        procs.append((subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=full_env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes, failed = [], []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            rc = -999
        if log is not None:
            log.close()
        codes.append(rc)
        if rc != 0:
            failed.append(f"rank {rank} exit {rc}:\n" + (log_dir / f"{prefix}{rank}.log").read_text()[-3000:])
    if check and failed:
        raise AssertionError("\n".join(failed))
    return codes


def reference(cfg: ModelConfig, *, dp: int, micro: int, seed: int = 0) -> dict:
    """Plain single-process AdamW run: each step is dp × gas micro-batches, averaged, as the layout will see."""
    torch.manual_seed(seed)
    model = MoRModel(cfg)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
    data = torch.randint(0, cfg.vocab_size, (STEPS, GLOBAL_BATCH, SEQ + 1))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    n_micro = GLOBAL_BATCH // micro
    losses, kept, norms = [], [], []
    for step in range(STEPS):
        total = 0.0
        for i in range(n_micro):
            batch = data[step, i * micro:(i + 1) * micro]
            model.trace = [] if step == 0 else None
            out = model(batch[:, :-1], batch[:, 1:])
            if step == 0:
                kept += [_kept(model.trace)]
            (out.loss / n_micro).backward()
            total += out.loss.item() / n_micro
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    model.trace = None
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"state": state, "data": data, "losses": losses, "kept": kept, "final": final, "norms": norms}


def _kept(trace) -> list:
    return [t["idx"] if "idx" in t else t["depth"] for t in trace] if trace else []


def run_layout(tmp_path: Path, world: int, parallel: dict, variants: list[str], timeout: int = 300) -> dict:
    """Reference runs here, then ``world`` worker processes; returns {variant: (reference, layout result)}."""
    tp, pp = parallel.get("tensor_parallel", 1), parallel.get("pipeline_parallel", 1)
    dp = world // (tp * pp)
    micro = parallel["micro_batch_size"]
    refs = {}
    for v in variants:
        refs[v] = reference(VARIANTS[v](), dp=dp, micro=micro)
        torch.save(refs[v], tmp_path / f"{v}_ref.pt")
    case = {"parallel": {**parallel, "global_batch_size": GLOBAL_BATCH}, "variants": variants,
            "configs": {v: asdict(VARIANTS[v]()) for v in variants}, "dir": str(tmp_path),
            "steps": STEPS, "lr": LR, "clip": CLIP}
    (tmp_path / "case.json").write_text(json.dumps(case))
    spawn_ranks(world, ["-m", "tests.distributed.worker", str(tmp_path / "case.json")], tmp_path, timeout=timeout)
    return {v: (refs[v], torch.load(tmp_path / f"{v}_result.pt")) for v in variants}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative error of a whole tensor."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_matches(ref: dict, got: dict, *, rtol: float = 1e-5) -> None:
    """Losses and gradient norms per step and every final weight tensor within ``rtol`` relative; kept tokens
    identical.

    The norms agree to 3e-7. Adam hardly notices a changed clipping scale, so a parameter counted twice in the
    global norm (a norm weight on both TP ranks) shows in the norms only: by ~1e-3 here."""
    assert torch.allclose(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0), \
        (got["losses"], ref["losses"])
    assert len(got["norms"]) == len(ref["norms"]), "the layout must report a gradient norm every step"
    for key in ("norms", "engine_norms"):
        if got[key]:  # engine_norms: only where DeepSpeed clips with a norm it does not store (ZeRO-0)
            assert torch.allclose(torch.tensor(got[key]), torch.tensor(ref["norms"]), rtol=rtol, atol=0), \
                (key, got[key], ref["norms"])
    for a, b in zip(ref["kept"], got["kept"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), "kept tokens differ from the single-process run"
    assert got.get("replicas_identical", True), "pipeline replicas of a shared parameter diverged"
    assert set(got["final"]) == set(ref["final"])
    for name, w in ref["final"].items():
        assert rel_err(got["final"][name], w) < rtol, f"{name}: relative error {rel_err(got['final'][name], w):.3g}"
