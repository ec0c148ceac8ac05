"""C3PO's cost over plain evaluation, measured through lm-eval's ``simple_evaluate`` in one process.

An OLMoE-shaped random model (16 layers, 64 experts, top-8; a small hidden size, or
OLMoE-1B-7B's whole config with ``--shape olmoe-1b-7b`` on a GPU),
a synthetic 4-choice task and a reference store built from a disjoint
synthetic set. Each configuration evaluates the same task with the same
``batch_size``; seconds and ratios to ``--model hf`` are printed and written:

    hf            lm-eval's HFLM
    base          --model c3po method=base (no hooks: must cost what hf costs)
    mode_finding  retrieval + mean shift in pathway space
    kernel_regression  retrieval + the 11-candidate alpha grid on the neighbourhood loss
    ngd           retrieval + 10 NGD steps on the neighbourhood loss (prefix-cached loss)
    ngd_naive     the same NGD on the reference scorer (FullRowScorer: the full model per call)

Targets (ratios to hf, 2 CPU cores): ngd <= 3.0 (stretch 2.0), kernel_regression
<= 1.5, mode_finding <= 1.3, base <= 1.05, ngd_naive / ngd >= 5. Per run it also
reports the time inside ``lm.loglikelihood`` ("model s": without simple_evaluate's
fixed task set-up, which flatters small runs) and where C3PO's time goes: "embed s"
(the sentence embedder), "remix s" (retrieval and the method, embedding included)
and "score s" (the rest: each context's own-pathway pass and the scoring of its
choices), so the figures can be read for real model sizes, where the fixed-size
sentence embedder is negligible next to the LM. Peak RSS is per run
(``/proc/self/clear_refs``).

``--answers letters`` switches to MMLU-style items (options listed in the
question, one answer token per choice), where the neighbourhood loss costs
little next to the neighbours' context passes. ``--repeats N`` rounds through
the configs N times and keeps each one's median run (CPU timings drift by
several percent between runs).

    python benchmarks/overhead.py --questions 300 --hidden 128 --out overhead.json
    python benchmarks/overhead.py --questions 300 --hidden 128 --answers letters --repeats 3
    python benchmarks/overhead.py --questions 40 --hidden 128 --configs hf,ngd,ngd_naive   # a quick look
    python benchmarks/overhead.py --device cuda --shape olmoe-1b-7b --configs hf,base,kernel_regression,ngd
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _memory import reset_peak_rss, rss_mib  # noqa: E402

from lm_eval_c3po.remix import C3POConfig  # noqa: E402
from lm_eval_c3po.testing import make_tiny_model, make_tokenizer, write_mc_task  # noqa: E402

CONFIGS = ("hf", "base", "mode_finding", "kernel_regression", "ngd", "ngd_naive")
TARGETS = {"base": 1.05, "mode_finding": 1.3, "kernel_regression": 1.5, "ngd": 3.0}
TASK = "c3po_overhead_mc"
REF_TASK = "c3po_overhead_ref"
_WORDS = ("quick brown fox jumps over lazy dog capital France Paris mammal whale shark trout salmon sun rises "
          "east sets west water boils hundred degrees people spoon eat soup knife cut bread book shelf heavy "
          "question answer which these true false yes no").split()


def synthetic_docs(n: int, seed: int, answers: str = "words") -> list[dict]:
    """4-choice questions over the offline tokenizer's corpus words (so tokens stay few).

    ``answers="words"``: each choice is 1-3 words, scored as its own continuation
    (ARC / HellaSwag / PIQA style: several answer tokens per choice).
    ``answers="letters"``: the options are listed in the question and the
    choices are the letters A-D (MMLU style: one answer token per choice).
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        question = " ".join(rng.choices(_WORDS, k=rng.randint(8, 24))).capitalize() + "?"
        choices = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 3))) for _ in range(4)]
        if answers == "letters":
            question += "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", choices))
            choices = list("ABCD")
        docs.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    return docs


SHAPES = ("small", "olmoe-1b-7b")


def model_shape(shape: str, hidden: int, vocab: int) -> dict:
    """Config overrides of an OLMoE model: ``small`` is OLMoE-1B-7B's routing (16 layers, 64 experts,
    top-8) at ``hidden`` (minutes on a CPU); ``olmoe-1b-7b`` is allenai/OLMoE-1B-7B-0924's whole
    config (6.9B parameters, its 50304-token head), for a GPU."""
    routing = dict(num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, initializer_range=0.02)
    if shape == "olmoe-1b-7b":
        return dict(routing, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=max(vocab, 50304), max_position_embeddings=4096)
    heads = max(1, hidden // 32)
    return dict(routing, hidden_size=hidden, intermediate_size=hidden // 2, num_attention_heads=heads,
                num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=1024)


def save_model(path: Path, shape: dict, tokenizer, device: str, dtype: str, seed: int = 0) -> Path:
    """A random OLMoE model of ``shape`` with ``tokenizer``, initialised on ``device`` (a 7B model
    initialises in seconds on a GPU) and saved in ``dtype``."""
    with torch.device(device):
        model = make_tiny_model("olmoe", seed=seed, **shape)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_store(model_dir: Path, task_dir: Path, out: Path, args) -> Path:
    """A store of every reference doc (``--keep all``: a random model's accuracy would leave too few)."""
    from lm_eval_c3po.cli import main

    code = main(["build-reference", "--model", str(model_dir), "--model_args", f"dtype={args.dtype}",
                 "--device", args.device, "--batch_size", str(args.batch_size), "--tasks", REF_TASK,
                 "--include_path", str(task_dir), "--keep", "all", "--out", str(out)])
    if code:
        raise SystemExit(f"building the reference store failed (exit {code})")
    return out


@contextmanager
def _naive_neighbourhood_loss(remixer):
    """NGD's neighbourhood loss on the reference scorer (the full model per call), same examples and weights."""
    from lm_eval_c3po.score import ChoiceLoss, FullRowScorer

    real = remixer.neighbourhood_loss

    def naive(neighbours, weights):
        cached = real(neighbours, weights)
        scorer = FullRowScorer(remixer.model, remixer.routing, remixer.layer_ids, remixer.config.tokens,
                               cached.examples, remixer.max_length)
        return ChoiceLoss(cached.examples, cached.weights, scorer)

    remixer.neighbourhood_loss = naive
    try:
        yield
    finally:
        del remixer.neighbourhood_loss


@contextmanager
def _timed(obj, name: str, into: dict, key: str):
    """Accumulate the seconds spent in ``obj.name`` into ``into[key]``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - start

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, original)


def make_lm(config: str, model_dir: Path, store: Path, args):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_c3po.lm_eval_model import C3POLM

    common = dict(pretrained=str(model_dir), device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if config == "hf":
        return HFLM(**common)
    method = "ngd" if config == "ngd_naive" else config
    extra = {} if method == "base" else {"reference": str(store), "remix_batch_size": args.remix_batch_size}
    return C3POLM(**common, method=method, **extra)


def run_one(config: str, model_dir: Path, store: Path, task_dir: Path, args) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    lm = make_lm(config, model_dir, store, args)
    setup_s = time.perf_counter() - start
    parts: dict[str, float] = {}
    remixer = getattr(lm, "_remixer", None)
    patches = [_timed(lm, "loglikelihood", parts, "loglikelihood_s")]
    if remixer is not None:
        patches += [_timed(remixer, "_remix", parts, "remix_s"),
                    _timed(remixer.retriever.embedder, "encode", parts, "embed_s")]
    if config == "ngd_naive":
        patches.append(_naive_neighbourhood_loss(remixer))
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                              batch_size=args.batch_size, bootstrap_iters=0, log_samples=False,
                              limit=args.questions)
        seconds = time.perf_counter() - start
    figures = {"seconds": round(seconds, 3), "setup_s": round(setup_s, 3),
               "acc": round(out["results"][TASK]["acc,none"], 4),
               **{k: round(v, 3) for k, v in parts.items()}, **rss_mib()}
    if remixer is not None:
        figures["scoring_s"] = round(figures["loglikelihood_s"] - figures.get("remix_s", 0.0), 3)
        figures["neighbours_prepared"] = remixer.loss_cache.prepared
    if args.device.startswith("cuda"):
        figures["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del lm
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300, help="test questions (default 300)")
    parser.add_argument("--references", type=int, help="reference questions (default 2 x questions)")
    parser.add_argument("--shape", choices=SHAPES, default="small",
                        help="small: OLMoE-1B-7B's routing at --hidden (default); olmoe-1b-7b: its whole config "
                             "(6.9B parameters: for a GPU)")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden size of the small shape (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval batch_size, the same for every run")
    parser.add_argument("--remix-batch-size", type=int, default=C3POConfig.remix_batch_size,
                        help=f"test contexts re-mixed together (c3po's remix_batch_size, default "
                             f"{C3POConfig.remix_batch_size})")
    parser.add_argument("--answers", choices=("words", "letters"), default="words",
                        help="words: 1-3 word choices, several answer tokens each (default); letters: MMLU-style "
                             "options in the question, one answer token per choice")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds through the configs; each figure comes from the run of median seconds")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown or "hf" not in configs:
        parser.error(f"--configs must include hf and name only {CONFIGS}; got {configs}")

    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    references = args.references or 2 * args.questions
    with tempfile.TemporaryDirectory(prefix="c3po_overhead_") as tmp:
        tmp = Path(tmp)
        tokenizer = make_tokenizer()
        shape = model_shape(args.shape, args.hidden, len(tokenizer))
        model_dir = save_model(tmp / "model", shape, tokenizer, args.device, args.dtype)
        write_mc_task(tmp / "tasks", TASK, synthetic_docs(args.questions, seed=1, answers=args.answers))
        write_mc_task(tmp / "tasks", REF_TASK, synthetic_docs(references, seed=2, answers=args.answers))
        start = time.perf_counter()
        store = build_store(model_dir, tmp / "tasks", tmp / "store", args)
        store_s = time.perf_counter() - start
        run_one("hf", model_dir, store, tmp / "tasks", args)  # warm-up: imports, dataset cache, kernels
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):  # rounds through every config, so slow drifts of the machine hit all alike
            for c in configs:
                runs[c].append(run_one(c, model_dir, store, tmp / "tasks", args))
        results = {c: _median_run(r) for c, r in runs.items()}

    hf, hf_model = results["hf"]["seconds"], results["hf"]["loglikelihood_s"]
    for figures in results.values():
        figures["ratio_to_hf"] = round(figures["seconds"] / hf, 3)
        # lm.loglikelihood only: without simple_evaluate's fixed task/dataset set-up, which flatters small runs
        figures["model_ratio_to_hf"] = round(figures["loglikelihood_s"] / hf_model, 3)
    summary = {
        "setup": {"questions": args.questions, "answers": args.answers, "references": references,
                  "shape": args.shape, **{k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                                "num_experts_per_tok", "vocab_size")},
                  "batch_size": args.batch_size, "device": args.device,
                  "dtype": args.dtype, "threads": args.threads, "remix_batch_size": args.remix_batch_size,
                  "repeats": args.repeats, "store_build_s": round(store_s, 2),
                  "torch": torch.__version__},
        "runs": results,
    }
    if "ngd" in results and "ngd_naive" in results:
        summary["naive_over_cached_ngd"] = round(results["ngd_naive"]["seconds"] / results["ngd"]["seconds"], 2)
    summary["targets_met"] = {f"{c}<={t}x": results[c]["ratio_to_hf"] <= t for c, t in TARGETS.items()
                              if c in results}
    if "naive_over_cached_ngd" in summary:
        summary["targets_met"]["naive/ngd>=5x"] = summary["naive_over_cached_ngd"] >= 5
    _print(summary)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one for an even count), with every run's seconds."""
    ordered = sorted(runs, key=lambda f: f["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "seconds_all": [f["seconds"] for f in runs]}


def _print(summary: dict) -> None:
    print(json.dumps(summary["setup"]))
    head = (f"{'config':<18}{'seconds':>9}{'x hf':>7}{'model s':>9}{'x hf':>7}{'acc':>7}{'embed s':>9}"
            f"{'remix s':>9}{'score s':>9}{'peak MiB':>10}")
    print(head)
    for name, f in summary["runs"].items():
        print(f"{name:<18}{f['seconds']:>9.2f}{f['ratio_to_hf']:>7.2f}{f['loglikelihood_s']:>9.2f}"
              f"{f['model_ratio_to_hf']:>7.2f}{f['acc']:>7.3f}"
              f"{f.get('embed_s', 0):>9.2f}{f.get('remix_s', 0):>9.2f}{f.get('scoring_s', f['seconds']):>9.2f}"
              f"{f['peak_rss_mib']:>10.0f}")
    if "naive_over_cached_ngd" in summary:
        print(f"naive / cached NGD: {summary['naive_over_cached_ngd']:.2f}x")
    print("targets:", json.dumps(summary["targets_met"]))


if __name__ == "__main__":
    sys.exit(main())
