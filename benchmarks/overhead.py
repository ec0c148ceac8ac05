"""C3PO's cost over plain evaluation, measured through lm-eval's ``simple_evaluate`` in one process.

An OLMoE-shaped random model (16 layers, 64 experts, top-8; a small hidden size, or
OLMoE-1B-7B's whole config with ``--shape olmoe-1b-7b``),
a synthetic 4-choice task and a reference store built from a disjoint
synthetic set. Each configuration evaluates the same task with the same
``batch_size``; seconds and ratios to ``--model hf`` are printed and written:

    hf            lm-eval's HFLM
    base          --model c3po method=base (no hooks: must cost what hf costs)
    mode_finding  retrieval + mean shift in pathway space
    kernel_regression  retrieval + the 11-candidate alpha grid on the neighbourhood loss
    ngd           retrieval + 10 NGD steps on the neighbourhood loss (prefix-cached loss)
    ngd_naive     the same NGD on the reference scorer (FullRowScorer: the full model per call)

and, selectable with ``--configs``, the cheaper options beside their defaults:

    kernel_regression_gold  kernel_regression with loss=gold (only the neighbours' gold answers scored)
    ngd_gold      ngd with loss=gold
    ngd_step      ngd with schedule=step (the paper's step decay; the same 10 steps, so the same work)
    ngd_tol       ngd with tol=1e-3 (see NGD_TOL: a remix batch stops once all its contexts have converged)

The reference set is ``--references`` questions, by default 10 per test
question. The paper's sets give about 3.4:1 on ARC (4,000 references for 1,172
questions) and 6.5:1 on PIQA (12,000 for 1,838); 10:1 is the conservative
choice, since the more references per question, the fewer neighbours the test
questions share, and each distinct neighbour is prepared once.

The headline figure is "model s", the time inside ``lm.loglikelihood``, and
its ratio to hf (the wall time of ``simple_evaluate`` beside it also holds the
fixed task set-up, which flatters small runs). Where C3PO's time goes: "embed s"
(the sentence embedder), "remix s" (retrieval and the method, embedding
included) and "score s" (the rest: each context's own-pathway pass and the
scoring of its choices), so the figures can be read for real model sizes,
where the fixed-size sentence embedder is negligible next to the LM. Memory
per run: "anon MiB" is the peak anonymous resident memory (``RssAnon``,
sampled; not RSS, which also counts the safetensors pages the loader keeps
mapped) from the model's load to the end of the evaluation, "+ run" its rise
over the model just loaded (activations, the optimisation batch, the store);
the JSON also has peak RSS and, on a GPU, peak CUDA memory. "est MiB" is the
largest optimisation part's estimated bytes
(:mod:`lm_eval_c3po.score.footprint`) and "parts" the parts the remix batches
ran in under ``--remix-memory`` (c3po's ``remix_memory``: parts/batches);
"LRU MiB" is what the prepared-prefix LRU held at the end of the run (byte-bounded
on its own, outside ``remix_memory``; it only grows until its cap).

Counted work (:class:`~lm_eval_c3po.score.cost.CostMeter`): decoder
token-layer evaluations, i.e. for every call of a decoder layer, the rows x
width of its input (padding included, since it is computed; the embedding,
final norm, LM head and sentence embedder are not counted). The benchmark's
own meter counts every decoder-layer call during ``simple_evaluate``; a
c3po run's Remixer meter splits off "neighbours" (preparing the neighbours:
their prefixes, and their answer tries through the first critical layer) and
"optimisation" forward and backward (the loss calls: the layers after the
first critical one over the answer tries; a grad-enabled forward's token-layers
are counted once more as backward). "own" is the rest: the test contexts' own
passes and the scoring of their choices (hf: all of its work). Per question,
the benchmark prints these counts, their forward equivalents (backward
weighted 2x, ``BACKWARD_WEIGHT``: an upper estimate, as the weights are
frozen), "us/tl" (model s per forward-equivalent token-layer, microseconds)
and "x floor": model s over the floor, where the floor is the run's counted
work x hf's measured seconds per token-layer (what the work would take at
hf's efficiency; retrieval and the embedder count as overhead above it).

Targets (model-time ratios to hf): base <= 1.05, mode_finding <= 1.0,
kernel_regression_gold <= 1.6, ngd_gold <= 2.5, every prefix-cached method
(mode_finding, kernel_regression*, ngd except ngd_naive) <= 1.3x its floor,
ngd_naive / ngd >= 5 (model time).

``--answers letters`` switches to MMLU-style items (options listed in the
question, one answer token per choice), where the neighbourhood loss costs
little next to the neighbours' context passes. ``--repeats N`` rounds through
the configs N times and keeps each one's run of median model s (CPU timings drift by
several percent between runs).

    python benchmarks/overhead.py --questions 300 --hidden 128 --threads 1 --out overhead.json \
        --configs hf,base,mode_finding,kernel_regression,ngd,kernel_regression_gold,ngd_gold,ngd_step,ngd_tol
    python benchmarks/overhead.py --questions 300 --hidden 128 --answers letters --repeats 3
    python benchmarks/overhead.py --questions 40 --hidden 128 --configs hf,ngd,ngd_naive   # a quick look
    python benchmarks/overhead.py --device cuda --shape olmoe-1b-7b --configs hf,base,kernel_regression,ngd
    python benchmarks/overhead.py --shape olmoe-1b-7b --dtype bfloat16 --questions 8 --batch-size 4 \
        --configs hf,base,kernel_regression,ngd   # real size on a CPU with AVX512-bf16
    python benchmarks/overhead.py --shape olmoe-1b-7b --dtype bfloat16 --questions 8 --batch-size 4 \
        --configs hf,kernel_regression,ngd --remix-memory 256MiB   # the same with the batch split
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _memory import AnonPeak, anon_mib, reset_peak_rss, rss_mib  # noqa: E402

from lm_eval_c3po.remix import C3POConfig  # noqa: E402
from lm_eval_c3po.score.cost import PHASES, CostMeter, forward_equivalents
from lm_eval_c3po.testing import make_tiny_model, make_tokenizer, write_mc_task  # noqa: E402

# tol for ngd_tol, in nats of the neighbourhood loss: a step that moves it by at most 1e-3 changes the
# neighbours' weighted gold probability by about 0.1% relative, too little to expect later steps to flip a
# choice. It saves work only once every context of a remix batch has stopped (the loss runs batch-wide).
NGD_TOL = 1e-3
# c3po model_args per configuration (hf is lm-eval's HFLM)
C3PO_ARGS = {
    "base": {"method": "base"},
    "mode_finding": {"method": "mode_finding"},
    "kernel_regression": {"method": "kernel_regression"},
    "ngd": {"method": "ngd"},
    "ngd_naive": {"method": "ngd"},
    "kernel_regression_gold": {"method": "kernel_regression", "loss": "gold"},
    "ngd_gold": {"method": "ngd", "loss": "gold"},
    "ngd_step": {"method": "ngd", "schedule": "step"},
    "ngd_tol": {"method": "ngd", "tol": NGD_TOL},
}
CONFIGS = ("hf", *C3PO_ARGS)
DEFAULT_CONFIGS = ("hf", "base", "mode_finding", "kernel_regression", "ngd", "ngd_naive")
TARGETS = {"base": 1.05, "mode_finding": 1.0, "kernel_regression_gold": 1.6, "ngd_gold": 2.5}
FLOOR_TARGET = 1.3  # model s / counted floor, for the prefix-cached methods
REFERENCES_PER_QUESTION = 10
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
    config (6.9B parameters, its 50304-token head): a GPU, or a CPU in bfloat16 for a few questions."""
    routing = dict(num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, initializer_range=0.02)
    if shape == "olmoe-1b-7b":
        return dict(routing, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=max(vocab, 50304), max_position_embeddings=4096)
    heads = max(1, hidden // 32)
    return dict(routing, hidden_size=hidden, intermediate_size=hidden // 2, num_attention_heads=heads,
                num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=1024)


def save_model(path: Path, shape: dict, tokenizer, device: str, dtype: str, seed: int = 0) -> Path:
    """A random OLMoE model of ``shape`` with ``tokenizer``, built in ``dtype`` on ``device`` (a 7B model
    initialises in seconds on a GPU, in about a minute on a CPU) and saved."""
    with torch.device(device):
        model = make_tiny_model("olmoe", seed=seed, dtype=getattr(torch, dtype), **shape)
    model.save_pretrained(path)
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
    gc.collect()  # the builder's model, before the runs load theirs
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


@contextmanager
def _collected(meter: CostMeter, into: Counter):
    """Add every count taken from ``meter`` into ``into`` (the Remixer takes its counts per remix batch)."""
    original = meter.take

    def take() -> dict[str, int]:
        counts = original()
        into.update(counts)
        return counts

    meter.take = take
    try:
        yield
    finally:
        del meter.take


def work_split(total: int, remixed: Mapping[str, int]) -> dict[str, int]:
    """A run's decoder token-layer evaluations by phase: the Remixer's neighbour and optimisation counts, and
    the rest of ``total`` (every decoder-layer call of the run) as own work, because the Remixer's own count
    misses lm-eval's scoring batches where it cannot score from its own capture."""
    split = {phase: int(remixed.get(phase, 0)) for phase in PHASES}
    split["own"] = total - split["neighbours"] - split["optimisation_forward"]
    return split


def work_figures(counts: Mapping[str, int], questions: int, model_s: float,
                 hf_s_per_token_layer: float) -> dict:
    """Counted work per question and how far the measured model time is above what that work takes at hf's
    speed (the floor: forward-equivalent token-layers x hf's seconds per token-layer)."""
    work = forward_equivalents(counts)
    floor_s = work * hf_s_per_token_layer
    return {"work_per_question": {phase: round(counts[phase] / questions, 1) for phase in PHASES},
            "forward_equivalents_per_question": round(work / questions, 1),
            "us_per_token_layer": round(model_s / work * 1e6, 4),
            "floor_s": round(floor_s, 3), "floor_ratio": round(model_s / floor_s, 3)}


def make_lm(config: str, model_dir: Path, store: Path, args):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_c3po.lm_eval_model import C3POLM

    common = dict(pretrained=str(model_dir), device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if config == "hf":
        return HFLM(**common)
    options = C3PO_ARGS[config]
    extra = {} if options["method"] == "base" else {"reference": str(store), "remix_batch_size": args.remix_batch_size,
                                                     "remix_memory": args.remix_memory}
    return C3POLM(**common, **options, **extra)


def run_one(config: str, model_dir: Path, store: Path, task_dir: Path, args) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with ExitStack() as stack:
        anon = stack.enter_context(AnonPeak())  # the model's load included: "loaded_anon_mib" is after it
        start = time.perf_counter()
        lm = make_lm(config, model_dir, store, args)
        setup_s = time.perf_counter() - start
        loaded_anon = anon_mib()
        parts: dict[str, float] = {}
        remixer = getattr(lm, "_remixer", None)
        meter, remixed = CostMeter(lm.model), Counter()
        patches = [_timed(lm, "loglikelihood", parts, "loglikelihood_s"), meter.phase("own")]
        if remixer is not None:
            patches += [_timed(remixer, "_remix", parts, "remix_s"),
                        _timed(remixer.retriever.embedder, "encode_queries", parts, "embed_s"),
                        _collected(remixer.cost, remixed)]
        if config == "ngd_naive":
            patches.append(_naive_neighbourhood_loss(remixer))
        for patch in patches:
            stack.enter_context(patch)
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                              batch_size=args.batch_size, bootstrap_iters=0, log_samples=False,
                              limit=args.questions)
        seconds = time.perf_counter() - start
    meter.close()
    figures = {"seconds": round(seconds, 3), "setup_s": round(setup_s, 3),
               "acc": round(out["results"][TASK]["acc,none"], 4),
               **{k: round(v, 3) for k, v in parts.items()}, **rss_mib(),
               "loaded_anon_mib": loaded_anon, "peak_anon_mib": anon.peak_mib,
               "token_layers": work_split(meter.take()["own"], remixed)}
    if remixer is not None:
        figures["scoring_s"] = round(figures["loglikelihood_s"] - figures.get("remix_s", 0.0), 3)
        figures["neighbours_prepared"] = remixer.loss_cache.prepared
        figures["remix_batches"], figures["remix_parts"] = remixer.split.batches, remixer.split.parts
        figures["estimated_part_mib"] = round(remixer.split.largest_part_bytes / 2**20, 1)
        figures["prefix_cache_mib"] = round(remixer.loss_cache.nbytes / 2**20, 1)
    if args.device.startswith("cuda"):
        figures["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


def run_and_free(config: str, model_dir: Path, store: Path, task_dir: Path, args) -> dict:
    """:func:`run_one`, then its model freed before the next config loads its own copy (the LM and its
    Remixer reference each other, so only a collection frees them; at full size two copies do not fit)."""
    figures = run_one(config, model_dir, store, task_dir, args)
    gc.collect()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300, help="test questions (default 300)")
    parser.add_argument("--references", type=int,
                        help=f"reference questions (default {REFERENCES_PER_QUESTION} x questions: the paper's sets "
                             "give about 3.4:1 on ARC, 4,000 / 1,172, and 6.5:1 on PIQA, 12,000 / 1,838; 10:1 is "
                             "the conservative choice, with fewer neighbours shared between questions)")
    parser.add_argument("--shape", choices=SHAPES, default="small",
                        help="small: OLMoE-1B-7B's routing at --hidden (default); olmoe-1b-7b: its whole config "
                             "(6.9B parameters: a GPU, or --dtype bfloat16 on a CPU for a few questions)")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden size of the small shape (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval batch_size, the same for every run")
    parser.add_argument("--remix-batch-size", type=int, default=C3POConfig.remix_batch_size,
                        help=f"test contexts re-mixed together (c3po's remix_batch_size, default "
                             f"{C3POConfig.remix_batch_size})")
    parser.add_argument("--remix-memory", default=C3POConfig.remix_memory,
                        help="c3po's remix_memory, the byte budget of one optimisation part (default auto: half "
                             "of the device's free memory at each remix batch; e.g. 512MiB)")
    parser.add_argument("--answers", choices=("words", "letters"), default="words",
                        help="words: 1-3 word choices, several answer tokens each (default); letters: MMLU-style "
                             "options in the question, one answer token per choice")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="model dtype (default auto: bfloat16 on a GPU, float32 on a CPU; bfloat16 runs on CPUs "
                             "with AVX512-bf16 or AMX)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated subset of {CONFIGS} (default {','.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds through the configs; each figure comes from the run of median model s")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown or "hf" not in configs:
        parser.error(f"--configs must include hf and name only {CONFIGS}; got {configs}")

    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    references = args.references or REFERENCES_PER_QUESTION * args.questions
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
        run_and_free("hf", model_dir, store, tmp / "tasks", args)  # warm-up: imports, dataset cache, kernels
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):  # rounds through every config, so slow drifts of the machine hit all alike
            for c in configs:
                runs[c].append(run_and_free(c, model_dir, store, tmp / "tasks", args))
        results = {c: _median_run(r) for c, r in runs.items()}

    hf, hf_model = results["hf"]["seconds"], results["hf"]["loglikelihood_s"]
    hf_s_per_token_layer = hf_model / forward_equivalents(results["hf"]["token_layers"])
    for figures in results.values():
        figures["ratio_to_hf"] = round(figures["seconds"] / hf, 3)
        # lm.loglikelihood only: without simple_evaluate's fixed task/dataset set-up, which flatters small runs
        figures["model_ratio_to_hf"] = round(figures["loglikelihood_s"] / hf_model, 3)
        figures.update(work_figures(figures["token_layers"], args.questions, figures["loglikelihood_s"],
                                    hf_s_per_token_layer))
    summary = {
        "setup": {"questions": args.questions, "answers": args.answers, "references": references,
                  "shape": args.shape, **{k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                                "num_experts_per_tok", "vocab_size")},
                  "batch_size": args.batch_size, "device": args.device,
                  "dtype": args.dtype, "threads": args.threads, "remix_batch_size": args.remix_batch_size,
                  "remix_memory": args.remix_memory, "repeats": args.repeats, "store_build_s": round(store_s, 2),
                  "torch": torch.__version__},
        "runs": results,
    }
    if "ngd" in results and "ngd_naive" in results:
        summary["naive_over_cached_ngd"] = round(results["ngd_naive"]["loglikelihood_s"]
                                                 / results["ngd"]["loglikelihood_s"], 2)
    summary["targets_met"] = {f"{c}<={t}x hf": results[c]["model_ratio_to_hf"] <= t for c, t in TARGETS.items()
                              if c in results}
    summary["targets_met"].update({f"{c}<={FLOOR_TARGET}x floor": f["floor_ratio"] <= FLOOR_TARGET
                                   for c, f in results.items() if c not in ("hf", "base", "ngd_naive")})
    if "naive_over_cached_ngd" in summary:
        summary["targets_met"]["naive/ngd>=5x"] = summary["naive_over_cached_ngd"] >= 5
    _print(summary)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _median_run(runs: list[dict]) -> dict:
    """The run of median model time, the headline figure (the lower middle one for an even count), with every
    run's model and wall seconds."""
    ordered = sorted(runs, key=lambda f: f["loglikelihood_s"])
    return {**ordered[(len(ordered) - 1) // 2], "loglikelihood_s_all": [f["loglikelihood_s"] for f in runs],
            "seconds_all": [f["seconds"] for f in runs]}


def _parts(figures: dict) -> str:
    """Optimisation parts over remix batches (``remix_memory``'s splits), blank where nothing was optimised."""
    return f"{figures['remix_parts']}/{figures['remix_batches']}" if figures.get("remix_batches") else ""


def _print(summary: dict) -> None:
    print(json.dumps(summary["setup"]))
    head = (f"{'config':<24}{'model s':>9}{'x hf':>7}{'wall s':>9}{'x hf':>7}{'acc':>7}{'embed s':>9}"
            f"{'remix s':>9}{'score s':>9}{'anon MiB':>10}{'+ run':>8}{'est MiB':>9}{'parts':>7}{'LRU MiB':>9}")
    print(head)
    for name, f in summary["runs"].items():
        print(f"{name:<24}{f['loglikelihood_s']:>9.2f}{f['model_ratio_to_hf']:>7.2f}{f['seconds']:>9.2f}"
              f"{f['ratio_to_hf']:>7.2f}{f['acc']:>7.3f}"
              f"{f.get('embed_s', 0):>9.2f}{f.get('remix_s', 0):>9.2f}{f.get('scoring_s', f['seconds']):>9.2f}"
              f"{f['peak_anon_mib']:>10.0f}{f['peak_anon_mib'] - f['loaded_anon_mib']:>8.0f}"
              f"{f.get('estimated_part_mib', 0):>9.0f}{_parts(f):>7}{f.get('prefix_cache_mib', 0):>9.0f}")
    print("token-layer evaluations per question (backward x2 in fwd-equiv); us/tl: model s per fwd-equiv "
          "token-layer; x floor: model s / (fwd-equiv x hf's s per token-layer)")
    print(f"{'config':<24}{'own':>9}{'nbrs':>9}{'opt fwd':>9}{'opt bwd':>9}{'fwd-equiv':>11}{'us/tl':>8}"
          f"{'floor s':>9}{'x floor':>9}")
    for name, f in summary["runs"].items():
        w = f["work_per_question"]
        print(f"{name:<24}{w['own']:>9.0f}{w['neighbours']:>9.0f}{w['optimisation_forward']:>9.0f}"
              f"{w['optimisation_backward']:>9.0f}{f['forward_equivalents_per_question']:>11.0f}"
              f"{f['us_per_token_layer']:>8.3f}{f['floor_s']:>9.2f}{f['floor_ratio']:>9.2f}")
    if "naive_over_cached_ngd" in summary:
        print(f"naive / cached NGD: {summary['naive_over_cached_ngd']:.2f}x")
    print("targets:", json.dumps(summary["targets_met"]))


if __name__ == "__main__":
    sys.exit(main())
