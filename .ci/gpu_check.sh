#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in under 8 minutes, run the cuda tests, the two benchmarks
# (issue targets: N=16 at width 24,576 >= 4x TopK's step, N=64 at width 131,072 >= 10x and >= 2M tokens/s),
# capture throughput of random-weight GPT-2 small to layer 8 in bf16 (>= 1M tokens/s) and a 20M-token
# training run from live capture, with the LM forward and the SAE steps timed apart. Writes OUT/summary.json.
#
# usage: bash .ci/gpu_check.sh [OUT]     (default: $OUT, else gpu_check/)
#        SMALL=1 bash .ci/gpu_check.sh   (tiny sizes, any device: checks the script itself on a CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
if [ -n "${SMALL:-}" ]; then
  D=768; W16=1024; W64=4096; B=512; LM=gpt2-tiny; RUN_TOKENS=204800; DEVICE=cpu; LMB=4  # d: bench times GPT-2 small's capture
else
  D=768; W16=24576; W64=131072; B=8192; LM=gpt2; RUN_TOKENS=20000000; DEVICE=cuda; LMB=128
fi
step() { echo "[$(date +%T)] $*" >&2; }

step "cuda tests"
python -m pytest -q -m cuda test_switch_sae.py -p no:cacheprovider > "$OUT/cuda_tests.txt" 2>&1
echo $? > "$OUT/cuda_tests.rc"

step "bench N=16 width $W16"
python switch_sae.py bench --device "$DEVICE" --experts 16 --width "$W16" --k 32 --d-in "$D" --batch-size "$B" \
  --steps 10 --json > "$OUT/bench_n16.json" 2> "$OUT/bench_n16.err"
step "bench N=64 width $W64, with capture of $LM to layer 8 and a profile"
python switch_sae.py bench --device "$DEVICE" --experts 64 --width "$W64" --k 32 --d-in "$D" --batch-size "$B" \
  --steps 10 --json --profile --model "$([ "$LM" = gpt2-tiny ] && echo gpt2 || echo "$LM")" --layer 8 \
  --lm-batch-size "$LMB" > "$OUT/bench_n64.json" 2> "$OUT/bench_n64_profile.txt"

step "random GPT-2 and synthetic text for the training run"
python - "$OUT/lm" "$LM" "$RUN_TOKENS" <<'PY'
import json, os, random, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
out, kind, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(0)
words = [f"w{i}" for i in range(5000)]  # a word-level vocabulary: tokenizing stays cheap beside the LM
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
os.makedirs(out, exist_ok=True)
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
small = kind == "gpt2-tiny"
config = GPT2Config(n_layer=9, n_embd=64, n_head=4) if small else GPT2Config()  # GPT-2 small's shape
GPT2LMHeadModel(config).save_pretrained(out)
with open(os.path.join(out, "corpus.jsonl"), "w") as f:  # documents of 129-200 words, enough for the run
    for _ in range(int(tokens * 1.1) // 128 + 200):
        f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(129, 200)))}) + "\n")
PY

step "training run: $RUN_TOKENS tokens, live capture, N=16 width $W16"
python switch_sae.py --model "$OUT/lm" --text "$OUT/lm/corpus.jsonl" --layer 8 --device "$DEVICE" --experts 16 \
  --width "$W16" --k 32 --tokens "$RUN_TOKENS" --batch-size "$B" --lm-batch-size 256 --skip-ce \
  --out "$OUT/run" --log-every 100 > "$OUT/run.txt" 2>&1
echo $? > "$OUT/run.rc"

step "summary"
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):  # None where a step failed: its .err, .txt or .rc file in OUT says why
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
tests = open(os.path.join(out, "cuda_tests.txt")).read().strip().splitlines()
n16, n64, run = load("bench_n16.json"), load("bench_n64.json"), load("run/metrics.json")
summary = {"cuda_tests": {"rc": int(open(os.path.join(out, "cuda_tests.rc")).read()), "last_line": tests[-1] if tests else ""},
           "bench_n16": n16, "bench_n64": n64}
if run:
    lm_s, sae_s = run["seconds_activations"], run["seconds_sae"]
    summary["run"] = {"train_tokens": run["train_tokens"], "seconds_lm": lm_s, "seconds_sae": sae_s,
                      "tokens_per_s": run["train_tokens"] / (lm_s + sae_s), "lm_tokens_per_s": run["train_tokens"] / lm_s,
                      "sae_tokens_per_s": run["train_tokens"] / sae_s, "mse": run["mse"], "fve": run["fve"]}
targets = {}
if n16:
    targets["n16_speedup_at_least_4"] = [n16["speedup"], n16["speedup"] >= 4]
if n64:
    targets["n64_speedup_at_least_10"] = [n64["speedup"], n64["speedup"] >= 10]
    targets["n64_sae_tokens_per_s_at_least_2M"] = [n64["sae_tokens_per_s"], n64["sae_tokens_per_s"] >= 2e6]
    targets["capture_tokens_per_s_at_least_1M"] = [n64.get("capture_tokens_per_s"), (n64.get("capture_tokens_per_s") or 0) >= 1e6]
    targets["mfu"] = n64["mfu"]
summary["targets"] = targets
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary["targets"]))
PY
