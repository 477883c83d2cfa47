"""Continuation identity with real vLLM on the CPU: is a stream continued from prompt + its
first k tokens (what dynrt's migration sends to the next worker) equal to the
uninterrupted stream?

For every dtype (float32, bfloat16) x vLLM batch-invariant mode (``VLLM_BATCH_INVARIANT``
0 / 1), in a fresh process each (vLLM reads the variable at start-up and its batch-invariant
mode patches torch for the whole process):

1. a reference of ``--tokens`` tokens for every prompt (the prompts in one batch);
2. for every split k in ``--splits``: the request migration sends — prompt + reference[:k],
   ``max_tokens`` reduced by k, same seed and sampling (built like
   ``frontend/migration.Generation._send``), after the prefix cache was reset (a fresh
   worker holds nothing) — compared with reference[k:]; k = 0 is a plain rerun;
3. once greedy (temperature 0), once sampled (``--temperature``, a fixed seed per prompt);
4. ``--batching single``: every request alone (batch 1: only prefill-vs-decode differs);
   ``batched``: the references in one batch, all continuations in another (the batch
   around a request changes too, as on a real worker). Every continuation is also
   compared with the same request's continuation under the other batching: is the
   continuation from a given split deterministic (same prefix, same seed)?

Engine settings are the dynrt worker's on a CPU host: its CPU environment
(``apply_cpu_env``: one unpinned OpenMP thread, in-process engine core), eager mode,
prefix caching on; request parameters go through dynrt's own mapping
(``worker/vllm_sampling.sampling_kwargs``). ``ignore_eos`` keeps every stream at its full
length. Prints identical/total per (dtype, batch-invariant, batching, sampling); JSON in
``benchmarks/results/continuation.json`` (``--results-dir`` for elsewhere).

    .venv/bin/python -m benchmarks.continuation [--tokens 96] [--splits 0,10,30,60] [--prompts 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import add_results_dir_argument, options_of, print_table, write_results
from dynrt.runtime.protocol import SamplingParams
from dynrt.worker.vllm_config import apply_cpu_env

DEFAULT_MODEL = os.environ.get("DYNRT_SMOLLM2_DIR", str(Path.home() / ".cache" / "dynrt" / "smollm2-135m-instruct"))
CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}],
    [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}],
    [{"role": "system", "content": "You are a travel writer."},
     {"role": "user", "content": "Describe a week-long journey through the mountains of Norway."}],
    [{"role": "user", "content": "Write a detailed recipe for bread, with every step explained."}],
]
SAMPLINGS = ("greedy", "sampled")


# -- one configuration, in its own process ------------------------------------------------
def continuation_sampling(sampling: SamplingParams, produced: int) -> SamplingParams:
    """The sampling parameters migration sends after ``produced`` tokens (as
    ``frontend/migration.Generation._send`` builds them): same seed and parameters,
    ``max_tokens`` and ``min_tokens`` reduced by what was produced."""
    return msgspec.structs.replace(sampling, max_tokens=sampling.max_tokens - produced,
                                   min_tokens=max(0, sampling.min_tokens - produced))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure_sampling(llm: Any, prompts: list[list[int]], sampling_of: Any, splits: list[int], *,
                     repeats: int, batched: bool) -> dict[str, Any]:
    """Reference, then every split's continuation (``repeats`` times); what matched.
    ``batched``: the references in one batch, the continuations in another; else every
    request alone (batch 1)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt

    from dynrt.worker.vllm_sampling import sampling_kwargs

    def generate_batch(requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
        # ignore_eos without stop ids: the model's EOS ids do not matter here.
        params = [VllmSamplingParams(**sampling_kwargs(s, frozenset())) for _, s in requests]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in requests], params, use_tqdm=False)
        cached.extend(int(o.num_cached_tokens or 0) for o in outputs)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def generate(requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
        if batched:
            return generate_batch(requests)
        return [generate_batch([request])[0] for request in requests]

    cached: list[int] = []  # prefix-cache hits (tokens) of every request
    started = time.monotonic()
    references = generate([(ids, sampling_of(i)) for i, ids in enumerate(prompts)])
    cases = [(i, k) for i in range(len(prompts)) for k in splits]
    requests = [(prompts[i] + references[i][:k], continuation_sampling(sampling_of(i), k)) for i, k in cases]
    runs = []
    for _ in range(repeats):
        llm.reset_prefix_cache()  # the next worker holds nothing of this request
        runs.append(generate(requests))
    results = []
    for n, (i, k) in enumerate(cases):
        expected = references[i][k:]
        continued = runs[0][n]
        diff = first_difference(continued, expected)
        results.append({"prompt": i, "k": k, "identical": diff is None,
                        "first_difference_at": None if diff is None else k + diff,
                        "repeat_identical": all(r[n] == continued for r in runs[1:]) if repeats > 1 else None,
                        "continuation": continued})
    return {"identical": sum(r["identical"] for r in results), "total": len(results),
            "repeat_identical": sum(bool(r["repeat_identical"]) for r in results) if repeats > 1 else None,
            "cached_tokens_max": max(cached[len(prompts):], default=0),
            "cases": results, "seconds": round(time.monotonic() - started, 1)}


def batch_invariant_state() -> dict[str, Any]:
    """Whether vLLM's batch-invariant mode is on in this process (the engine core runs
    here: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and whether Triton, which its kernels are
    written in, is installed."""
    from vllm.model_executor.determinism import batch_invariant
    from vllm.triton_utils import HAS_TRITON

    return {"mode_enabled": bool(batch_invariant._batch_invariant_MODE), "triton_installed": bool(HAS_TRITON)}


def run_configuration(args: argparse.Namespace) -> dict[str, Any]:
    """One (dtype, batch-invariant) configuration: start vLLM, measure greedy and sampled;
    what is done so far is in ``args.out`` after every part (a timeout keeps it)."""
    import vllm
    from vllm import LLM

    started = time.monotonic()
    # What the dynrt worker passes on a CPU host (worker/vllm_engine.py, vllm_config.py):
    # eager, prefix caching on, vLLM's default block size, stat logging off.
    llm = LLM(model=args.model, dtype=args.configuration, enforce_eager=True, enable_prefix_caching=True,
              max_model_len=args.max_model_len, disable_log_stats=True)
    start_seconds = time.monotonic() - started
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for chat in CHATS[:args.prompts]]
    splits = [int(k) for k in args.splits.split(",")]
    out: dict[str, Any] = {"dtype": args.configuration, "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1",
                           "vllm": vllm.__version__, "start_seconds": round(start_seconds, 1),
                           "prompt_tokens": [len(p) for p in prompts], **batch_invariant_state()}
    samplers = {
        "greedy": lambda i: SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True),
        "sampled": lambda i: SamplingParams(max_tokens=args.tokens, temperature=args.temperature,
                                            seed=args.seed + i, ignore_eos=True),
    }
    # Greedy first: a sampled run that kills the engine leaves the greedy numbers standing.
    for name in SAMPLINGS:
        for batching in args.batching.split(","):
            try:
                result = measure_sampling(llm, prompts, samplers[name], splits, repeats=args.repeats,
                                          batched=batching == "batched")
            except Exception as exc:  # recorded: e.g. a mode this build cannot run on the CPU
                frames = traceback.extract_tb(exc.__traceback__)[-3:]
                result = {"error": f"{type(exc).__name__}: {exc}"[:500],
                          "raised_at": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]}
            out.setdefault("results", []).append({"batching": batching, "sampling": name, **result})
            Path(args.out).write_text(json.dumps(out))
        compare_batchings([r for r in out["results"] if r["sampling"] == name])
    return out


def compare_batchings(results: list[dict[str, Any]]) -> None:
    """Mark in every result how many of its continuations equal the same request's
    continuation under the other batching (the same prefix and seed, another batch around
    it: is the continuation from a given split deterministic?)."""
    done = [r for r in results if "cases" in r]
    if len(done) != 2:
        return
    for mine, other in ((done[0], done[1]), (done[1], done[0])):
        mine["same_in_other_batching"] = sum(a["continuation"] == b["continuation"]
                                             for a, b in zip(mine["cases"], other["cases"]))


# -- the driver ---------------------------------------------------------------------------
def spawn_configuration(args: argparse.Namespace, dtype: str, invariant: bool, log_dir: Path) -> dict[str, Any]:
    """Run one configuration in a child process with its environment; its result, or
    the error that ended it."""
    env = dict(os.environ)
    apply_cpu_env(env)
    env["VLLM_BATCH_INVARIANT"] = "1" if invariant else "0"
    result_path = log_dir / f"{dtype}-bi{int(invariant)}.json"
    log_path = log_dir / f"{dtype}-bi{int(invariant)}.log"
    command = [sys.executable, "-m", "benchmarks.continuation", "--configuration", dtype, "--out", str(result_path),
               "--model", args.model, "--tokens", str(args.tokens), "--splits", args.splits,
               "--prompts", str(args.prompts), "--temperature", str(args.temperature), "--seed", str(args.seed),
               "--max-model-len", str(args.max_model_len), "--batching", args.batching, "--repeats", str(args.repeats)]
    started = time.monotonic()
    with log_path.open("w") as log:
        try:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout,
                                  cwd=Path(__file__).resolve().parents[1])
            code: int | str = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.monotonic() - started, 1)
    if result_path.is_file():  # complete, or what was done before a timeout
        return {**json.loads(result_path.read_text()), "exit": code, "wall_seconds": wall, "log": str(log_path)}
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return {"dtype": dtype, "batch_invariant": invariant, "exit": code, "wall_seconds": wall, "log": str(log_path),
            "error": (errors or lines or [""])[-1][:500]}


def summary_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for run in runs:
        invariant = "on" if run["batch_invariant"] else "off"
        if "results" not in run:
            rows.append([run["dtype"], invariant, "-", "-", "-", "-", "-", f"error: {run.get('error', '')[:100]}"])
            continue
        for part in run["results"]:
            head = [run["dtype"], invariant, part["batching"], part["sampling"]]
            if "error" in part:
                rows.append([*head, "-", "-", "-", f"error: {part['error'][:100]}"])
                continue
            firsts = [c["first_difference_at"] for c in part["cases"] if c["first_difference_at"] is not None]
            same = part.get("same_in_other_batching")
            rows.append([*head, f"{part['identical']}/{part['total']}",
                         "-" if same is None else f"{same}/{part['total']}", min(firsts) if firsts else "-",
                         f"{part['seconds']} s"])
        if run.get("exit") not in (0, None):
            rows.append([run["dtype"], invariant, "-", "-", "-", "-", "-", f"ended: {run['exit']} (rest not run)"])
    return rows


def main(args: argparse.Namespace) -> None:
    if args.configuration:
        Path(args.out).write_text(json.dumps(run_configuration(args)))
        return
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"no model folder at {args.model}: build it with deploy/vllm-cpu/build_model.py")
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-continuation-"))
    runs = []
    for dtype in args.dtypes.split(","):
        for invariant in (mode == "on" for mode in args.batch_invariant.split(",")):
            print(f"{dtype} batch-invariant={'on' if invariant else 'off'} ...", flush=True)
            runs.append(spawn_configuration(args, dtype, invariant, log_dir))
    print_table(["dtype", "batch-invariant", "batching", "sampling", "identical", "same across batchings",
                 "first diff at", "note"],
                summary_rows(runs))
    cpu_env = apply_cpu_env({})
    config = {k: v for k, v in options_of(args).items() if k not in ("configuration", "out")}
    path = write_results("continuation", {"config": config, "cpu_env": cpu_env, "runs": runs},
                         args.results_dir)
    print(f"wrote {path} (child logs in {log_dir})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model folder (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=96, help="reference length in tokens")
    parser.add_argument("--splits", default="0,10,30,60",
                        help="comma-separated k: continue from prompt + the first k reference tokens (0 = rerun)")
    parser.add_argument("--prompts", type=int, default=3, choices=range(1, len(CHATS) + 1))
    parser.add_argument("--temperature", type=float, default=0.8, help="of the sampled runs")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampled runs (+ the prompt's index)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-invariant", default="off,on", help="VLLM_BATCH_INVARIANT settings to run: off,on")
    parser.add_argument("--batching", default="single,batched",
                        help="single: every request alone; batched: references in one batch, continuations in another")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every continuation (more than 1: also counts reruns identical to the first)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=480, help="seconds per configuration")
    # The child process of one configuration: its dtype, and where its result goes.
    parser.add_argument("--configuration", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    add_results_dir_argument(parser)
    parsed = parser.parse_args()
    if any(not 0 <= int(k) < parsed.tokens for k in parsed.splits.split(",")):
        parser.error(f"every split must be in [0, --tokens): {parsed.splits}")
    main(parsed)
