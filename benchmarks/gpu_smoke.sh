#!/usr/bin/env bash
# gpu_smoke.sh -- GPU smoke check for the MAST sweep platform on ONE GPU machine with no
# internet and no Hugging Face Hub. Target: <= 8 minutes on one H200 (about 3 min without vLLM).
#
# What it checks (each stage is PASS / FAIL / SKIP / WARN in $OUT/summary.json):
#   S0 preflight  nvidia-smi, python/torch/CUDA, unpacks the carried packages and the toy,
#                 imports mast + ray + mlflow + math_verify, mast.resources' GPU checks
#                 (require_cuda(1), local_gpu_count() >= 1), detects vLLM (SKIPs the vLLM parts
#                 with a reason when it is absent: the lent H200 image has no vLLM, and vLLM
#                 cannot be carried there, see "What it needs" below).
#   S1 pytest     the repo's own `gpu` tests (bf16 autocast + gradient checkpointing unlearning on
#                 CUDA, frozen bits / dtype kept) and the CUDA paths of tests/test_resources.py;
#                 the vLLM test is left to S2.
#   S2 parity     the toy RLVR model on the toy forget+retain suites (200 prompts, greedy, 64 tokens):
#                 hf/CPU fp32 vs toy_summary.json (reproducibility of the copied toy), hf/CUDA bf16,
#                 and vLLM bf16 (own process, gpu_memory_utilization 0.3, through evaluate_many: the
#                 greedy suite and a sampled n=4 suite in ONE worker / generate() call): vLLM must
#                 agree with hf/CUDA on >= 95% of extracted answers, on accuracy within 0.03, on
#                 the response token counts (same counting: EOS excluded) and on `truncated`; the
#                 n=4 suite must keep 4 scored samples per problem.
#   S3 ray probe  a local Ray started like `mast sweep` does (no num_gpus: autodetect): the GPU is
#                 detected (and equals mast.resources.local_gpu_count(), so check_local_gpus
#                 agrees with Ray); a num_gpus=1 task gets CUDA_VISIBLE_DEVICES and a subprocess of it (the
#                 vLLM worker's situation) sees exactly one device; two num_gpus=0.5 tasks share
#                 one device (what fractional trials do); what a num_gpus=0 task sees.
#   S4 sweep      `mast sweep` end to end with resources.gpu 1: 1 trial (mast/npo/k4/s0), bf16 +
#                 gradient checkpointing unlearning on CUDA, evaluation with vLLM if present (else
#                 hf), McNemar vs the baseline, MLflow (sqlite), report; checks sweep.json n_ok=1,
#                 the trial checkpoint's manifest (device cuda, bf16_autocast), the delta in
#                 checkpoint/delta/ (only the model's weights at the top level: vLLM loads them
#                 all), per-suite results with `truncated`,
#                 the baseline evaluated inside the Ray GPU task, and that no GPU memory is left held.
#
# What it needs (carry one ignored folder, e.g. .gpu_smoke/, holding this script and):
#   toy.tar.xz      `mast toy toy --seed 0` built on a CPU machine (4-11 min), packed as
#                   `tar -cJf toy.tar.xz toy` (folder name `toy` at the top). No Hub access is needed:
#                   the toy has its own tokenizer; HF_HUB_OFFLINE=1 is set anyway.
#   site312.tar.xz  the Python packages the GPU machine's image lacks, pre-extracted for CPython 3.12
#                   x86_64 (the image's python3 is 3.12 with torch 2.11+cu130, transformers 5.17):
#                   ray 2.60.0 without ray/jars (32 MB Java jar), the dashboard UI build, rllib,
#                   serve and llm (the full wheel is 79 MB, over the 64 MiB a call may carry);
#                   pydantic(+core, annotated-types, typing-inspection), jsonschema(+specs,
#                   referencing, rpds-py), tensorboardX, mlflow-skinny + mlflow-tracing (+ sqlalchemy,
#                   alembic, mako, cryptography, cffi, pycparser, sqlparse, cachetools, databricks-sdk,
#                   google-auth, pyasn1(-modules), fastapi, starlette, uvicorn, gitpython, gitdb, smmap,
#                   importlib-metadata, opentelemetry-api/sdk/proto/semantic-conventions, python-dotenv),
#                   math-verify + latex2sympy2_extended + antlr4-python3-runtime 4.13.2, and newer
#                   typing_extensions 4.16 / protobuf 7.36 (pydantic 2.14 and ray/opentelemetry need
#                   them). Built by build_carry.sh next to this file (41 MiB; with toy.tar.xz 9 MiB and
#                   the repo 0.6 MiB a call carries ~51 MiB of its 64 MiB). Folder `site312` at the top.
#   vLLM            NOT carried: the GPU machine reaches no registry, vLLM 0.33's wheel is 336 MB
#                   (over the 64 MiB per call) and pins torch==2.14.0 while the image has 2.11. On
#                   such a machine the vLLM parts SKIP; on a cluster node with `pip install -e
#                   '.[vllm]'` they run (set SMOKE_SITE_DIR=none there; mast is then importable).
#
# Build the carry on the CPU machine (from the project's root; see docs/gpu-smoke.md):
#   echo /.gpu_smoke/ >> .git/info/exclude
#   bash benchmarks/build_carry.sh .gpu_smoke runs/toy       # after `mast toy runs/toy --seed 0`
# On the GPU machine, from the project's root, with .gpu_smoke/ (git-ignored) holding this script and the two
# archives that build_carry.sh makes:   bash .gpu_smoke/gpu_smoke.sh     (limit it to ~540 s)
# On a cluster node installed with `pip install -e '.[vllm]'`:
#   SMOKE_SITE_DIR=none SMOKE_TOY=runs/toy bash benchmarks/gpu_smoke.sh
# Results are written to $OUT (<= 8 files): smoke.log, summary.json, preflight.json, parity.json,
# ray_probe.json, sweep_check.json, sweep_trials.jsonl. Exit 0 when no stage FAILed (SKIP/WARN allowed).
#
# Knobs (env): SMOKE_BUDGET_S (470), SMOKE_PYTHON (python3), SMOKE_SITE_DIR (an extracted site dir,
# or "none"), SMOKE_TOY (an extracted toy dir), SMOKE_EXTRA_PYTHONPATH, SMOKE_ALLOW_CPU=1 (rehearse
# the plumbing on a CPU machine: gpu 0, hf on CPU; CUDA-only checks SKIP).

set -uo pipefail
T0=$(date +%s)
BUDGET=${SMOKE_BUDGET_S:-470}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="${SMOKE_REPO:-$(cd "$HERE/.." && pwd)}"
OUT="${OUT:-/tmp/mast_smoke_out}"
WORK="${SMOKE_WORK:-/tmp/mast_smoke}"
PY="${SMOKE_PYTHON:-python3}"
ALLOW_CPU="${SMOKE_ALLOW_CPU:-0}"
mkdir -p "$OUT"; rm -rf "$WORK"; mkdir -p "$WORK"
exec > >(tee -a "$OUT/smoke.log") 2>&1

declare -A STATUS NOTE
ORDER=(S0_preflight S1_pytest_gpu S2_parity S3_ray_probe S4_sweep)
log() { printf '[smoke %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# seconds a stage may use: what it asks for, capped by what is left (10 s kept for the summary)
slot() { local want=$1 left; left=$(( $(remaining) - 10 )); (( left < want )) && echo "$left" || echo "$want"; }
set_status() { STATUS[$1]=$2; NOTE[$1]=${3:-}; log "$1: $2 ${3:-}"; }
# run_py STAGE WANT_S SCRIPT_FILE: python with a timeout; rc 0 PASS, 3 WARN, 4 SKIP, 124/137 TIMEOUT, else FAIL
run_py() {
  local stage=$1 want=$2 file=$3 t rc
  t=$(slot "$want")
  if (( t < 20 )); then set_status "$stage" SKIP "out of time budget"; return; fi
  log "$stage: start (limit ${t}s)"
  timeout -k 10 "$t" "$PY" "$file"; rc=$?
  case $rc in
    0) set_status "$stage" PASS ;;
    3) set_status "$stage" WARN "see log" ;;
    4) set_status "$stage" SKIP "see log" ;;
    124|137) set_status "$stage" FAIL "timed out after ${t}s" ;;
    *) set_status "$stage" FAIL "exit $rc" ;;
  esac
}

# ------------------------------------------------------------------ environment (offline, quiet)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MAST_CACHE="$WORK/cache"
export RAY_USAGE_STATS_ENABLED=0 RAY_memory_monitor_refresh_ms=0   # MemTotal of a microVM can start low
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 MAST_RAY_OBJECT_STORE_MB=512
unset RAY_ADDRESS MLFLOW_TRACKING_URI                # local Ray; sqlite MLflow store in the sweep folder
export SMOKE_OUT="$OUT" SMOKE_WORK="$WORK" SMOKE_ALLOW_CPU="$ALLOW_CPU"

# ------------------------------------------------------------------ S0 preflight
log "S0_preflight: repo $REPO, work $WORK, out $OUT, budget ${BUDGET}s"
S0_OK=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
else
  log "no nvidia-smi"; [[ $ALLOW_CPU == 1 ]] || S0_OK=0
fi
# unpack an .tar.xz into a folder: tar+xz where xz exists, else Python's tarfile (lzma is in the stdlib)
untar_xz() { mkdir -p "$2"; if command -v xz >/dev/null; then tar -xJf "$1" -C "$2";
             else "$PY" -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; fi; }
SITE="${SMOKE_SITE_DIR:-}"
if [[ -z $SITE && -f $HERE/site312.tar.xz ]]; then
  rm -rf /tmp/mast_site; SITE=/tmp/mast_site/site312
  untar_xz "$HERE/site312.tar.xz" /tmp/mast_site || { log "site312.tar.xz: unpack failed"; S0_OK=0; }
fi
[[ $SITE == none ]] && SITE=""
export PYTHONPATH="${SMOKE_EXTRA_PYTHONPATH:+$SMOKE_EXTRA_PYTHONPATH:}${SITE:+$SITE:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
TOY="${SMOKE_TOY:-}"
if [[ -z $TOY && -f $HERE/toy.tar.xz ]]; then
  untar_xz "$HERE/toy.tar.xz" "$WORK" && TOY="$WORK/toy"
fi
export TOY
cat > "$WORK/s0.py" <<'PY'
import importlib, json, os, sys, time
t = time.time()
info = {"python": sys.version.split()[0]}
import torch
info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                bf16=torch.cuda.is_bf16_supported())
bad = []
for m in ("pydantic", "transformers", "huggingface_hub", "ray", "ray.tune", "mlflow", "math_verify", "mast.sweep",
          "mast.tracking", "mast.hub", "mast.resources", "mast.vllm_worker"):
    try:
        mod = importlib.import_module(m)
        info[m] = getattr(mod, "__version__", "ok")
    except Exception as e:  # report every missing piece at once
        bad.append(f"{m}: {type(e).__name__}: {e}")
try:
    import vllm
    info["vllm"] = vllm.__version__
except Exception as e:
    info["vllm"] = None
    info["vllm_absent_because"] = f"{type(e).__name__}: {str(e)[:200]}"
if not bad:  # the checks a GPU trial / a GPU sweep make before they start
    from mast.resources import NoCudaError, local_gpu_count, require_cuda
    info["local_gpu_count"] = local_gpu_count()
    try:
        require_cuda(1.0)
        info["require_cuda"] = "ok"
    except NoCudaError as e:
        info["require_cuda"] = str(e)
        if os.environ.get("SMOKE_ALLOW_CPU") != "1":
            bad.append(f"require_cuda: {e}")
toy = os.environ.get("TOY")
if toy:
    from mast.toy import is_finished
    info["toy_finished"] = is_finished(toy, seed=0)
info["import_seconds"] = round(time.time() - t, 1)
json.dump(info, open(os.path.join(os.environ["SMOKE_WORK"], "s0.json"), "w"), indent=1)
print(json.dumps(info, indent=1))
for b in bad:
    print("MISSING", b)
if bad or not toy or not info.get("toy_finished"):
    sys.exit(1)
if not info["cuda"] and os.environ.get("SMOKE_ALLOW_CPU") != "1":
    sys.exit(1)
PY
if (( S0_OK )); then run_py S0_preflight 90 "$WORK/s0.py"; else set_status S0_preflight FAIL "no GPU or site unpack failed"; fi
VLLM=0; CUDA=0
if [[ -f $WORK/s0.json ]]; then
  VLLM=$("$PY" -c "import json;print(1 if json.load(open('$WORK/s0.json')).get('vllm') else 0)")
  CUDA=$("$PY" -c "import json;print(1 if json.load(open('$WORK/s0.json')).get('cuda') else 0)")
fi
export VLLM CUDA
(( VLLM )) || log "vLLM absent: vLLM parity and the vLLM sweep path will SKIP (hf backend used for the sweep)"

if [[ ${STATUS[S0_preflight]} != PASS ]]; then
  for s in S1_pytest_gpu S2_parity S3_ray_probe S4_sweep; do set_status "$s" SKIP "preflight failed"; done
else
  # ---------------------------------------------------------------- S1 the repo's gpu-marked tests
  t=$(slot 120)
  if (( ! CUDA )); then set_status S1_pytest_gpu SKIP "no CUDA";
  elif (( t < 30 )); then set_status S1_pytest_gpu SKIP "out of time budget";
  else
    log "S1_pytest_gpu: start (limit ${t}s)"
    ( cd "$REPO" && MAST_TOY="$TOY" timeout -k 10 "$t" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        -k "not vllm" tests/test_unlearn.py tests/test_evaluation.py && \
      timeout -k 10 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_resources.py \
        -k "require_cuda or local_gpu_count" ); rc=$?
    case $rc in 0) set_status S1_pytest_gpu PASS ;; 124|137) set_status S1_pytest_gpu FAIL "timed out" ;;
                *) set_status S1_pytest_gpu FAIL "pytest exit $rc" ;; esac
  fi

  # ---------------------------------------------------------------- S2 backend parity on the toy suites
  cat > "$WORK/s2.py" <<'PY'
import json, os, sys, time
from pathlib import Path
from mast.config import DecodingSpec, load_suite
from mast.evaluation import evaluate, evaluate_many
from mast.files import read_jsonl

toy, out = Path(os.environ["TOY"]), Path(os.environ["SMOKE_OUT"])
cuda, vllm = os.environ.get("CUDA") == "1", os.environ.get("VLLM") == "1"
summary = json.loads((toy / "toy_summary.json").read_text())
suite = load_suite(toy / "suites" / "forget.yaml")     # greedy, 64 new tokens, the toy template
suite.limit = None
parts = {n: read_jsonl(toy / "data" / f"{n}_eval.jsonl") for n in ("forget", "retain")}
problems = parts["forget"] + parts["retain"]           # one call per backend: one vLLM start
runs = {}

def run(name, backend, opts):
    t = time.time()
    r = evaluate(toy / "rlvr", suite, backend=backend, problems=problems, use_cache=False, progress=False,
                 backend_options=opts)
    runs[name] = {"records": r.records, "seconds": round(time.time() - t, 1)}
    print(f"{name}: {r.n_correct}/{r.n} in {runs[name]['seconds']}s", flush=True)

run("hf_cpu_fp32", "hf", {"device": "cpu"})
if cuda:
    run("hf_cuda_bf16", "hf", {"device": "cuda"})
if vllm:
    # the greedy suite and a sampled n=4 suite in ONE vLLM worker (evaluate_many -> one generate())
    sampled = suite.model_copy(update={"name": "sampled", "limit": 50, "decoding": DecodingSpec(
        temperature=0.6, top_p=0.95, n=4, max_tokens=64, seed=0)})
    t = time.time()
    both = evaluate_many(toy / "rlvr", [suite, sampled], backend="vllm", use_cache=False, progress=False,
                         problems={suite.name: problems, "sampled": problems},
                         backend_options={"gpu_memory_utilization": 0.3, "dtype": "bfloat16", "enforce_eager": True,
                                          "timeout_s": 300})
    r = both[suite.name]
    runs["vllm_bf16"] = {"records": r.records, "seconds": round(time.time() - t, 1)}
    runs["vllm_sampled_n4"] = both["sampled"]
    print(f"vllm_bf16 (+ sampled n=4 in the same call): {r.n_correct}/{r.n} in {runs['vllm_bf16']['seconds']}s",
          flush=True)

def acc(recs, ids):
    sel = [r for r in recs if r["id"] in ids]
    return sum(r["correct"] for r in sel) / len(sel)

def compare(a, b):
    ra, rb = runs[a]["records"], runs[b]["records"]
    assert [r["id"] for r in ra] == [r["id"] for r in rb], "request order differs"
    n = len(ra)
    return {"n": n, "same_response": sum(x["response"] == y["response"] for x, y in zip(ra, rb)) / n,
            "same_extracted": sum(x["extracted"] == y["extracted"] for x, y in zip(ra, rb)) / n,
            "acc_" + a: sum(x["correct"] for x in ra) / n, "acc_" + b: sum(y["correct"] for y in rb) / n,
            "same_response_tokens": sum(x["response_tokens"] == y["response_tokens"]
                                        for x, y in zip(ra, rb) if x["response"] == y["response"])
                                    / max(1, sum(x["response"] == y["response"] for x, y in zip(ra, rb))),
            "same_truncated": sum(x.get("truncated") == y.get("truncated") for x, y in zip(ra, rb)) / n,
            "response_tokens_diff": [x["response_tokens"] - y["response_tokens"] for x, y in zip(ra, rb)][:20]}

res = {"toy_summary_rlvr": summary["rlvr"],
       "seconds": {k: v["seconds"] for k, v in runs.items() if isinstance(v, dict)}}
ids = {n: {p["id"] for p in parts[n]} for n in parts}
res["hf_cpu_vs_toy_summary"] = {n: [acc(runs["hf_cpu_fp32"]["records"], ids[n]), summary["rlvr"][n]] for n in parts}
status = 0
if any(abs(a - b) > 1e-9 for a, b in res["hf_cpu_vs_toy_summary"].values()):
    print("WARN: hf/CPU accuracy differs from toy_summary.json (other CPU/BLAS/torch than the build)")
    status = 3
if cuda:
    res["hf_cuda_vs_hf_cpu"] = compare("hf_cuda_bf16", "hf_cpu_fp32")
    if res["hf_cuda_vs_hf_cpu"]["same_extracted"] < 0.9:
        print("WARN: bf16 on CUDA changes >10% of the greedy answers vs fp32 on CPU")
        status = status or 3
if vllm:
    c = res["vllm_vs_hf_cuda"] = compare("vllm_bf16", "hf_cuda_bf16")
    ok = c["same_extracted"] >= 0.95 and abs(c["acc_vllm_bf16"] - c["acc_hf_cuda_bf16"]) <= 0.03
    # same text -> same token count (both exclude the EOS) and same truncation flag
    counts_ok = c["same_response_tokens"] == 1.0 and c["same_truncated"] >= 0.95
    print(("PASS" if ok else "FAIL") + f": vLLM vs hf/CUDA same extracted {c['same_extracted']:.3f}, "
          f"same text {c['same_response']:.3f}, acc {c['acc_vllm_bf16']:.3f} vs {c['acc_hf_cuda_bf16']:.3f}")
    print(("PASS" if counts_ok else "FAIL") + f": token counts equal on equal texts {c['same_response_tokens']:.3f}, "
          f"same truncated {c['same_truncated']:.3f}")
    s4 = runs["vllm_sampled_n4"]
    n4_ok = all(len(rec.get("samples", [])) == 4 for rec in s4.records) and s4.truncated_rate is not None
    res["vllm_sampled_n4"] = s4.metrics()
    print(("PASS" if n4_ok else "FAIL") + f": n=4 sampled suite {s4.metrics()}")
    status = status if (ok and counts_ok and n4_ok) else 1
else:
    res["vllm_vs_hf_cuda"] = "SKIPPED: vllm not importable"
(out / "parity.json").write_text(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if k != "toy_summary_rlvr"}, indent=1))
if not cuda and os.environ.get("SMOKE_ALLOW_CPU") != "1":
    sys.exit(1)
sys.exit(status)
PY
  run_py S2_parity 150 "$WORK/s2.py"

  # ---------------------------------------------------------------- S3 what Ray gives a GPU trial
  cat > "$WORK/s3.py" <<'PY'
import json, os, subprocess, sys, time
import ray

# as mast.sweep._ray_init starts a local Ray: no num_gpus, so Ray must autodetect the GPU
ray.init(address="local", num_cpus=int(os.environ.get("MAST_RAY_NUM_CPUS", os.cpu_count() or 1)),
         include_dashboard=False, object_store_memory=256 * 2**20)
res = {"cluster_resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}
from mast.resources import local_gpu_count
res["local_gpu_count"] = local_gpu_count()   # what check_local_gpus uses BEFORE starting Ray
print(res, flush=True)
count_ok = res["local_gpu_count"] == int(res["cluster_resources"].get("GPU", 0))
print(("PASS" if count_ok else "FAIL") + ": mast.resources.local_gpu_count() == the GPUs Ray registered", flush=True)
CHILD = ("import os, torch; print(os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.device_count(), "
         "torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')")

def probe():
    import torch
    sub = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_ids": ray.get_gpu_ids(),
            "torch_device_count": torch.cuda.device_count(), "subprocess": sub.stdout.strip() or sub.stderr[-300:]}

@ray.remote(num_gpus=1)
def whole():
    return probe()

@ray.remote(num_gpus=0.5)
def half(i):
    t = time.time(); time.sleep(3); e = time.time(); d = probe(); d.update(start=t, end=e); return d

@ray.remote(num_gpus=0)
def none():
    return probe()

status = 0
if res["cluster_resources"].get("GPU", 0) < 1:
    print("no GPU in the Ray cluster: a gpu=1 trial would wait forever for resources")
    status = 0 if os.environ.get("SMOKE_ALLOW_CPU") == "1" else 1
else:
    res["gpu1_task"] = ray.get(whole.remote(), timeout=180)
    h = ray.get([half.remote(0), half.remote(1)], timeout=180)
    res["gpu0.5_tasks"] = h
    overlap = h[0]["start"] < h[1]["end"] and h[1]["start"] < h[0]["end"]   # both ran at once
    res["gpu0.5_concurrent_same_device"] = overlap and h[0]["CUDA_VISIBLE_DEVICES"] == h[1]["CUDA_VISIBLE_DEVICES"]
    g = res["gpu1_task"]
    ok = g["torch_device_count"] == 1 and g["subprocess"].split()[:2] == [g["CUDA_VISIBLE_DEVICES"], "1"]
    print(("PASS" if ok else "FAIL") + ": gpu=1 task and its subprocess see exactly one device", flush=True)
    status = 0 if ok else 1
status = status if count_ok else 1
res["gpu0_task"] = ray.get(none.remote(), timeout=180)
ray.shutdown()
open(os.path.join(os.environ["SMOKE_OUT"], "ray_probe.json"), "w").write(json.dumps(res, indent=1, default=str))
print(json.dumps(res, indent=1, default=str))
sys.exit(status)
PY
  run_py S3_ray_probe 75 "$WORK/s3.py"

  # ---------------------------------------------------------------- S4 one sweep trial end to end
  BACKEND=hf; (( VLLM )) && BACKEND=vllm
  GPU=1; (( CUDA )) || GPU=0                       # CPU rehearsal only (SMOKE_ALLOW_CPU=1)
  NCPU=$(nproc 2>/dev/null || echo 4); TRIAL_CPU=$(( NCPU < 4 ? NCPU : 4 ))   # a trial must fit the local Ray
  cat > "$WORK/smoke_sweep.yaml" <<YAML
# 1 trial: mast rule, NPO, k 4, seed 0 on the toy; bf16 + gradient checkpointing on CUDA.
name: gpu-smoke
models:
  toy: {seed: 0, out: $TOY}
data: {forget_size: 64, retain_size: 64}
grid: {rule: [mast], objective: [npo], k: [4], seed: [0]}
selection: {rho: 0.05, max_length: 128}
unlearning: {lr: 3.0e-5, steps: 5, batch_size: 8, retain: nll, alpha: 1.0, max_length: 128,
             bf16: true, gradient_checkpointing: true}
evaluation:
  suites: [forget, retain]
  backend: $BACKEND
  batch_size: 100
  gpu_memory_utilization: 0.85     # as sweeps/paper.yaml: vLLM must find 85% of the GPU free after in-process unlearning
  dtype: bfloat16
  enforce_eager: true              # a quick start: the smoke generates 64-token answers only
  timeout_s: 240
  limits: {forget: 50, retain: 50}
  noise_floor: false               # one trial exactly (the null trials have their own tests)
resources: {cpu: $TRIAL_CPU, gpu: $GPU, max_concurrent: 1, max_failures: 0}
keep_checkpoints: true
scheduler: {kind: fifo}
YAML
  t=$(slot 270)
  if (( t < 60 )); then set_status S4_sweep SKIP "out of time budget"; else
    log "S4_sweep: start (limit ${t}s, backend $BACKEND, gpu $GPU)"
    ( cd "$WORK" && timeout -k 15 "$t" "$PY" -m mast.cli sweep "$WORK/smoke_sweep.yaml" --out "$WORK/sweep" ); rc=$?
    log "S4_sweep: mast sweep exit $rc"
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null \
      > "$WORK/compute_apps.txt" || true
    export SWEEP_RC=$rc BACKEND GPU
    cat > "$WORK/s4.py" <<'PY'
import json, os, sys
from pathlib import Path
w, out = Path(os.environ["SMOKE_WORK"]), Path(os.environ["SMOKE_OUT"])
sd = w / "sweep"
chk, problems = {"sweep_exit": int(os.environ["SWEEP_RC"]), "backend": os.environ["BACKEND"]}, []
def need(cond, what):
    if not cond:
        problems.append(what)
meta = json.loads((sd / "sweep.json").read_text()) if (sd / "sweep.json").is_file() else {}
chk["sweep_json"] = {k: meta.get(k) for k in ("n_trials", "n_ok", "n_failed", "baseline_evaluations", "tracking_uri")}
need(chk["sweep_exit"] == 0, "mast sweep exit != 0")
need(meta.get("n_ok") == 1 and meta.get("n_failed") == 0, "sweep.json: n_ok != 1 or failures")
prep = json.loads((sd / "prepared" / "prepared.json").read_text()) if (sd / "prepared" / "prepared.json").is_file() else {}
chk["prepared_backend"], chk["baseline_accuracy"] = prep.get("backend"), prep.get("baseline_accuracy")
need(prep.get("backend") == os.environ["BACKEND"], "prepared.json backend")
tdirs = sorted((sd / "trials").glob("*/")) if (sd / "trials").is_dir() else []
need(len(tdirs) == 1, f"expected 1 trial folder, found {len(tdirs)}")
if tdirs:
    td = tdirs[0]
    row = json.loads((td / "result.json").read_text()) if (td / "result.json").is_file() else {}
    chk["trial"] = {"id": row.get("trial_id"), "status": row.get("status"), "error": row.get("error"),
                    "selected": row.get("selected"), "timing": row.get("timing"),
                    "suites": {n: {k: m.get(k) for k in ("acc_before", "acc_after", "delta", "p_value", "n")}
                               for n, m in (row.get("suites") or {}).items()}}
    need(row.get("status") == "ok", "trial status != ok")
    need(set(row.get("suites") or {}) == {"forget", "retain"}, "trial suites != forget, retain")
    for n in ("forget", "retain"):
        f = td / "results" / f"{n}.jsonl"
        need(f.is_file() and len(f.read_text().splitlines()) == 50, f"results/{n}.jsonl: 50 rows")
        rows = [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []
        need(all("truncated" in r for r in rows), f"results/{n}.jsonl: no per-problem `truncated`")
    ck = td / "checkpoint"
    top = sorted(p.name for p in ck.glob("*.safetensors"))
    chk["checkpoint_top_level_safetensors"] = top
    need((ck / "delta" / "delta.safetensors").is_file(), "checkpoint/delta/delta.safetensors missing")
    need("delta.safetensors" not in top, "a delta beside the weights: vLLM would load it as weights")
    man = td / "checkpoint" / "manifest.json"
    m = json.loads(man.read_text()) if man.is_file() else {}
    chk["unlearn_manifest"] = {k: m.get(k) for k in ("device", "bf16_autocast", "gradient_checkpointing",
                                                     "trainable_tensors", "changed_tensors", "seconds")}
    if os.environ["GPU"] == "1":
        need(str(m.get("device", "")).startswith("cuda"), "unlearning did not run on CUDA in the trial")
        need(m.get("bf16_autocast") is True and m.get("gradient_checkpointing") is True, "bf16/checkpointing off")
    need(bool(m.get("changed_tensors")), "no tensor changed")
need((sd / "mlflow.db").is_file(), "no MLflow sqlite store")
need((sd / "report" / "report.html").is_file() or (sd / "report" / "report.md").is_file(), "no report")
apps = (w / "compute_apps.txt").read_text().strip() if (w / "compute_apps.txt").is_file() else ""
chk["gpu_processes_after_sweep"] = apps.splitlines()
need(not apps, "GPU memory still held by a process after the sweep (vLLM / trial not shut down)")
chk["problems"] = problems
(out / "sweep_check.json").write_text(json.dumps(chk, indent=1, default=str))
if (sd / "trials.jsonl").is_file():
    (out / "sweep_trials.jsonl").write_text((sd / "trials.jsonl").read_text())
print(json.dumps(chk, indent=1, default=str))
sys.exit(1 if problems else 0)
PY
    timeout 60 "$PY" "$WORK/s4.py"; rc=$?
    if (( rc == 0 )); then set_status S4_sweep PASS "backend $BACKEND"; else set_status S4_sweep FAIL "see sweep_check.json"; fi
    for f in "$WORK"/sweep/trials/*/error.json; do [[ -f $f ]] && { log "trial error:"; tail -c 3000 "$f"; }; done
  fi
fi

# ------------------------------------------------------------------ summary
FAILED=0; ARGS=()
for s in "${ORDER[@]}"; do
  st=${STATUS[$s]:-SKIP}; [[ $st == FAIL ]] && FAILED=1
  ARGS+=("$s" "$st" "${NOTE[$s]:-}")
done
"$PY" - "$OUT/summary.json" "$(( $(date +%s) - T0 ))" "$VLLM" "$CUDA" "${ARGS[@]}" <<'PY'
import json, sys
path, secs, vllm, cuda, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5:]
stages = {rest[i]: {"status": rest[i + 1], "note": rest[i + 2]} for i in range(0, len(rest), 3)}
json.dump({"seconds": secs, "vllm_present": vllm, "cuda": cuda, "stages": stages}, open(path, "w"), indent=1)
for k, v in stages.items():
    print(f"  {k:16s} {v['status']:5s} {v['note']}")
PY
cp "$WORK/s0.json" "$OUT/preflight.json" 2>/dev/null || true
log "done in $(( $(date +%s) - T0 ))s; $([[ $FAILED == 1 ]] && echo 'some stage FAILED' || echo 'no stage failed')"
exit $FAILED
