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
os.environ.setdefault("RESULTS", os.path.join(NOTEBOOKS, "runs"))
TEXT = os.environ.get("TEXT", os.path.join(REPO, "..", "shared", "data", "corpus.jsonl.gz"))
CACHES = (os.path.dirname(os.path.abspath(os.environ["CACHE"])) if "CACHE" in os.environ
          else os.path.join(NOTEBOOKS, "cache"))
SCALES = {
    # seconds on a CPU: a random tiny GPT-2 built here; checks that the code runs, says nothing about the method
    "smoke": dict(lm=dict(model="tiny", layer=1, ctx=16, lm_batch_size=16, eval_tokens=512),
                  cache_file="smoke.bin", cache_tokens=2304, buffer_tokens=1024, batch_size=256, tokens=2048,
                  lrs=[1e-3, 3e-3], seeds=[0, 1], log_every=2, ce_contexts=8),
    # SmolLM2-135M layer 15 on 2 CPU cores: every 128-token window of the text (--windows all) captured once in
    # bf16 (~25 min), 2.6M training tokens; each SAE trains 2,048 steps of 1,152 tokens (about a minute), so an
    # SAE of 2,304 latents sees 1,024 training tokens per latent
    "small": dict(lm=dict(model=os.environ.get("MODEL_DIR", os.path.join(REPO, "models", "smollm2")), layer=15,
                          ctx=128, lm_batch_size=16, eval_tokens=32768, windows="all", text=(TEXT,)),
                  cache_file="smollm2_l15_all.bin", cache_tokens=2_600_000, buffer_tokens=130_000,
                  batch_size=1152, tokens=2_359_296, lrs=[1e-3, 3e-3, 1e-2], seeds=[0, 1, 2],
                  log_every=20, ce_contexts=64),
    # the paper on a GPU: GPT-2 small layer 8, OpenWebText streamed live, 100k steps of 2,048 tokens (its
    # FLOP-matched script)
    "paper": dict(lm=dict(model="gpt2", layer=8, ctx=128, skip_positions=0, lm_batch_size=128, eval_tokens=65536),
                  cache_file="", batch_size=2048, tokens=204_800_000, lrs=[5e-5, 1.6e-4, 5e-4], seeds=[0, 1, 2],
                  log_every=200, ce_contexts=256),
}


def check_scale(scale):
    """A scale's name, or a one-line error naming the scales (not a bare KeyError)."""
    if scale not in SCALES:
        raise ValueError(f"SCALE={scale!r} is not a scale: use one of {', '.join(SCALES)} (lower case)")
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
        self.scale, self.p = check_scale(scale), {**SCALES[scale], **overrides}
        results = os.environ.get("RESULTS", os.path.join(NOTEBOOKS, "runs"))
        self.runs = os.path.join(results, scale)  # one folder per SAE inside: config.json, sae.safetensors, metrics
        cache_file = self.p["cache_file"]
        self.cache = self.p.get("cache") or cache_file and os.environ.get("CACHE", os.path.join(CACHES, cache_file))
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


def make_tiny_lm(folder):
    """Smoke scale: a random 2-layer GPT-2 (n_embd 32), a word-level tokenizer trained here, a synthetic corpus, so
    the notebooks run in seconds with nothing downloaded. Returns (model_dir, (corpus,))."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ("the of and to in is that it was for on are as with his they at be this from have or by one had not "
             "but what all were when we there can an your which their said if do will each about how up out them "
             "then she many").split()
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


def width_check(results, narrow, wide):
    """Convergence check 1, printed: the wider TopK arm must beat the narrower one (paired interval below 0); runs
    too short for their latents fail it. Returns True if it holds."""
    mean, half, sign = compare(test_mse(results[wide]), test_mse(results[narrow]))
    print(f"- width: {wide} against {narrow}: {mean:+.1%} ± {half:.1%} test MSE "
          + ("(lower: the wider SAE is better, as it must be)" if sign < 0 else "(NOT lower: the runs are too short)"))
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
