"""Generation backends: one contract, two engines, the same token ids.

Every caller generates through ONE method, ``Backend.generate(requests)``: a list of
:class:`GenerationRequest` (prompt token ids from :func:`encode_prompts` + a
:class:`mast.config.DecodingSpec`) in, per request, per prompt, its ``decoding.n`` samples
``{"text", "n_tokens", "truncated", "finish_reason"}`` out, in request order. A caller puts
every group of a call into one list (in the spirit of lm-evaluation-harness's
``LM.generate_until``), so an engine that can batch across groups does:

- ``hf``: transformers batched generation (CPU or GPU), request by request: prompts sorted by
  token length, left padding, greedy or seeded sampling, stop strings, ``inference_mode``.
- ``vllm``: ``vllm.LLM`` + ``SamplingParams`` in a *separate* process (``python -m
  mast.vllm_worker IN OUT``), so vLLM's GPU memory is released when the process ends and
  never shares a process with a training model; every request goes into one worker process
  and one ``generate()`` call; a timeout kills the worker.

Both receive the same token ids, decode by the one greedy rule (:attr:`DecodingSpec.greedy`),
seed sample j of a prompt with the prompt's seed + j (:attr:`GenerationRequest.seeds`,
:mod:`mast.sampling_seeds`), and count tokens the same way (generated tokens without the EOS /
stop token; ``truncated`` = the answer stopped at ``max_tokens``). :func:`make_backend` builds one by name (:data:`BACKENDS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mast.config import DecodingSpec
from mast.files import InputError
from mast.sampling_seeds import sample_seeds

# --------------------------------------------------------------------------- pure helpers


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """Cut `text` before the earliest occurrence of any stop string (vLLM's default: stop excluded)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def hf_sample(tokens: list[int], text: str, eos: set[int] | frozenset[int], pad_id: int | None,
              max_new_tokens: int, stop: list[str] | tuple[str, ...]) -> dict:
    """One transformers-generated row (ids after the prompt, decoded text up to eos) -> a sample dict.

    Counted like vLLM's :func:`mast.vllm_worker.completion_sample`: generated tokens up to, NOT
    including, the first eos; padding after a finished row is not counted. finish_reason:
    "stop" (an eos, or a stop string in the text), else "length" (ran to max_new_tokens);
    ``truncated`` = finish_reason == "length".
    """
    for j, t in enumerate(tokens):
        if t in eos:
            return {"text": truncate_at_stop(text, stop), "n_tokens": j, "truncated": False, "finish_reason": "stop"}
    cut = truncate_at_stop(text, stop)
    if cut != text:  # stopped by a stop string, then padded
        n = len(tokens)
        while n > 0 and pad_id is not None and tokens[n - 1] == pad_id:
            n -= 1
        return {"text": cut, "n_tokens": n, "truncated": False, "finish_reason": "stop"}
    reason = "length" if len(tokens) >= max_new_tokens else "stop"
    return {"text": cut, "n_tokens": len(tokens), "truncated": reason == "length", "finish_reason": reason}


def run_with_timeout(cmd: list[str], timeout_s: float | None, env: dict | None = None) -> int | None:
    """Run `cmd` in a session of its own; its exit status, or None when it ran past `timeout_s`.

    On timeout the whole process group is killed (SIGTERM, then SIGKILL after 10 s), so
    grandchildren (vLLM's engine-core and worker processes holding GPU memory) die with it.
    """
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return None
    except BaseException:  # KeyboardInterrupt, a Ray cancel: never leave the worker behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


# --------------------------------------------------------------------------- tokenization


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of already-formatted prompts.

    A chat-templated prompt already carries its special tokens, so none are added; a plain
    prompt gets the tokenizer's usual ones (a BOS where the model has one; Qwen has none).
    Both backends consume these ids, so they see the same input.
    """
    add = not bool(getattr(tokenizer, "chat_template", None))
    return [tokenizer(p, add_special_tokens=add)["input_ids"] for p in prompts]


def stop_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the checkpoint's generation_config eos ids."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None:
        gc = Path(model_dir) / "generation_config.json"
        if gc.is_file():
            eos = json.loads(gc.read_text()).get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos]:
                if e is not None and int(e) not in ids:
                    ids.append(int(e))
    return ids


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class GenerationRequest:
    """One group of a generation call: prompt token ids (:func:`encode_prompts`) decoded with one decoding.

    ``seeds``: one sampling seed per prompt (sample j of prompt i draws with ``seeds[i] + j``, in
    both backends); None: ``decoding.seed`` for every prompt. Greedy decoding ignores them.
    """

    prompt_ids: list[list[int]]
    decoding: DecodingSpec
    seeds: list[int] | None = None

    def __post_init__(self):
        if self.seeds is not None and len(self.seeds) != len(self.prompt_ids):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.prompt_ids)} prompts")

    def prompt_seeds(self) -> list[int]:
        """Each prompt's sampling seed (``seeds``, else ``decoding.seed``)."""
        return [int(x) for x in self.seeds] if self.seeds is not None else [self.decoding.seed] * len(self.prompt_ids)


class Backend:
    """The generation contract every caller uses: :meth:`generate` and :meth:`close`.

    A backend also has ``name`` (its key in :data:`BACKENDS`, part of the evaluation cache key),
    ``tokenizer`` (callers format and encode prompts with it, :func:`encode_prompts`) and
    ``engine_starts``: how many times it started its engine (hf: model loads; vllm: worker
    processes launched), the cost a trial records (docs/vllm.md).
    """

    name = ""
    engine_starts = 0

    def generate(self, requests: list[GenerationRequest]) -> list[list[list[dict]]]:
        """Per request, per prompt, its ``decoding.n`` samples ``{"text", "n_tokens", "truncated",
        "finish_reason"}`` in request order (greedy: n copies of the one greedy answer); a request
        without prompts gets ``[]``. ``truncated``/``finish_reason`` may be None where unknown."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what generation holds (weights, GPU memory); a later :meth:`generate` reloads it."""


class HFBackend(Backend):
    """Transformers batched generation.

    Prompts are sorted by token length (longest first, so an out-of-memory shows at once),
    cut into batches of `batch_size`, left-padded, generated, and put back in request order;
    requests one after the other. Greedy (:attr:`DecodingSpec.greedy`), or sampling where each
    row (sample j of prompt i) draws its tokens with a generator of its own seeded ``seed_i + j``
    (:class:`RowSampler`; no global RNG is used), so a prompt's samples do not depend on its batch
    beyond the logits' own float noise (batch_size 1 and 8 give the same samples in the tests).
    """

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 32, device: str | None = None,
                 dtype: Any = None, progress: bool = True):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a checkpoint folder (no config.json)")
        self.batch_size = int(batch_size)
        self._device, self._dtype = device, dtype
        self.progress = progress
        self._tokenizer = self._model = None
        self.engine_starts = 0  # model loads (a load after close() counts again)

    # tokenizer and weights load on first use: a backend built for suites that are all cache
    # hits never loads the model
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
            self._eos_ids = stop_token_ids(self._tokenizer, self.model_dir)
            self._eos = set(self._eos_ids)
        return self._tokenizer

    @property
    def eos_ids(self) -> list[int]:
        self.tokenizer  # noqa: B018  (loads it)
        return self._eos_ids

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            dtype = self._dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
            self._model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype).to(self.device)
            self._model.eval()
            self.engine_starts += 1
        return self._model

    def _generation_config(self, decoding: DecodingSpec):
        from transformers import GenerationConfig

        if decoding.repetition_detection is not None:
            raise InputError("decoding.repetition_detection: only the vllm backend has it")
        # greedy settings for both: sampling is a logits processor's (:meth:`_row_sampler`), which
        # picks each row's token and leaves generate() to take the argmax
        return GenerationConfig(
            max_new_tokens=decoding.max_tokens,
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            repetition_penalty=1.0,
            num_beams=1,
            num_return_sequences=1,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(decoding.stop) or None,
        )

    def generate(self, requests: list[GenerationRequest]) -> list[list[list[dict]]]:
        return [self._generate_group(r.prompt_ids, r.decoding, r.prompt_seeds()) for r in requests]

    def _row_sampler(self, decoding: DecodingSpec, seeds: list[int]):
        """Logits processors that sample the rows (prompt i, sample j), prompt-major, each with a
        generator seeded ``seeds[i] + j``: the decoding's temperature and top-p (transformers' own
        warpers, as ``do_sample`` applies them; no top-k, vLLM's default), then :class:`RowSampler`.

        generate() runs them in greedy mode, which then takes the drawn token as its argmax. With
        ``do_sample`` it would not work: transformers appends its own warpers AFTER the caller's
        processors (``_get_logits_processor``), so a sampler there would draw from unwarped scores."""
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        procs = []
        if decoding.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_p < 1.0:
            procs.append(TopPLogitsWarper(decoding.top_p))
        gens = [torch.Generator(device=self.device).manual_seed(x) for s in seeds for x in sample_seeds(s, decoding.n)]
        return LogitsProcessorList([*procs, RowSampler(gens)])

    def _generate_group(self, prompt_ids: list[list[int]], decoding: DecodingSpec,
                        seeds: list[int]) -> list[list[dict]]:
        """Per prompt its n samples ``{"text", "n_tokens", "truncated", "finish_reason"}`` (request order)."""
        import torch
        from tqdm.auto import tqdm

        if not prompt_ids:
            return []
        gen_config = self._generation_config(decoding)
        sample = not decoding.greedy
        n_ret = decoding.n if sample else 1
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        out: list = [None] * len(prompt_ids)
        pad = self.tokenizer.pad_token_id
        bar = tqdm(total=len(prompt_ids), desc=f"generate ({self.model_dir.name})", unit="prompt",
                   disable=not self.progress, file=sys.stderr, leave=False)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = prompt_ids[i]
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                # sampling: n rows per prompt (prompt-major, as num_return_sequences lays them out)
                ids, mask = ids.repeat_interleave(n_ret, dim=0), mask.repeat_interleave(n_ret, dim=0)
                seqs = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    generation_config=gen_config, tokenizer=self.tokenizer if decoding.stop else None,
                    logits_processor=self._row_sampler(decoding, [seeds[i] for i in idx]) if sample else None,
                )
                new = seqs[:, width:].tolist()
                raw = self.tokenizer.batch_decode([self._strip(t) for t in new], skip_special_tokens=True)
                samples = [hf_sample(t, text, self._eos, pad, decoding.max_tokens, decoding.stop)
                           for t, text in zip(new, raw)]
                for row, i in enumerate(idx):
                    got = samples[row * n_ret:(row + 1) * n_ret]
                    out[i] = got if sample else [dict(got[0]) for _ in range(decoding.n)]
                bar.update(len(idx))
        bar.close()
        return out

    def _strip(self, tokens: list[int]) -> list[int]:
        """Generated ids up to (not including) the first eos; padding after it dropped."""
        for j, t in enumerate(tokens):
            if t in self._eos:  # set when the tokenizer loaded
                return tokens[:j]
        return tokens

    def close(self) -> None:
        """Drop the weights (and the CUDA cache); the backend reloads them if used again."""
        if self._model is not None:
            self._model = None
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class RowSampler:
    """A logits processor that samples each row's next token from softmax(scores) with the row's own
    ``torch.Generator`` and returns scores whose argmax is that token (0 there, -inf elsewhere).

    Under greedy generate() this is multinomial sampling as ``do_sample`` does it, but a row's
    draws depend only on its own scores and generator: not on the batch, nor on the global RNG.
    Rows run on after they finish (padding); their extra draws touch no other row.
    """

    def __init__(self, generators: list):
        self.generators = generators

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows for {len(self.generators)} generators")
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


# vLLM's CPU build reserves VLLM_CPU_KVCACHE_SPACE GiB of KV cache per engine (its default, 19 GiB,
# costs over a minute of start-up and two engines exceed a 24 GiB machine); the GPU build ignores it
VLLM_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class VLLMBackend(Backend):
    """vLLM generation in its own process (``python -m mast.vllm_worker IN OUT``).

    The parent tokenizes (same ids as the hf backend), turns each decoding into ready
    ``SamplingParams`` keyword arguments (:func:`vllm_sampling_kwargs`) and writes both to a
    temporary JSON; the worker builds ``vllm.LLM(model=..., seed=..., tensor_parallel_size=...,
    gpu_memory_utilization=...)``, runs ``llm.generate`` on every request at once (outputs come
    back in request order) and writes every sample (text, token count, truncated; see
    :mod:`mast.vllm_worker`). The process exits afterwards, which is what reliably frees vLLM's
    GPU memory. ``dtype`` and ``enforce_eager`` go to ``LLM()``; ``timeout_s`` bounds the worker.
    """

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int | None = None, device: str | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto", enforce_eager: bool = False,
                 timeout_s: float | None = None, progress: bool = True):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a checkpoint folder (no config.json)")
        check_vllm_installed()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_ids = stop_token_ids(self.tokenizer, self.model_dir)
        self.options = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "max_model_len": max_model_len,
            "dtype": dtype,
            "enforce_eager": bool(enforce_eager),
        }
        self.timeout_s = timeout_s
        self.progress = progress
        # the worker's environment defaults; the caller's own environment wins (docs/vllm.md)
        self.env_defaults = dict(VLLM_ENV_DEFAULTS)
        self.engine_starts = 0  # worker processes launched (one engine each)

    def generate(self, requests: list[GenerationRequest]) -> list[list[list[dict]]]:
        """Every request in ONE worker process and ONE ``LLM.generate`` call.

        Per request, per prompt, its n samples (see :func:`mast.vllm_worker.completion_sample`).
        The worker is killed (its whole process group: vLLM's engine-core and tensor-parallel
        processes too) after ``timeout_s`` seconds, and the call raises RuntimeError.
        """
        todo = [(i, r.prompt_ids, r.decoding, r.prompt_seeds()) for i, r in enumerate(requests) if r.prompt_ids]
        result: list[list[list[dict]]] = [[] for _ in requests]
        if not todo:
            return result
        seed = todo[0][2].seed
        job = {
            "model": str(self.model_dir.resolve()),
            "llm": {**self.options, "seed": seed},
            # sampling: one seed per prompt (greedy jobs are as before: none)
            "groups": [{"sampling": vllm_sampling_kwargs(dec, self.eos_ids), "prompt_token_ids": ids,
                        **({} if dec.greedy else {"seeds": seeds})} for _, ids, dec, seeds in todo],
            "progress": self.progress,
        }
        with tempfile.TemporaryDirectory(prefix="mast-vllm-") as tmp:
            inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
            inp.write_text(json.dumps(job), encoding="utf-8")
            env = {**self.env_defaults, **os.environ}  # the worker must import this very `mast` (also from Ray)
            pkg_root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
            self.engine_starts += 1
            rc = run_with_timeout([sys.executable, "-m", "mast.vllm_worker", str(inp), str(outp)], self.timeout_s,
                                  env=env)
            if rc is None:
                raise RuntimeError(f"vLLM worker timed out after {self.timeout_s:g}s on {self.model_dir} "
                                   "(killed; raise evaluation.timeout_s if the evaluation is just long)")
            if rc != 0 or not outp.is_file():
                raise RuntimeError(f"vLLM worker failed (exit {rc}) on {self.model_dir}")
            got = json.loads(outp.read_text(encoding="utf-8"))["groups"]
        for (i, ids, dec, _), rows in zip(todo, got):
            if len(rows) != len(ids):
                raise RuntimeError(f"vLLM worker returned {len(rows)} results for {len(ids)} prompts")
            result[i] = [[{**smp, "text": truncate_at_stop(smp["text"], dec.stop)} for smp in r] for r in rows]
        return result

    def close(self) -> None:
        pass


def vllm_sampling_kwargs(decoding: DecodingSpec, stop_token_ids: list[int]) -> dict:
    """``SamplingParams`` keyword arguments for one decoding, as the worker passes them on (JSON-safe).

    Greedy (:attr:`DecodingSpec.greedy`): temperature 0 and top_p 1. top_k stays at vLLM's
    default (disabled), as in the hf backend; stop strings are excluded from the text (vLLM's
    default), special tokens skipped when detokenizing.
    """
    greedy = decoding.greedy
    return {
        "n": int(decoding.n),
        "temperature": 0.0 if greedy else float(decoding.temperature),
        "top_p": 1.0 if greedy else float(decoding.top_p),
        "max_tokens": int(decoding.max_tokens),
        "seed": decoding.seed,
        "stop": list(decoding.stop) or None,
        "stop_token_ids": list(stop_token_ids) or None,
        "skip_special_tokens": True,
        **({"repetition_detection": rep.model_dump()} if (rep := decoding.repetition_detection) else {}),
    }


def check_vllm_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise InputError("backend 'vllm': vllm is not installed; install it with "
                         "pip install -e '.[vllm]' on a GPU machine, or use --backend hf")


BACKENDS: dict[str, type[Backend]] = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(name: str, model_dir: str | os.PathLike, batch_size: int | None = None, **options) -> Backend:
    """The backend `name` of :data:`BACKENDS` on `model_dir` (`batch_size` only where given)."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    kw = dict(options)
    if batch_size is not None:
        kw["batch_size"] = batch_size
    return BACKENDS[name](model_dir, **kw)
