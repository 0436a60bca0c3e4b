"""The peers ponder is measured against, and ponder's own server as a subprocess.

- `llama_server(...)`: llama.cpp's llama-server on a loopback port with the same GGUF (2 threads, one
  slot per concurrent request, its RAM prompt cache off), stopped when the `with` block ends.
- `run_llama_bench(llama_bench_argv(...))`: llama.cpp's llama-bench (pp and tg at batch 1), its JSON rows.
- `ponder_server(...)`: `ponder serve` in a subprocess on a loopback port.
- `run_hf_offline(...)`: transformers' static-batch `generate` (fp32, left padding, batch 16), timing
  each decoding step with a streamer so it reports TTFT and ITL like the others.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from ponder.bench import REPO_ROOT
from ponder.bench.metrics import RequestRecord
from ponder.bench.workloads import Workload

LLAMA_THREADS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server subprocess we start, wait for, and stop. Use as a context manager."""

    name: str
    argv: list[str]
    port: int
    ready_path: str                       # GET returns 200 once the model is loaded
    startup_timeout_s: float = 600.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log_path: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        fd, self.log_path = tempfile.mkstemp(prefix=f"ponder-bench-{self.name}-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting:\n"
                                   f"{' '.join(self.argv)}\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base_url + self.ready_path, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if exc[0] is None and self.log_path and os.path.exists(self.log_path):
            os.remove(self.log_path)


# -- llama.cpp -------------------------------------------------------------------------------------

def llama_binary(name: str) -> str:
    """A llama.cpp program: $PONDER_<NAME> (PONDER_LLAMA_SERVER, PONDER_LLAMA_BENCH), then the repo's
    .peers/bin (built by `make peers`), then $PATH."""
    env = "PONDER_" + name.upper().replace("-", "_")
    for candidate in (os.environ.get(env), os.path.join(REPO_ROOT, ".peers", "bin", name), shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{name} not found: run `make peers` (builds .peers/bin/{name}) or set {env}")


def llama_server_binary() -> str:
    return llama_binary("llama-server")


def slot_context(workload: Workload, margin: int = 16, multiple: int = 256) -> int:
    """Per-slot context for llama-server: the longest prompt + the output, rounded up."""
    need = workload.max_prompt_len + workload.output_len + margin
    return -(-need // multiple) * multiple


def llama_server(gguf_path: str, slots: int, slot_ctx: int, threads: int = LLAMA_THREADS) -> ServerProcess:
    """llama-server with `slots` parallel slots; -c is the TOTAL context, so slots x per-slot context."""
    if os.path.isdir(gguf_path):
        raise ValueError(f"llama.cpp needs a GGUF file; {gguf_path} is a folder")
    port = free_port()
    argv = [llama_server_binary(), "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-np", str(slots), "-c", str(slots * slot_ctx), "-cram", "0",
            "--metrics", "--no-webui"]
    return ServerProcess("llama.cpp", argv, port, ready_path="/health")


def llama_bench_argv(gguf_path: str, n_prompt: int, n_gen: int, repetitions: int,
                     threads: int = LLAMA_THREADS) -> list[str]:
    """llama-bench's pp and tg tests on the GGUF, results as JSON on stdout."""
    if os.path.isdir(gguf_path):
        raise ValueError(f"llama.cpp needs a GGUF file; {gguf_path} is a folder")
    return [llama_binary("llama-bench"), "-m", gguf_path, "-p", str(n_prompt), "-n", str(n_gen),
            "-t", str(threads), "-r", str(repetitions), "-o", "json"]


def run_llama_bench(argv: list[str], timeout_s: float = 3600.0) -> list[dict]:
    """Run llama-bench (argv from llama_bench_argv); its JSON rows, one per test."""
    import json

    out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench exited with code {out.returncode}:\n{' '.join(argv)}\n"
                           f"{out.stderr[-3000:]}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"llama-bench printed no JSON ({e}):\n{out.stdout[-1000:]}") from None


# -- ponder serve -----------------------------------------------------------------------------------

def ponder_server(model: str | None = None, extra_args: str = "") -> ServerProcess:
    """`ponder serve` on a free loopback port (extra_args: more `ponder serve` options, shell-quoted)."""
    port = free_port()
    argv = [sys.executable, "-m", "ponder.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model:
        argv += ["--model", model]
    argv += shlex.split(extra_args)
    return ServerProcess("ponder", argv, port, ready_path="/v1/models")


# -- transformers -----------------------------------------------------------------------------------

HF_BATCH_SIZE = 16


def hf_model_folder(model_path: str, cache_dir: str) -> str:
    """An HF folder for the model: itself if it is one, else the GGUF converted once by transformers
    and saved under <cache_dir>/hf/<name> so later runs load it directly."""
    if os.path.isdir(model_path):
        return model_path
    import torch
    from transformers import AutoModelForCausalLM

    name = os.path.splitext(os.path.basename(model_path))[0]
    folder = os.path.join(cache_dir, "hf", name)
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path) or ".",
                                                 gguf_file=os.path.basename(model_path), dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:       # transformers marks GGUF models quantized even once dequantized
        if not all(p.is_floating_point() for p in model.parameters()):
            raise ValueError(f"transformers kept {model_path}'s weights packed; cannot cache an fp32 copy")
        quantizer.remove_quantization_config(model)
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    open(os.path.join(tmp, "done"), "w").write(model_path + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _step_timer():
    """A transformers streamer that timestamps each generated step (the first put is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if self._prompt_seen:
                self.times.append(time.perf_counter())
            self._prompt_seen = True

        def end(self) -> None:
            pass

    return StepTimes()


def left_pad(prompts: list[list[int]], pad_id: int):
    """Batch tensors (input_ids, attention_mask) with prompts padded on the left."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def generated_length(row: list[int], eos_ids: set[int]) -> int:
    """Tokens a row generated: through its first EOS, or all of them."""
    return next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))


def run_hf_offline(workload: Workload, model_path: str, cache_dir: str, batch_size: int = HF_BATCH_SIZE,
                   progress: bool = True) -> tuple[list[RequestRecord], float]:
    """All requests queued at t0, served in static batches of `batch_size` in order."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_model_folder(model_path, cache_dir), dtype=torch.float32)
    model.eval()
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if isinstance(pad_id, int) else 0

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def generate(prompts: list[list[int]], max_new: int, streamer=None) -> list[int]:
        """Generate for a batch; returns each row's number of generated tokens (through its EOS)."""
        ids, mask = left_pad(prompts, pad_id)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new,
                                 min_new_tokens=max_new if workload.ignore_eos else 0,
                                 do_sample=False, pad_token_id=pad_id, streamer=streamer)
        return [generated_length(row, eos_ids) for row in out[:, ids.shape[1]:].tolist()]

    generate([workload.prompts[0][:8]], 2)          # warm-up
    batches = [workload.prompts[i:i + batch_size] for i in range(0, len(workload.prompts), batch_size)]
    records = []
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc="hf", unit="batch", disable=not progress, leave=False):
        timer = _step_timer()
        lengths = generate(batch, workload.output_len, timer)
        end = time.perf_counter()
        records += [RequestRecord(len(p), n, t0, end, timer.times[:n]) for p, n in zip(batch, lengths)]
    return records, time.perf_counter() - t0
