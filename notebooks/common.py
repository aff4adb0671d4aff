"""What the three notebooks (scaling_laws, pareto, feature_geometry) share, kept here once so that they cannot drift apart:
where runs and the activation cache live, which LM activations they read, and the helpers that build a run's Config,
write the shared cache once, train a run unless it is done, and read the held-out activations.

Each notebook keeps its own parameter cell (SCALE, NOTEBOOK, SETTINGS, P) and passes what it needs in explicitly, so a
notebook's differences (pareto measures loss recovered itself) stay in the notebook. Import this before torch: it sets
TQDM_MININTERVAL, which tqdm reads when it is first imported (torch imports it).
"""
import dataclasses
import json
import math
import os
import random
import sys

os.environ.setdefault("TQDM_MININTERVAL", "30")  # train()'s progress bars: an update every 30 s keeps the notebooks small

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import switch_sae as S  # noqa: E402


def setup(scale, notebook, settings):
    """Where this notebook's runs go, the shared activation cache, the LM settings and the device, and a one-line note
    for figure titles; prints what this scale runs on, so the committed outputs say which model, data and hardware
    produced them. Env RESULTS and CACHE move the runs and the cache (the tests point them into a temporary folder).
    Returns (runs, cache, lm, device, note); cache is "" when the settings capture activations live (paper scale)."""
    results = os.environ.get("RESULTS", os.path.join(REPO, "notebooks", "runs", scale))
    runs = os.path.join(results, notebook)  # one folder per run inside: config.json, sae.safetensors, metrics.json
    default_name = settings.get("cache_file", "smollm2_l15.bin" if scale == "small" else f"{scale}.bin")
    default_cache = os.path.join(REPO, "notebooks", "cache", default_name)
    cache = os.environ.get("CACHE", default_cache) if settings["cache"] else ""  # one cache shared by all three notebooks
    device = S.pick_device("auto")
    lm = dict(settings["lm"])  # which activations: model, layer, text, context length; the same for every run
    if lm["model"] == "tiny":  # deterministic, so rebuilding it next to its cache gives the same model every time
        lm["model"], lm["text"] = make_tiny_lm(os.path.join(os.path.dirname(cache), "smoke_lm"))
    model_name = "random tiny GPT-2 (2 layers, d=32)" if scale == "smoke" else os.path.basename(lm["model"].rstrip("/"))
    note = "smoke test: random model, not a result" if scale == "smoke" else f"{model_name} layer {lm['layer']} resid"
    hardware = (torch.cuda.get_device_name() if device.type == "cuda" else
                f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    print(f"scale {scale}: {model_name}, layer {lm['layer']} resid, {settings['tokens']:,} training tokens per SAE "
          f"(batches of {settings['batch_size']}), activations {'from the cache ' + cache if cache else 'captured live'}; "
          f"device {device.type} ({hardware}); runs in {runs}")
    return runs, cache, lm, device, note


def make_tiny_lm(folder):
    """Smoke scale: a random 2-layer GPT-2 (n_embd 32), a word-level tokenizer trained here, a synthetic corpus, so the
    notebooks run in seconds with nothing downloaded. Returns (model_dir, (corpus,))."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ("the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
             "all were when we there can an your which their said if do will each about how up out them then she many").split()
    rng, corpus, model_dir = random.Random(0), os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "gpt2-tiny")
    os.makedirs(folder, exist_ok=True)
    with open(corpus, "w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 60)))}) + "\n")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=tok.get_vocab_size())
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    return model_dir, (corpus,)


def config(settings, lm, cache, runs, name, /, **fields):
    """One run's TrainConfig: the LM settings, this scale's training settings, then the run's own fields (which win), so every
    run in a notebook reads the same activations and differs only where it says so. The run lives in runs/name."""
    train = dict(tokens=settings["tokens"], batch_size=settings["batch_size"], device="auto", acts=cache,
                 out=os.path.join(runs, name), log_every=50)
    if "buffer_tokens" in settings:
        train["buffer_tokens"] = settings["buffer_tokens"]
    return S.TrainConfig(**{**lm, **train, **fields})


def ensure_cache(settings, lm, cache, configs):
    """Write the activation cache (switch_sae.write_cache) unless one for this model and layer, long enough for
    every run in `configs`, is already there. All three notebooks share it, so the LM runs once for all of them;
    the held-out contexts come first."""
    if not cache:
        return
    need = max(sum(n for _, _, n in S.chunk_plan(c)) for c in configs)  # training contexts the longest run reads
    cfg = S.TrainConfig(**lm, tokens=settings["cache_tokens"], batch_size=settings["batch_size"],
                   buffer_tokens=settings["buffer_tokens"], out=cache, device="auto")
    if need > sum(n for _, _, n in S.chunk_plan(cfg)):
        raise ValueError(f"cache_tokens={settings['cache_tokens']} is too few for these runs: raise it in the parameter cell")
    try:
        header = S.open_cache(cache)[0]
    except S.UsageError:  # missing or left incomplete
        header = None
    if header is not None:
        keys = ("model", "layer", "site", "ctx", "skip_positions")
        if {key: header[key] for key in keys} != {key: getattr(cfg, key) for key in keys}:
            raise ValueError(f"{cache} holds other activations ({header['model']} layer {header['layer']}): delete it or set CACHE")
        if header["contexts"] - header["eval_contexts"] >= need:
            return
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    S.write_cache(cfg)


def run(cfg):
    """Train one SAE unless its metrics.json exists, so rerunning a notebook only redraws; returns its metrics."""
    done = os.path.join(cfg.out, "metrics.json")
    if not os.path.isfile(done):
        if os.path.isfile(os.path.join(cfg.out, "sae.safetensors")):  # interrupted: go on from its last checkpoint
            cfg = dataclasses.replace(cfg, resume=True)
        S.train(cfg)
    return json.load(open(done))


def held_out(lm, cache, device):
    """The held-out contexts and their activations (d columns), exactly those train() evaluates on, so the notebooks'
    own measurements match the runs' metrics.json: from the cache when there is one, else captured from the LM."""
    if cache:
        header, rows, tokens = S.open_cache(cache)
        return tokens[: header["eval_contexts"]], S.cache_reader(cache, rows, header, range(header["eval_contexts"]))(header["eval_contexts"])
    cfg = S.TrainConfig(**lm, device="auto")
    model, tokenizer = S.load_lm(cfg, device)
    tokens = S.take(S.token_contexts(cfg, tokenizer), S.held_out_contexts(cfg))
    module = S.hooked_module(model, cfg.layer, cfg.site)
    return tokens, S.lm_activations(model, module, tokens, cfg.lm_batch_size, cfg.skip_positions).cpu()


# -----------------------------------------------------------------------------
# fair comparisons: the same tokens, order and steps for every arm; lr tuned per arm on a validation split; seeds;
# intervals; verdicts computed from them

T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}  # Student t, two-sided 95%


def interval(values):
    """Mean and the half-width of its 95% confidence interval (Student t over len(values) >= 2 seeds)."""
    values = np.asarray(values, dtype=float)
    return values.mean(), T95[len(values)] * values.std(ddof=1) / math.sqrt(len(values))


def compare(values, reference):
    """Relative difference values / reference - 1, paired by seed (same init seed and data order), as (mean, half-width
    of the 95% interval, sign): sign is -1 or +1 when the whole interval lies below or above 0, else 0."""
    mean, half = interval(np.asarray(values) / np.asarray(reference) - 1)
    return mean, half, -1 if mean + half < 0 else 1 if mean - half > 0 else 0


def held_out_split(tokens_CL, x, skip):
    """The held-out contexts cut in two: the first half validates (learning rates are chosen on it), the second tests
    (results are reported on it). Returns {"val": x_val, "test": x_test} and, for each, the mask of its typical tokens
    (norm at most 4x the split's median: a few massive activations otherwise dominate the MSE)."""
    per = tokens_CL.shape[1] - skip
    half = len(tokens_CL) // 2 * per
    splits = {"val": x[:half].float(), "test": x[half:].float()}
    typical = {name: xs.norm(dim=1) <= 4 * xs.norm(dim=1).median() for name, xs in splits.items()}
    return splits, typical


@torch.no_grad()
def mse(sae, x, mask, device):
    """Mean over the masked tokens of sum_d (x - x_hat)^2."""
    err = torch.cat([(xb - sae(xb).x_hat).pow(2).sum(1).cpu() for xb in x.to(device).split(4096)])
    return err[mask].mean().item()


def last_tenth_change(metrics):
    """How much the logged reconstruction loss still moved over the last 10% of steps: the least-squares slope there,
    times the span, over the mean loss there (a flattened curve gives about 0)."""
    steps, loss = np.array(metrics["loss_curve"], dtype=float).T
    tail = steps >= steps[-1] * 0.9
    slope = np.polyfit(steps[tail], loss[tail], 1)[0]
    return slope * (steps[tail][-1] - steps[tail][0]) / loss[tail].mean()


def sweep(config, arms, lrs, seeds, splits, typical, device):
    """Train every arm at every lr with seeds[0], keep the lr with the lowest validation MSE (typical tokens), then train
    the other seeds at that lr. Returns, per arm: val MSE per lr, the chosen lr, and per seed the test MSE (typical
    tokens and all), the metrics and the last-10% change of the loss curve."""
    results = {}
    for arm, fields in arms.items():
        name = lambda lr, seed: f"{arm}_lr{lr:g}_s{seed}"
        val = {}
        for lr in lrs:
            cfg = config(name(lr, seeds[0]), lr=lr, seed=seeds[0], **fields)
            run(cfg)
            val[lr] = mse(S.load_sae(cfg.out, device), splits["val"], typical["val"], device)
        best = min(val, key=val.get)
        per_seed = []
        for seed in seeds:
            cfg = config(name(best, seed), lr=best, seed=seed, **fields)
            metrics = run(cfg)
            sae = S.load_sae(cfg.out, device)
            per_seed.append(dict(seed=seed, mse_typ=mse(sae, splits["test"], typical["test"], device),
                                 mse=mse(sae, splits["test"], torch.ones_like(typical["test"]), device),
                                 change=last_tenth_change(metrics), metrics=metrics))
        results[arm] = dict(val=val, lr=best, seeds=per_seed)
    return results
