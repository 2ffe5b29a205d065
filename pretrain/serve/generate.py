"""Generate text with a trained run: ``python -m pretrain.generate RUN_OR_CHECKPOINT --prompt TEXT``.

RUN_OR_CHECKPOINT is a run folder (runs/NAME: its newest checkpoint that passes its check against its record is
used; newer ones that fail are named on stderr, and nothing is renamed) or one checkpoint folder
(runs/NAME/checkpoints/step-000600). A checkpoint saved under any layout — tensor or pipeline parallel, ZeRO 1-3,
data parallel, fp32 or bf16 — is merged into one process's model (pretrain/checkpoint/consolidate.py).

The tokenizer is the run's: the SentencePiece model that the data manifest at the run's data.path names, checked
against the sha256 the checkpoint recorded. --tokenizer PATH replaces it (it must still be the same model: same
sha256, no more pieces than the model's vocabulary).

Each prompt starts a new document, as documents start in the run's data: after BOS when the data was tokenized
with --bos, after EOS otherwise. Generation stops at EOS, after --max-new-tokens, or at the model's max_seq_len.

Output (stdout): with one prompt, the prompt and then its continuation as it is made, piece by piece. With several
(--prompt repeated, --prompts-file), the batch runs together and each completion is printed whole as soon as it
is finished, as "[N] prompt + completion" (N: the prompt's number, from 1): in the order they finish, those that
run to the length limit last, in prompt order. What was loaded goes to stderr, in one line.

Examples:
    python -m pretrain.generate runs/demo --prompt "The state of our Union is" --greedy
    python -m pretrain.generate runs/demo/checkpoints/step-000400 --prompts-file prompts.txt \\
        --temperature 0.8 --top-p 0.95 --seed 1 --max-new-tokens 60

Exit status: 0 done; 2 a mistake (a missing, empty or damaged checkpoint, a tokenizer that does not match,
an empty prompt, a bad sampling value), said in one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from conf.errors import one_line

if TYPE_CHECKING:   # heavy imports wait until the options are checked
    from sentencepiece import SentencePieceProcessor

    import torch

    from model.inference import Sampling
    from model.mor import MoRModel
    from pretrain.checkpoint.consolidate import CheckpointInfo

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

CONTEXT_PIECES = 16   # prompt tokens decoded before a continuation so that its first piece gets its space right


@dataclass
class Generator:
    """A run's model and tokenizer, ready to complete prompts (``open_generator``)."""
    model: MoRModel            # on its device, eval mode
    sp: SentencePieceProcessor
    eos_id: Optional[int]
    doc_start: Optional[int]   # the token put before each prompt (BOS or EOS, as documents start in the data)
    description: str           # what was loaded, in one line

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len


# ---- arguments ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.generate", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", type=Path,
                   help="a run folder (runs/NAME) or one of its checkpoints (runs/NAME/checkpoints/step-NNNNNN)")
    g = p.add_argument_group("prompts (one or more)")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for several")
    g.add_argument("--prompts-file", type=Path, metavar="FILE",
                   help="a UTF-8 file with one prompt per line (blank lines are skipped)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="at most N new tokens (default 100)")
    s.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="divide the logits by this before sampling; 0 = greedy (default 1.0)")
    s.add_argument("--greedy", action="store_true", help="always the most likely token (= --temperature 0)")
    s.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample among the most likely tokens whose probabilities reach P, in (0, 1] (default 1)")
    s.add_argument("--seed", type=int, default=None, help="seed of the sampling: the same seed, the same text")
    r = p.add_argument_group("model")
    r.add_argument("--tokenizer", type=Path, metavar="PATH", help="a SentencePiece .model instead of the run's")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu (default auto)")
    r.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights and activations; auto: bf16 on cuda, fp32 on cpu (default auto)")
    r.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="prompts generated together (default 8)")
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    from conf.errors import ConfigError
    prompts = list(args.prompt)
    for i, text in enumerate(prompts, 1):
        if not text.strip():
            raise ConfigError(f"--prompt: prompt {i} is empty; give some text to continue")
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts-file: {args.prompts_file}: cannot read it "
                              f"({getattr(e, 'strerror', None) or e})") from None
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise ConfigError(f"--prompts-file: {args.prompts_file} holds no prompt (only blank lines)")
        prompts += from_file
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def sampling_of(args: argparse.Namespace) -> Sampling:
    """The Sampling the options ask for; ConfigError (one line) for values it cannot take."""
    from conf.errors import ConfigError
    from model.inference import Sampling
    if args.greedy and args.temperature not in (None, 0.0):
        raise ConfigError(f"--greedy and --temperature {args.temperature} disagree; give one of them")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    temperature = 0.0 if args.greedy else (1.0 if args.temperature is None else args.temperature)
    try:   # Sampling checks its values (NaN and infinity included) as it is made
        return Sampling(temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:   # "top_p must be in (0, 1], got 1.5": name the option as the user typed it
        option = str(e).split(" ", 1)[0].replace("_", "-")
        raise ConfigError(f"--{option}: {str(e).split(' ', 1)[1]}") from None


# ---- loading --------------------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    import torch

    from conf.errors import ConfigError
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu (or auto)")
    return torch.device(name)


def _tokenizer(info: CheckpointInfo, override: Optional[Path]) -> tuple[SentencePieceProcessor, Path]:
    """The SentencePiece model to use, checked against the run: (processor, path). ConfigError otherwise."""
    import sentencepiece as spm

    from conf.errors import ConfigError
    from data_prep.shards import sha256_file
    path = override or info.tokenizer.path
    if path is None:
        raise ConfigError(f"{info.path}: cannot find the run's tokenizer ({info.tokenizer.why}); "
                          "pass --tokenizer PATH")
    where = "--tokenizer" if override else "tokenizer"
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{where} {path}: not a readable SentencePiece model "
                          f"({one_line(e, 120, name=False)})") from None
    vocab = info.run.model.vocab_size
    if sp.get_piece_size() > vocab:
        raise ConfigError(f"{where} {path}: {sp.get_piece_size()} pieces, more than the model's vocabulary "
                          f"({vocab}); it is not the tokenizer the run was trained with")
    want, got = info.tokenizer.sha256, sha256_file(path)
    if want is not None and got != want:
        raise ConfigError(f"{where} {path}: sha256 {got[:16]}… differs from the run's tokenizer ({str(want)[:16]}…, "
                          f"recorded in {info.path / 'trainer.pt'}); use the tokenizer the run was trained with")
    return sp, path


def open_generator(path: Path, *, tokenizer: Optional[Path] = None, device: str = "auto", dtype: str = "auto",
                   say: Callable[[str], None] = lambda line: None) -> Generator:
    """The run or checkpoint at ``path`` with its tokenizer, on ``device`` in ``dtype``. The checkpoint and the
    tokenizer are checked before any weight is read. Raises ConfigError (one line) for every mistake."""
    import torch

    from conf.errors import ConfigError
    from model.layers import use_attention_backend
    from pretrain.checkpoint.consolidate import load_model, open_checkpoint
    from pretrain.checkpoint.verify import CheckpointError
    from pretrain.config import computes_in_bf16
    dev = _device(device)
    try:
        info = open_checkpoint(path)
        for note in info.notes:
            say(f"checkpoint: {note}")
        sp, tok_path = _tokenizer(info, tokenizer)
        loaded = load_model(info)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    for warning in loaded.warnings:
        say(f"warning: {warning}")
    bf16 = computes_in_bf16(dtype, dev)
    model = loaded.model.to(device=dev, dtype=torch.bfloat16 if bf16 else torch.float32)
    backend = use_attention_backend(model, dev)
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    doc_start = bos if info.tokenizer.bos and bos is not None else eos
    description = (f"{info.path} (step {info.step}, saved as {loaded.layout}; {info.run.model.name}), tokenizer "
                   f"{tok_path}; {dev.type}, {'bf16' if bf16 else 'fp32'}, attention {backend}")
    return Generator(model, sp, eos, doc_start, description)


# ---- text, as it is made --------------------------------------------------------------------------------------------
class TextStream:
    """One sequence's continuation as text, token by token: each ``push`` returns the text that became final.

    SentencePiece puts a word's space in its first piece, and a character split over byte pieces decodes to
    U+FFFD until its last byte has come: so the continuation is decoded after the prompt's last pieces, and text
    is only handed out once no later piece can change it."""

    def __init__(self, sp: SentencePieceProcessor, prompt_ids: Sequence[int]):
        self.sp, self.context = sp, list(prompt_ids[-CONTEXT_PIECES:])
        self.base = sp.decode(self.context)
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        full = self.sp.decode(self.context + self.ids)
        return full[len(self.base):] if full.startswith(self.base) else self.sp.decode(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        stable = self.text().rstrip("\ufffd")
        if not stable.startswith(self.sent):   # an earlier piece read differently now: wait for the end
            return ""
        new, self.sent = stable[len(self.sent):], stable
        return new

    def finish(self) -> str:
        """The rest of the text (what ``push`` held back)."""
        text = self.text()
        rest = text[len(self.sent):] if text.startswith(self.sent) else text
        self.sent = text
        return rest


def encode_prompts(gen: Generator, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, after the document-start token. ConfigError for a prompt that encodes to no
    token or does not fit the model's context."""
    from conf.errors import ConfigError
    out = []
    for i, text in enumerate(prompts, 1):
        ids = gen.sp.encode(text)
        if not ids:
            raise ConfigError(f"prompt {i} ({text[:40]!r}) encodes to no token; give some text to continue")
        ids = ([gen.doc_start] if gen.doc_start is not None else []) + ids
        if len(ids) >= gen.max_seq_len:
            raise ConfigError(f"prompt {i} is {len(ids)} tokens; the model reads at most max_seq_len="
                              f"{gen.max_seq_len}, and needs room for one more: shorten it")
        out.append(ids)
    return out


def complete(gen: Generator, prompts: Sequence[str], max_new_tokens: int, sampling: Sampling, *,
             on_text: Optional[Callable[[int, str], None]] = None,
             on_done: Optional[Callable[[int, str], None]] = None) -> list[str]:
    """The continuation of each prompt (text, EOS not included). ``on_text(i, piece)``: text of prompt ``i`` as it
    becomes final; ``on_done(i, text)``: prompt ``i``'s whole continuation, as soon as it has finished."""
    from model.inference import generate
    ids = encode_prompts(gen, prompts)
    streams = [TextStream(gen.sp, p) for p in ids]
    done = [False] * len(prompts)

    def finished(i: int) -> None:
        rest = streams[i].finish()
        if on_text is not None and rest:
            on_text(i, rest)
        done[i] = True
        if on_done is not None:
            on_done(i, streams[i].sent)

    def token(i: int, tok: int) -> None:
        piece = streams[i].push(tok)
        if on_text is not None and piece:
            on_text(i, piece)
        if tok == gen.eos_id:
            finished(i)

    generate(gen.model, ids, max_new_tokens, sampling=sampling, eos_id=gen.eos_id, on_token=token)
    for i in range(len(prompts)):
        if not done[i]:
            finished(i)
    return [s.sent for s in streams]


# ---- the command ----------------------------------------------------------------------------------------------------
def _print_completions(gen: Generator, prompts: list[str], sampling: Sampling, args: argparse.Namespace) -> None:
    out = sys.stdout
    if len(prompts) == 1:   # the prompt, then its continuation as it comes
        out.write(prompts[0])
        out.flush()
        complete(gen, prompts, args.max_new_tokens, sampling,
                 on_text=lambda i, piece: (out.write(piece), out.flush()))
        out.write("\n")
        return
    for start in range(0, len(prompts), args.batch_size):   # each completion whole, as soon as it has ended
        chunk = prompts[start:start + args.batch_size]
        complete(gen, chunk, args.max_new_tokens, sampling,
                 on_done=lambda i, text: (out.write(f"[{start + i + 1}] {chunk[i]}{text}\n"), out.flush()))


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from conf import cli_errors
    with cli_errors():   # mistakes in the options first, before anything is loaded
        prompts = _prompts(args)
        sampling = sampling_of(args)
        gen = open_generator(args.path, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                             say=lambda line: print(line, file=sys.stderr, flush=True))
        encode_prompts(gen, prompts)   # every prompt fits, before any output
        print(f"loaded {gen.description}", file=sys.stderr, flush=True)
        if sampling.seed is None:
            import torch
            torch.seed()   # starting megatron's world seeded the RNG with a constant: no --seed means any seed
        try:
            _print_completions(gen, prompts, sampling, args)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:   # the reader went away (| head): nothing left to say to it
            sys.stdout = None
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
