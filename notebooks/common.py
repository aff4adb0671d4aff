"""What the notebooks share, kept once so that they cannot drift apart: the scales (which LM, layer, text, tokens
and steps every SAE gets), the activation cache, the held-out split, training a run unless it is done, the fair
sweep (lr tuned per arm on a validation split, then several seeds) and the statistics the verdicts rest on.

    study = common.Study("small")           # prints the model, data and hardware; writes the cache once
    results = study.sweep({"topk_M576_k32": study.arm(1, 576, 32)})

Every SAE lives in one folder per scale (runs/<scale>/<arm>_lr<lr>_s<seed>), shared by all notebooks: the same
SAE asked for twice is trained once, and a notebook rerun only redraws. Import this before torch: it sets
TQDM_MININTERVAL, which tqdm reads when it is first imported.
"""
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import random
import sys

os.environ.setdefault("TQDM_MININTERVAL", "30")  # train()'s progress bars: an update every 30 s keeps notebooks small

import numpy as np
import scipy.stats
import torch

NOTEBOOKS = os.path.dirname(os.path.abspath(__file__))  # runs/ and cache/ live here, whatever the working directory
REPO = os.path.dirname(NOTEBOOKS)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import switch_sae as S  # noqa: E402

# the notebooks read RESULTS too (walkthrough builds its tiny LM under it): an absolute default, so that a kernel
# started in another directory (nbconvert runs it in the notebook's own) still writes to notebooks/runs
for name in ("RESULTS", "CACHE", "TEXT", "PROBE_DATA", "MODEL_DIR"):  # set but empty: as if unset
    if os.environ.get(name) == "":
        del os.environ[name]
os.environ.setdefault("RESULTS", os.path.join(NOTEBOOKS, "runs"))
TEXT = os.environ.get("TEXT", os.path.join(REPO, "..", "shared", "data", "corpus.jsonl.gz"))
PROBE_DATA = os.environ.get("PROBE_DATA", os.path.join(REPO, "..", "shared", "data", "probing.jsonl.gz"))
CACHES = (os.path.dirname(os.path.abspath(os.environ["CACHE"])) if "CACHE" in os.environ
          else os.path.join(NOTEBOOKS, "cache"))
SCALES = {
    # seconds on a CPU: a random tiny GPT-2 built here; checks that the code runs, says nothing about the method
    "smoke": dict(lm=dict(model="tiny", layer=1, ctx=16, lm_batch_size=16, eval_tokens=512),
                  cache_file="smoke.bin", cache_tokens=2304, buffer_tokens=1024, batch_size=256, tokens=2048,
                  lrs=[1e-3, 3e-3], seeds=[0, 1], log_every=2, ce_contexts=8, probe={"synthetic": (40, 20)}),
    # SmolLM2-135M layer 15 on 2 CPU cores: every 128-token window of the text (--windows all) captured once in
    # bf16 (~25 min), 2.6M training tokens; each SAE trains 2,048 steps of 1,152 tokens (about a minute), so an
    # SAE of 2,304 latents sees 1,024 training tokens per latent
    "small": dict(lm=dict(model=os.environ.get("MODEL_DIR", os.path.join(REPO, "models", "smollm2")), layer=15,
                          ctx=128, lm_batch_size=16, eval_tokens=32768, windows="all", text=(TEXT,)),
                  cache_file="smollm2_l15_all.bin", cache_tokens=2_600_000, buffer_tokens=130_000,
                  batch_size=1152, tokens=2_359_296, lrs=[1e-3, 3e-3, 1e-2], seeds=[0, 1, 2],
                  log_every=20, ce_contexts=64,
                  # labelled texts a class and split (train, test) for the probes: ~420k tokens, ~7 min to capture
                  probe={"newsgroups": (80, 30), "movies": (300, 100), "polarity": (500, 150)}),
    # the paper on a GPU: GPT-2 small layer 8, OpenWebText streamed live, 100k steps of 2,048 tokens (its
    # FLOP-matched script)
    "paper": dict(lm=dict(model="gpt2", layer=8, ctx=128, skip_positions=0, lm_batch_size=128, eval_tokens=65536),
                  cache_file="", batch_size=2048, tokens=204_800_000, lrs=[5e-5, 1.6e-4, 5e-4], seeds=[0, 1, 2],
                  log_every=200, ce_contexts=256,
                  probe={"newsgroups": (400, 150), "movies": (780, 219), "polarity": (4211, 1120)}),
}


def check_scale(scale, scales=tuple(SCALES)):
    """A scale's name, or a one-line error naming the scales (not a bare KeyError); scales: those a notebook
    runs at, where it is not all of them."""
    if scale not in scales:
        whose = "" if scales == tuple(SCALES) else " of this notebook"
        raise ValueError(f"SCALE={scale!r} is not a scale{whose}: use one of {', '.join(scales)} (lower case)")
    return scale


if "SCALE" in os.environ:  # every notebook imports this module before it reads SCALE itself
    check_scale(os.environ["SCALE"])


def needs(scale, cfg):
    """What the scale's cache needs, and which variables set it: appended to the errors of writing it."""
    if scale == "smoke":
        return "scale smoke builds its own random model and text: nothing to set"
    contexts = S.held_out_contexts(cfg) + S.contexts_needed(cfg)
    return (f"scale {scale} captures {contexts:,} contexts of {cfg.ctx} tokens, so it needs about "
            f"{contexts * cfg.ctx / 1e6:.1f}M tokens of text (more if some repeat): set TEXT to a .txt, .jsonl or "
            f".jsonl.gz file that holds them (now {', '.join(cfg.text)}) and MODEL_DIR to the model, a Hugging Face "
            f"directory or .gguf file (now {cfg.model})")


def write_cache(scale, cfg):
    """switch_sae.write_cache, whose errors (no model, too little text) also say what the scale needs."""
    try:
        S.write_cache(cfg)
    except S.UsageError as e:
        raise S.UsageError(f"{e}. {needs(scale, cfg)}") from None


class Study:
    """One scale's setting: where runs and the cache live, the held-out split, and the fair sweep."""

    def __init__(self, scale, **overrides):
        unknown = set(overrides) - set(SCALES["small"]) - {"cache"}  # cache: a cache file of its own
        if unknown:
            raise ValueError(f"Study has no setting {', '.join(sorted(unknown))}: its settings are "
                             f"{', '.join(sorted(SCALES['small']))} and cache")
        self.scale, self.p = check_scale(scale), {**SCALES[scale], **overrides}
        results = os.environ.get("RESULTS") or os.path.join(NOTEBOOKS, "runs")
        self.runs = os.path.join(results, scale)  # one folder per SAE inside: config.json, sae.safetensors, metrics
        cache_file = self.p["cache_file"]
        self.cache = self.p.get("cache") or cache_file and os.environ.get("CACHE", os.path.join(CACHES, cache_file))
        if self.cache and os.path.isdir(self.cache):
            raise ValueError(f"CACHE={self.cache} is a directory: set CACHE to a cache file in it, e.g. "
                             f"{os.path.join(self.cache, cache_file or 'acts.bin')}")
        self.device = S.pick_device("auto")
        self.lm = dict(self.p["lm"])
        if self.lm["model"] == "tiny":  # deterministic, so rebuilding it beside its cache gives the same model
            self.lm["model"], self.lm["text"] = make_tiny_lm(os.path.join(os.path.dirname(self.cache), "smoke_lm"))
        name = "random tiny GPT-2 (2 layers, d=32)" if scale == "smoke" else os.path.basename(
            self.lm["model"].rstrip("/"))
        site = f"layer {self.lm['layer']} {self.lm.get('site', 'resid')}"
        self.note = "smoke test: random model, not a result" if scale == "smoke" else f"{name} {site}"
        hardware = (torch.cuda.get_device_name() if self.device.type == "cuda" else
                    f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
        self.steps = self.p["tokens"] // self.p["batch_size"]
        print(f"scale {scale}: {name}, {site}; every SAE trains {self.steps:,} steps of "
              f"{self.p['batch_size']:,} tokens ({self.p['tokens']:,} tokens), activations "
              f"{'from the cache ' + self.cache if self.cache else 'captured live'}; device {self.device.type} "
              f"({hardware}); runs in {self.runs}")
        self.ensure_cache()
        self._held_out = None

    @staticmethod
    def arm(experts, width, k=32):
        """A Switch SAE's name and fields: (name, dict(experts, width, k)); experts=1 is TopK."""
        name = f"topk_M{width}_k{k}" if experts == 1 else f"switch{experts}_M{width}_k{k}"
        return name, dict(experts=experts, width=width, k=k)

    def config(self, name, **fields):
        """One run's TrainConfig: the LM settings, this scale's training settings, then the run's own fields (which
        win), so every run reads the same activations in the same order and differs only where it says so."""
        train = dict(tokens=self.p["tokens"], batch_size=self.p["batch_size"], device="auto", acts=self.cache,
                     out=os.path.join(self.runs, name), log_every=self.p["log_every"], skip_ce=True,
                     buffer_tokens=self.p["buffer_tokens"] if self.cache else S.TrainConfig.buffer_tokens)
        lm = {key: value for key, value in self.lm.items() if not (self.cache and key == "text")}  # the cache's
        return S.TrainConfig(**{**lm, **train, **fields})

    def ensure_cache(self):
        """Write the activation cache (switch_sae.write_cache) unless one for this LM and layer, long enough for
        a run of this scale, is there. All notebooks share it, so the LM runs once for all of them."""
        if not self.cache:
            return
        cfg = S.CacheConfig(**self.lm, tokens=self.p["cache_tokens"], batch_size=self.p["batch_size"],
                            buffer_tokens=self.p["buffer_tokens"], out=self.cache, device="auto")
        need = S.contexts_needed(self.config("any"))  # training contexts a run reads
        try:
            header = S.open_cache(self.cache)[0]
        except S.UsageError:  # missing or left incomplete
            header = None
        if header is not None:
            if any(S.as_tuple(header[key]) != S.as_tuple(getattr(cfg, key)) for key in S.CACHE_SETTINGS):
                raise ValueError(f"{self.cache} holds other activations ({header['model']} layer "
                                 f"{header['layer']}): delete it or set CACHE")
            if header["contexts"] - header["eval_contexts"] >= need:
                return
        os.makedirs(os.path.dirname(self.cache) or ".", exist_ok=True)
        write_cache(self.scale, cfg)

    def run(self, cfg):
        """Train one SAE unless it is done; returns its metrics, or None when its loss diverged (a too-high lr in a
        sweep; diverged.txt marks it). A finished run trained with other settings is an error, not a silent reuse."""
        done, diverged = os.path.join(cfg.out, "metrics.json"), os.path.join(cfg.out, "diverged.txt")
        if os.path.isfile(os.path.join(cfg.out, "config.json")):  # finished, diverged or interrupted alike
            saved = S.load_config(cfg.out)
            differ = [f.name for f in dataclasses.fields(cfg)  # a cached run records its cache's text
                      if f.name not in ("out", "resume", "device", "text", "dataset")
                      and getattr(saved, f.name) != getattr(cfg, f.name)]
            if differ:
                raise ValueError(f"{cfg.out} was trained with other {', '.join(differ)}: delete it to retrain")
        if os.path.isfile(diverged):
            return None
        if not os.path.isfile(done):
            if os.path.isfile(os.path.join(cfg.out, "sae.safetensors")):  # interrupted: go on from its checkpoint
                cfg = dataclasses.replace(cfg, resume=True)
            log = io.StringIO()  # train()'s progress bars and table would fill the notebook: one line instead
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    S.train(cfg)
            except S.Diverged as e:
                with open(diverged, "w") as f:
                    f.write(str(e))
                print(f"trained {os.path.basename(cfg.out)}: diverged (lr too high)")
                return None
            metrics = json.load(open(done))
            print(f"trained {os.path.basename(cfg.out)} in {metrics['seconds_sae'] + metrics['seconds_activations']:.0f} s:"
                  f" MSE {metrics['mse']:.4g}, FVE {metrics['fve']:.3f}")
        return json.load(open(done))

    def held_out(self):
        """The held-out contexts (C, L) and their activations, exactly those train() evaluates on, cut in two
        content-disjoint halves: "val" chooses learning rates, "test" reports results. Also, per half, the mask of
        its typical tokens (norm at most 4x the median: a few massive activations otherwise dominate the MSE)."""
        if self._held_out is None:
            tokens_CL, x = held_out_activations(self.lm, self.cache)
            skip = S.open_cache(self.cache)[0]["skip_positions"] if self.cache else self.lm.get("skip_positions", 1)
            per, half = tokens_CL.shape[1] - skip, len(tokens_CL) // 2
            x = x.float()
            split = {"val": (tokens_CL[:half], x[: half * per]), "test": (tokens_CL[half:], x[half * per :])}
            typical = {name: xs.norm(dim=1) <= 4 * xs.norm(dim=1).median() for name, (_, xs) in split.items()}
            self._held_out = split, typical
        return self._held_out

    def mse(self, sae, part="test", typical_only=True):
        """Mean over the part's (typical) tokens of sum_d (x - x_hat)^2."""
        split, typical = self.held_out()
        x = split[part][1]
        x = x.to(self.device)
        order = S.evaluation_order(sae, x)  # shuffled batches of the training size for expert choice, as trained
        chunk = self.p["batch_size"] if sae.batch_dependent else 4096
        err = torch.empty(len(x))
        with torch.no_grad():
            err[order.cpu()] = torch.cat([(xb - sae(xb).x_hat).pow(2).sum(1).cpu() for xb in x[order].split(chunk)])
        return err[typical[part]].mean().item() if typical_only else err.mean().item()

    def fve(self, sae, part="test"):
        """Fraction of variance explained over all the part's tokens: 1 - MSE / mean |x - mean x|^2."""
        x = self.held_out()[0][part][1]
        return 1 - self.mse(sae, part, typical_only=False) / (x - x.mean(0)).pow(2).sum(1).mean().item()

    def sweep(self, arms, lrs=None, seeds=None, halves=False):
        """The fair comparison: every arm at every lr with the first seed; the lr with the lowest validation MSE
        (typical tokens) wins; the other seeds train at it. With halves, each seed also trains on half the tokens
        (about the first half of its batches, its lr decaying over its own last 20%), for the stability check.
        Returns, per arm: val MSE per lr, the chosen lr, and per seed the test MSE (typical tokens and all;
        mse_half at half length; nan where a run diverged), the run's metrics and the last-tenth loss change."""
        lrs, seeds = lrs or self.p["lrs"], seeds or self.p["seeds"]
        results = {}
        for arm, fields in arms.items():
            name = lambda lr, seed: f"{arm}_lr{lr:g}_s{seed}"
            val, grid = {}, list(lrs)
            while grid:  # the grid, then one more step beyond whichever edge wins, twice at most
                for lr in grid:
                    cfg = self.config(name(lr, seeds[0]), lr=lr, seed=seeds[0], **fields)
                    trained = self.run(cfg) is not None
                    val[lr] = self.mse(S.load_sae(cfg.out, self.device), "val") if trained else math.inf
                best, tried = min(val, key=val.get), sorted(val)
                beyond = half_decade(best, +1) if best == tried[-1] else half_decade(best, -1)
                grid = [beyond] if len(lrs) > 1 and best in (tried[0], tried[-1]) and len(val) < len(lrs) + 2 else []
            per_seed = []
            for seed in seeds:
                cfg = self.config(name(best, seed), lr=best, seed=seed, **fields)
                metrics = self.run(cfg)
                if metrics is None:  # diverged at the lr the first seed chose: no result, so no verdict
                    per_seed.append(dict(seed=seed, out=cfg.out, mse_typ=math.nan, mse=math.nan, last=math.nan,
                                         metrics=None, mse_half=math.nan))
                    continue
                sae = S.load_sae(cfg.out, self.device)
                per_seed.append(dict(seed=seed, out=cfg.out, mse_typ=self.mse(sae), mse=self.mse(sae, typical_only=False),
                                     last=loss_change(metrics), metrics=metrics))
                if halves:
                    half = self.config(name(best, seed) + "_half", lr=best, seed=seed, tokens=self.p["tokens"] // 2,
                                       **fields)
                    trained = self.run(half) is not None
                    per_seed[-1]["mse_half"] = self.mse(S.load_sae(half.out, self.device)) if trained else math.nan
            results[arm] = dict(val=val, lr=best, seeds=per_seed, fields=fields)
        return results

    def lm_and_contexts(self):
        """The LM and hooked module (None, None without the LM) and the first ce_contexts test contexts with
        their activations: what the loss-recovered measures run on."""
        if not hasattr(self, "_lm_model"):
            cfg = S.TrainConfig(**self.lm, device="auto")
            self._lm_model = S.lm_for_evaluation(cfg, self.device)
        tokens_CL, x = self.held_out()[0]["test"]
        contexts = min(self.p["ce_contexts"], len(tokens_CL))
        return *self._lm_model, tokens_CL[:contexts].to(self.device), x[: contexts * (len(x) // len(tokens_CL))]

    def loss_recovered(self, run_dir):
        """switch_sae.evaluate with the LM on the first ce_contexts test contexts: fraction of the LM's loss
        recovered with the SAE spliced in, delta CE and KL. Needs the LM; None without it."""
        model, module, tokens_CL, x = self.lm_and_contexts()
        cfg = S.load_config(run_dir)
        return None if model is None else S.evaluate(S.load_sae(run_dir, self.device), cfg, x, model, module, tokens_CL)

    def fractions_recovered(self, run_dirs):
        """The fraction of the LM's loss recovered (as loss_recovered's) of each SAE in run_dirs, with one clean
        and one zeroed LM pass shared by all of them: 2 + n passes instead of 3 n. None without the LM."""
        model, module, tokens_CL, _ = self.lm_and_contexts()
        if model is None:
            return None
        cfgs = [S.load_config(run_dir) for run_dir in run_dirs]
        patches = {str(i): S.sae_patch(S.load_sae(run_dir, self.device), cfg.batch_size) for i, (run_dir, cfg)
                   in enumerate(zip(run_dirs, cfgs))}
        lm = S.lm_losses(model, module, tokens_CL, cfgs[0].lm_batch_size, {**patches, "zero": torch.zeros_like},
                         cfgs[0].skip_positions)
        return [(lm[f"ce_{i}"] - lm["ce_zero"]) / (lm["ce_clean"] - lm["ce_zero"]) for i in patches]


def site_studies(scale, layers, sites, stem, **overrides):
    """One Study per (layer, site), each on its own cache; the caches missing are written first, all from one LM
    pass (switch_sae.write_cache with several layers and sites), so every site holds the same contexts."""
    p = {**SCALES[check_scale(scale)], **overrides}
    lm = dict(p["lm"])
    if lm["model"] == "tiny":
        lm["model"], lm["text"] = make_tiny_lm(os.path.join(CACHES, "smoke_lm"))
    several = len(layers) * len(sites) > 1  # as write_cache names them
    path = lambda layer, site: os.path.join(CACHES, f"{stem}_L{layer}_{site}.bin" if several else f"{stem}.bin")
    if not all(os.path.isfile(path(layer, site) + ".json") for layer in layers for site in sites):
        os.makedirs(CACHES, exist_ok=True)
        write_cache(scale, S.CacheConfig(**{**lm, "layer": tuple(layers), "site": tuple(sites)},
                                         tokens=p["cache_tokens"], batch_size=p["batch_size"],
                                         buffer_tokens=p["buffer_tokens"], out=os.path.join(CACHES, f"{stem}.bin"),
                                         device="auto"))
    return {(layer, site): Study(scale, **overrides, lm={**lm, "layer": layer, "site": site}, cache=path(layer, site))
            for layer in layers for site in sites}


def half_decade(lr, direction):
    """The next value of the ladder 1e-3, 3e-3, 1e-2, 3e-2, ... up (+1) or down (-1) from lr."""
    step = 3 if f"{lr:.0e}"[0] == ("1" if direction > 0 else "3") else 10 / 3
    return float(f"{lr * step ** direction:.1g}")


def held_out_activations(lm, cache):
    """The held-out contexts and their activations (d columns), from the cache when there is one, else captured."""
    if cache:
        header, rows, tokens = S.open_cache(cache)
        n = header["eval_contexts"]
        return tokens[:n], S.cache_reader(rows, header, range(n))(n)
    cfg = S.TrainConfig(**lm, device="auto")
    model, tokenizer = S.load_lm(cfg, S.pick_device("auto"))
    tokens = S.take(S.token_contexts(cfg, tokenizer), S.held_out_contexts(cfg))
    module = S.hooked_module(model, cfg.layer, cfg.site)
    return tokens, S.lm_activations(model, module, tokens, cfg.lm_batch_size, cfg.skip_positions).cpu()


TINY_WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had not but "
              "what all were when we there can an your which their said if do will each about how up out them then "
              "she many").split()


def make_tiny_lm(folder):
    """Smoke scale: a random 2-layer GPT-2 (n_embd 32), a word-level tokenizer trained here, a synthetic corpus, so
    the notebooks run in seconds with nothing downloaded. Returns (model_dir, (corpus,))."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng, corpus, model_dir = random.Random(0), os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "gpt2-tiny")
    os.makedirs(folder, exist_ok=True)
    with open(corpus, "w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(8, 60)))}) + "\n")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(TINY_WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=tok.get_vocab_size())
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    return model_dir, (corpus,)


# -----------------------------------------------------------------------------
# statistics: intervals over seeds, paired comparisons, convergence

def interval(values):
    """Mean and the half-width of its 95% confidence interval (Student t over len(values) >= 2 seeds)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:  # one seed: no interval
        return values.mean(), math.nan
    t95 = scipy.stats.t.ppf(0.975, len(values) - 1)  # Student t, two-sided 95%
    return values.mean(), t95 * values.std(ddof=1) / math.sqrt(len(values))


def compare(values, reference):
    """Relative difference values / reference - 1, paired by seed (same init seed and data order), as (mean,
    half-width of the 95% interval, sign): sign is -1 or +1 when the whole interval lies below or above 0, else 0."""
    if len(values) != len(reference):
        raise ValueError(f"compare pairs by seed: {len(values)} values against {len(reference)}")
    mean, half = interval(np.asarray(values) / np.asarray(reference) - 1)
    return mean, half, -1 if mean + half < 0 else 1 if mean - half > 0 else 0


def loss_change(metrics):
    """How much the logged training loss moved over the last tenth of the steps: its median there over its median
    in the tenth before, minus 1 (medians: a few batches holding massive activations log losses 20x the rest).
    Descriptive only: the batches differ in text, and the lr decays to 0 over the last 20%, so it is no test."""
    steps, loss = np.array(metrics["loss_curve"], dtype=float).T
    tenths = [loss[(steps > lo * steps[-1]) & (steps <= (lo + 0.1) * steps[-1])] for lo in (0.8, 0.9)]
    return np.median(tenths[1]) / np.median(tenths[0]) - 1 if all(len(t) for t in tenths) else math.nan


def within_best(runs, robust):
    """Of one arm trained at several settings ({setting: a sweep's result}): the setting whose first seed has the
    lowest validation MSE (the test half chooses nothing), each setting's paired test-MSE gap to it (compare's), and
    the settings whose gap's upper bound is at most `robust`. Returns (best, near, gaps)."""
    best = min(runs, key=lambda setting: runs[setting]["val"][runs[setting]["lr"]])
    gaps = {setting: compare(test_mse(r), test_mse(runs[best])) for setting, r in runs.items()}
    return best, [setting for setting in runs if gaps[setting][0] + gaps[setting][1] <= robust], gaps


def width_check(results, narrow, wide):
    """Convergence check 1, printed: the wider TopK arm must beat the narrower one (paired interval below 0); runs
    too short for their latents fail it. Returns True if it holds."""
    mean, half, sign = compare(test_mse(results[wide]), test_mse(results[narrow]))
    why = "the runs are too short" if math.isfinite(mean) else "a seed diverged"
    print(f"- width: {wide} against {narrow}: {mean:+.1%} ± {half:.1%} test MSE "
          + ("(lower: the wider SAE is better, as it must be)" if sign < 0 else f"(NOT lower: {why})"))
    return sign < 0


def still_learning(results):
    """Printed, not checked: how much the SAEs still learn at the end of training."""
    doubling = [np.mean(test_mse(r)) / np.mean([s["mse_half"] for s in r["seeds"]]) - 1
                for r in results.values() if "mse_half" in r["seeds"][0]]
    last = [s["last"] for r in results.values() for s in r["seeds"] if not math.isnan(s["last"])] or [math.nan]
    print(f"- still learning: the training loss moved {min(last):+.1%} to {max(last):+.1%} over the last tenth of steps"
          + (f"; doubling the steps changed test MSE by {min(doubling):+.1%} to {max(doubling):+.1%}" if doubling else "")
          + ": no SAE here is converged in the strict sense, so verdicts rest on check 2 (stability)")


def decide(results, arm, reference, paper_sign, width_ok, claim):
    """The verdict on `arm` against `reference` (paper_sign -1: the paper found lower MSE), printed with its checks:
    the paired interval at full length decides ('agrees' / 'disagrees' wholly on one side of 0, else
    'inconclusive'); it stands only if (check 2, stability) the half-length runs give the same verdict and the gap,
    extrapolated one more doubling of steps from half to full, keeps its sign; and check 1 (width) held."""
    if not all("mse_half" in s for name in (arm, reference) for s in results[name]["seeds"]):
        raise ValueError(f"decide checks stability on half-length runs, and {arm} or {reference} has none: "
                         "sweep them with halves=True")
    full = compare(test_mse(results[arm]), test_mse(results[reference]))
    half = compare([s["mse_half"] for s in results[arm]["seeds"]], [s["mse_half"] for s in results[reference]["seeds"]])
    next_gap = 2 * full[0] - half[0]  # the gap one more doubling on, if it moves as it did from half to full
    stable = full[2] == half[2] != 0 and np.sign(next_gap) == full[2]
    said = {paper_sign: "agrees", -paper_sign: "disagrees", 0: "inconclusive (the interval straddles 0)"}[full[2]]
    if full[2] != 0 and not (width_ok and stable):
        said = "inconclusive (" + ("check 1 (width) failed" if not width_ok else "not stable under training length") + ")"
    diverged = [f"{name} seed {s['seed']}" for name in (arm, reference) for s in results[name]["seeds"]
                if not math.isfinite(s["mse_typ"])]
    if diverged:  # a NaN makes every interval NaN: say why, not that it straddles 0
        said = f"inconclusive ({', '.join(diverged)} diverged)"
    elif min(len(results[name]["seeds"]) for name in (arm, reference)) < 2:
        said = "inconclusive (one seed: no interval)"
    print(f"{claim}: {arm} against {reference}: {full[0]:+.1%} ± {full[1]:.1%} test MSE ({half[0]:+.1%} ± {half[1]:.1%} "
          f"at half the steps; {next_gap:+.1%} extrapolated to twice the steps). Verdict: {said}")
    return said


def table(results):
    """One line per arm: the lr sweep (validation MSE at each lr, * the chosen), test MSE with its 95% interval
    over seeds (typical tokens and all) and, where trained, at half the steps."""
    halves = any("mse_half" in r["seeds"][0] for r in results.values())
    print(f"{'arm':>26} {'lr: validation MSE (typical tokens)':>46} {'test MSE typ':>16} {'test MSE':>16}"
          + (f" {'half the steps':>16}" if halves else ""))
    for arm, r in results.items():
        sweep = " ".join(f"{lr:g}:{v:.4g}{'*' if lr == r['lr'] else ''}" for lr, v in sorted(r["val"].items()))
        sweep += " (edge)" if r["lr"] in (min(r["val"]), max(r["val"])) and len(r["val"]) > 2 else ""
        typ, full = interval(test_mse(r)), interval(test_mse(r, typical_only=False))
        line = f"{arm:>26} {sweep:>46} {typ[0]:>9.4g} ± {typ[1]:<4.2g} {full[0]:>9.4g} ± {full[1]:<4.2g}"
        if "mse_half" in r["seeds"][0]:
            half = interval([s["mse_half"] for s in r["seeds"]])
            line += f" {half[0]:>9.4g} ± {half[1]:<4.2g}"
        print(line)
    print("* the lr chosen on the validation half of the held-out contexts (a grid edge wins: the grid is extended"
          " one step that way, twice at most; '(edge)': still at an edge); ± the 95% interval over seeds (test half)")


@torch.no_grad()
def nearest_other(W_MD, groups, chunk=2048):
    """Rows of W (M, D), normalised and cut into `groups` equal blocks. Per row: the cosine of its nearest other row and
    whether that row is in its own block; and sim (groups, groups): the mean over block i's rows of their largest cosine
    to block j's rows (a row is never its own neighbour, so the diagonal is the within-block value)."""
    unit = torch.nn.functional.normalize(W_MD.float(), dim=1)
    rows_M, size = len(unit), len(unit) // groups
    best, same, sim = torch.empty(rows_M), torch.empty(rows_M, dtype=torch.bool), torch.zeros(groups, groups)
    for start in range(0, rows_M, chunk):
        rows = torch.arange(start, min(start + chunk, rows_M), device=unit.device)
        cos = unit[rows] @ unit.T
        cos[torch.arange(len(rows)), rows] = -1.0  # not its own neighbour
        per_block = cos.view(len(rows), groups, size).amax(2)
        top, block = per_block.max(1)
        best[rows.cpu()], same[rows.cpu()] = top.cpu(), (block == rows // size).cpu()
        sim.index_add_(0, (rows // size).cpu(), per_block.cpu())
    return best, same, sim / size


def test_mse(result, typical_only=True):
    """An arm's test MSE per seed, in seed order."""
    return [s["mse_typ" if typical_only else "mse"] for s in result["seeds"]]


# -----------------------------------------------------------------------------
# sparse probing (SAEBench's k-sparse probes) and how a concept spreads over experts

PROBE_KS = (1, 2, 5, 10, 20, 50)


def probe_rows(scale, source=PROBE_DATA, seed=0):
    """Labelled texts: dicts with task, label, split (train or test) and text, at most the scale's number a class and
    split of each of its tasks, drawn with a fixed seed; texts of fewer than 2 words are left out. source: a
    .jsonl(.gz) file of such rows, or a Hugging Face dataset id (read as --dataset is); at smoke, a synthetic task
    of two classes, each drawing most of its words from its own half of the tiny LM's vocabulary."""
    caps = SCALES[check_scale(scale)]["probe"]
    if scale == "smoke":
        rng, halves = random.Random(0), (TINY_WORDS[::2], TINY_WORDS[1::2])
        rows = [dict(task="synthetic", label=label, split=split,
                     text=" ".join(rng.choice(halves[label] if rng.random() < 0.7 else TINY_WORDS) for _ in range(20)))
                for split, n in (("train", 40), ("test", 20)) for label in (0, 1) for _ in range(n)]
    elif os.path.isfile(source):
        try:
            with (gzip.open if source.endswith(".gz") else open)(source, "rt", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (ValueError, OSError, EOFError) as e:  # bad JSON or UTF-8, a gzip file cut short or not one
            raise ValueError(f"PROBE_DATA={source} is unreadable ({S.cause(e)}): give UTF-8 .jsonl(.gz)") from None
    elif S.hub_reachable():
        rows = list(S.hub_dataset(source))
    else:
        raise ValueError(f"PROBE_DATA={source} is no file, and the Hugging Face hub is unreachable: set PROBE_DATA to "
                         "a .jsonl(.gz) file with task, label, split and text in each line")
    missing = {"task", "label", "split", "text"} - set.intersection(*(set(row) for row in rows or [{}]))
    if missing or not all(isinstance(row["text"], str) for row in rows):
        raise ValueError(f"PROBE_DATA={source}: each row needs task, label, split and a text string; some lack "
                         f"{', '.join(sorted(missing)) or 'a string text'}")
    tasks, splits = {row["task"] for row in rows}, {row["split"] for row in rows}
    if not tasks & set(caps) or splits - {"train", "test"}:  # a typo would leave out rows without a word
        found = f"splits {', '.join(sorted(map(str, splits)))} and tasks {', '.join(sorted(map(str, tasks)))}"
        raise ValueError(f"PROBE_DATA={source}: rows need splits train or test, and tasks among {', '.join(caps)}; "
                         f"it has {found}")
    groups, rng = {}, random.Random(seed)
    for row in rows:
        if row["task"] in caps and len(row["text"].split()) >= 2:
            groups.setdefault((row["task"], str(row["label"]), row["split"]), []).append(row)
    chosen = []
    for (task, _, split), group in sorted(groups.items()):
        rng.shuffle(group)
        chosen += group[: caps[task][split == "test"]]
    return chosen


@torch.no_grad()
def probe_activations(study, rows):
    """The texts' activations at the study's site, each text cut at ctx tokens, position 0 left out (an attention
    sink, as SAEBench leaves out BOS): (rows, D) bf16 and each row's text. Captured once per LM, site and set of
    texts, and kept beside the activation cache."""
    from tqdm.auto import tqdm

    lm = {**study.lm, "text": ()}
    key = json.dumps([lm["model"], lm["layer"], lm.get("site", "resid"), lm["ctx"], [r["text"] for r in rows]])
    path = os.path.join(CACHES, f"probe_{study.scale}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt")
    if os.path.isfile(path):
        return torch.load(path)
    cfg = S.TrainConfig(**lm, device="auto")
    model, tokenizer = S.load_lm(cfg, study.device)
    module = S.hooked_module(model, cfg.layer, cfg.site)
    ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=cfg.ctx)["input_ids"]
    short = [r["text"] for r, i in zip(rows, ids) if len(i) < 2]
    if short:  # position 0 is left out: such a text has no activation to pool
        raise ValueError(f"{len(short)} probing texts are shorter than 2 tokens, e.g. {short[0]!r}: leave them out")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    acts = [None] * len(ids)
    for start in tqdm(range(0, len(order), cfg.lm_batch_size), desc="probe texts", mininterval=30):
        batch = order[start : start + cfg.lm_batch_size]
        L = max(len(ids[i]) for i in batch)
        # padded at the end: a causal LM's earlier positions never see what follows them
        tokens = torch.tensor([ids[i] + [ids[i][-1]] * (L - len(ids[i])) for i in batch])
        x = S.lm_activations(model, module, tokens, len(batch), skip_positions=1).view(len(batch), L - 1, -1)
        for row, i in enumerate(batch):
            acts[i] = x[row, : len(ids[i]) - 1].to(torch.bfloat16).cpu()
    text_of_row = torch.cat([torch.full((len(a),), i) for i, a in enumerate(acts)])
    result = torch.cat(acts), text_of_row
    os.makedirs(CACHES, exist_ok=True)
    torch.save(result, path)
    return result


@torch.no_grad()
def pooled_codes(sae, acts, text_of_row, chunk=4096):
    """Each text's latents averaged over its tokens (texts, M), as SAEBench pools them, and how many of its tokens'
    assignments each expert took (texts, N): one at a token, e at top-e routing (a TopK SAE: one expert)."""
    if not isinstance(sae, S.SwitchSAE):
        raise ValueError(f"pooled_codes takes a Switch SAE (TopK: --experts 1), not {type(sae).__name__}")
    texts, device = int(text_of_row.max()) + 1, sae.device
    pooled, per_expert = torch.zeros(texts, sae.width), torch.zeros(texts, sae.experts)
    for x, text in zip(acts.split(chunk), text_of_row.split(chunk)):
        x = x.float().to(device)
        vals, idx = sae.encode(x)
        pooled.index_put_((text[:, None].expand(idx.shape), idx.cpu()), vals.float().cpu(), accumulate=True)
        routing = sae.route(x * sae.input_scale)
        per_expert.index_put_((text[routing.token.cpu()], routing.expert.cpu()), torch.ones(len(routing.token)),
                              accumulate=True)
    return pooled / torch.bincount(text_of_row, minlength=texts)[:, None], per_expert


def mean_pooled(acts, text_of_row):
    """Each text's raw LM activations averaged over its tokens (texts, D): the probes' ceiling."""
    texts = int(text_of_row.max()) + 1
    sums = torch.zeros(texts, acts.shape[1]).index_add_(0, text_of_row, acts.float())
    return sums / torch.bincount(text_of_row, minlength=texts)[:, None]


def binary_tasks(rows, seed=0, min_texts=4):
    """SAEBench's binary tasks: each label of a task against the rest of that task (two labels: the first against
    the second), with as many negatives drawn as there are positives, in train and in test; a label with fewer than
    min_texts texts in either split makes no task. Returns {name: (train rows, train labels, test rows, test
    labels)} as numpy arrays."""
    rng, tasks = np.random.default_rng(seed), {}
    for task in sorted({r["task"] for r in rows}):
        labels = sorted({str(r["label"]) for r in rows if r["task"] == task})
        for label in labels[:1] if len(labels) == 2 else labels:
            parts = []
            for split in ("train", "test"):
                mine = [i for i, r in enumerate(rows) if r["task"] == task and r["split"] == split]
                pos = [i for i in mine if str(rows[i]["label"]) == label]
                neg = [i for i in mine if str(rows[i]["label"]) != label]
                n = min(len(pos), len(neg))
                pos, neg = rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)
                parts += [np.r_[pos, neg].astype(int), np.r_[np.ones(n), np.zeros(n)]]
            if min(len(parts[1]), len(parts[3])) >= 2 * min_texts:
                tasks[f"{task}: {label}"] = tuple(parts)
    return tasks


def sparse_probe(X, task, k, allowed=None):
    """SAEBench's k-sparse probe: the k columns of X (texts, features) with the largest absolute difference of class
    means on the train split (among the `allowed` columns, a bool mask, if given), a logistic regression on them
    (standardised), its accuracy on the test split. Returns (accuracy, the k columns)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, y_train, test, y_test = task
    X_train = X[train]
    diff = np.abs(X_train[y_train == 1].mean(0) - X_train[y_train == 0].mean(0))
    columns = np.arange(X.shape[1]) if allowed is None else np.flatnonzero(allowed)
    top = columns[np.argsort(-diff[columns], kind="stable")[:k]]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return probe.fit(X_train[:, top], y_train).score(X[test][:, top], y_test), top


def expected_experts(M, N, k):
    """Distinct experts among k latents drawn at random without replacement from N experts of M / N latents each:
    N (1 - C(M - m, k) / C(M, k)), the count a probe's latents would span by chance."""
    m = M // N
    return N * (1 - math.exp(math.lgamma(M - m + 1) - math.lgamma(M - m - k + 1) - math.lgamma(M + 1)
                             + math.lgamma(M - k + 1))) if k <= M - m else float(N)


def mutual_information(joint):
    """I(row; column) in bits of a table of counts, and the entropies of its rows' and columns' marginals."""
    p = joint / joint.sum()
    pr, pc = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    entropy = lambda q: -(q[q > 0] * np.log2(q[q > 0])).sum()
    return (p[nz] * np.log2(p[nz] / (pr @ pc)[nz])).sum(), entropy(pr), entropy(pc)


def duplicate_pairs(sae, x, token_ids, min_count, cosine=0.9):
    """The queen test, token by token, on held-out activations x with their token ids: for each token seen at least
    min_count times, the share of its occurrences routed off its most frequent expert (by the router's first choice),
    and the share whose strongest latent has a near-duplicate (decoder cosine > `cosine`) in another expert that is
    the strongest latent of another occurrence of the same token: the token written by a pair of latents, not one.
    Returns {token: (occurrences, share routed off, share by a duplicate pair)}."""
    if not isinstance(sae, S.SwitchSAE):
        raise ValueError(f"duplicate_pairs takes a Switch SAE, not {type(sae).__name__}")
    with torch.no_grad():
        vals, idx = sae.encode(x.to(sae.device))
        routing = sae.route(x.to(sae.device) * sae.input_scale)
        first = routing.expert.view(len(x), -1)[:, 0].cpu()  # top-e routing: the token's best expert
        top = idx.gather(1, vals.argmax(1, keepdim=True))[:, 0].cpu()
        unit = torch.nn.functional.normalize(sae.W_dec.float(), dim=1).cpu()
    m, out = sae.width // sae.experts, {}
    ids, counts = token_ids.unique(return_counts=True)
    for token in ids[counts >= min_count].tolist():
        where = token_ids == token
        experts, latents = first[where], top[where]
        modal = experts.mode().values
        used = latents.unique()
        cos = unit[used] @ unit[used].T
        other_expert = (used[:, None] // m) != (used[None, :] // m)
        paired = used[((cos > cosine) & other_expert).any(1)]
        out[token] = (int(where.sum()), (experts != modal).float().mean().item(),
                      torch.isin(latents, paired).float().mean().item())
    return out
